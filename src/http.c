/*-------------------------------------------------------------------------
 *
 * http.c
 *	  HTTP transfers through libcurl, interruptible and bounded, one at a
 *	  time or several in flight at once; and the URL helpers that need
 *	  libcurl's parser.
 *
 *	  This is the only file that talks to libcurl.  It knows nothing about
 *	  credentials, retries or the service's error bodies (request.c owns
 *	  those) and never raises an ERROR for a failed transfer: it reports
 *	  what happened and lets the request path decide.  The one exception is
 *	  an interrupt, which is raised as PostgreSQL always raises it.
 *
 *	  Every transfer goes through one multi handle per process, which owns
 *	  the connection cache, so keep-alive connections serve every handle of
 *	  a small pool.  A transfer in flight holds a pool slot: its easy
 *	  handle, libcurl's copies of its headers (which may carry credentials,
 *	  wiped as soon as the transfer ends), its error buffer and its body
 *	  buffer.  Waiting is on the latch and the sockets together, so that a
 *	  cancel ends a wait at once; libcurl is driven only from here, never
 *	  from a signal handler, and its callbacks never ereport (a longjmp
 *	  would leave the multi handle mid-call).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <sys/select.h>

#include <curl/curl.h>

#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "storage/latch.h"
#include "utils/memutils.h"
#include "utils/wait_event.h"

#include "ciflow.h"
#include "http.h"

/* The longest a wait sleeps before it asks libcurl again. */
#define WAIT_CAP_MS 1000

/*
 * When libcurl has a transfer but no socket to show (a resolver without
 * one, a socket past FD_SETSIZE), its documentation asks for a short wait.
 */
#define WAIT_BLIND_MS 100

/* Where the write callback puts the body; never touched by libcurl itself. */
typedef struct BodyBuffer
{
	MemoryContext cxt;
	char	   *data;
	size_t		len;
	size_t		cap;
	size_t		limit;
	bool		too_large;
	bool		out_of_memory;
} BodyBuffer;

/*
 * Registered on the memory context current at the start, so that a
 * transfer whose owner drops that context before the finish is cancelled
 * with it.  PostgreSQL 15 cannot unregister a callback, so the guard lives
 * in that context and the finish only clears its slot pointer.
 */
typedef struct SlotGuard
{
	MemoryContextCallback cb;
	CiflowHttpSlot *slot;		/* NULL once finished or cancelled */
} SlotGuard;

struct CiflowHttpSlot
{
	CURL	   *easy;			/* kept across transfers, reset at each */
	bool		in_use;			/* started, not yet finished or cancelled */
	bool		in_multi;		/* added to the multi handle */
	bool		done;			/* libcurl reported the transfer's end */
	uint64		ticket;			/* of the transfer in the slot */
	CURLcode	result;
	struct curl_slist *headers; /* libcurl's copies, wiped at the end */
	SlotGuard  *guard;
	BodyBuffer	buf;
	char		errbuf[CURL_ERROR_SIZE];
};

static CURLM *multi = NULL;
static CiflowHttpSlot slots[CIFLOW_HTTP_MAX_PENDING];
static uint64 last_ticket = 0;

/*
 * t's transfer, if it is still in flight: a slot cancelled by its context's
 * reset may already serve another transfer, which t must not touch.
 */
static CiflowHttpSlot *
SlotOf(const CiflowTransfer *t)
{
	if (t->slot != NULL && t->slot->in_use && t->slot->ticket == t->ticket)
		return t->slot;
	return NULL;
}

/*
 * Runs inside libcurl, so it must not ereport: a longjmp would leave the
 * handle mid-transfer.  Allocation failures and the size limit abort the
 * transfer instead and are reported once libcurl has said it ended.
 *
 * The first write sizes the buffer from Content-Length, so that a body
 * is received without a copy; a length that is absent, compressed or
 * wrong falls back to doubling.
 */
static size_t
WriteBody(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	CiflowHttpSlot *slot = (CiflowHttpSlot *) userdata;
	BodyBuffer *buf = &slot->buf;
	size_t		n = size * nmemb;

	if (buf->len + n > buf->limit)
	{
		buf->too_large = true;
		return 0;
	}
	if (buf->len + n + 1 > buf->cap)
	{
		size_t		newcap = Max(buf->cap * 2, buf->len + n + 1);
		char	   *newdata;

		if (buf->data == NULL)
		{
			curl_off_t	announced = -1;

			if (curl_easy_getinfo(slot->easy, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T,
								  &announced) == CURLE_OK &&
				announced > 0 && (size_t) announced <= buf->limit)
				newcap = Max((size_t) announced + 1, n + 1);
			else
				newcap = Max(newcap, 16384);
		}
		newdata = MemoryContextAllocExtended(buf->cxt, newcap,
											 MCXT_ALLOC_HUGE | MCXT_ALLOC_NO_OOM);
		if (newdata == NULL)
		{
			buf->out_of_memory = true;
			return 0;
		}
		if (buf->len > 0)
			memcpy(newdata, buf->data, buf->len);
		if (buf->data)
			pfree(buf->data);
		buf->data = newdata;
		buf->cap = newcap;
	}
	memcpy(buf->data + buf->len, ptr, n);
	buf->len += n;
	return n;
}

/*
 * libcurl calls this often while it drives a transfer; a cancel or
 * terminate request ends the transfer, and is raised by the one who waits
 * for it.
 */
static int
CheckInterrupts(void *clientp, curl_off_t dltotal, curl_off_t dlnow,
				curl_off_t ultotal, curl_off_t ulnow)
{
	(void) clientp;
	(void) dltotal;
	(void) dlnow;
	(void) ultotal;
	(void) ulnow;
	return (QueryCancelPending || ProcDiePending) ? 1 : 0;
}

static void
WipeHeaderList(struct curl_slist *headers)
{
	struct curl_slist *h;

	for (h = headers; h != NULL; h = h->next)
		explicit_bzero(h->data, strlen(h->data));
}

/*
 * The end of a slot's transfer, whichever way it ends: out of the multi
 * handle, and the headers wiped and gone.  Never raises: it runs in the
 * reset callback and in PG_CATCH blocks too.
 */
static void
DetachSlot(CiflowHttpSlot *slot)
{
	if (slot->in_multi)
	{
		(void) curl_multi_remove_handle(multi, slot->easy);
		slot->in_multi = false;
	}
	if (slot->headers)
	{
		(void) curl_easy_setopt(slot->easy, CURLOPT_HTTPHEADER, NULL);
		WipeHeaderList(slot->headers);
		curl_slist_free_all(slot->headers);
		slot->headers = NULL;
	}
}

/* Gives the slot back; the caller has taken what it wanted from it. */
static void
ReleaseSlot(CiflowHttpSlot *slot)
{
	DetachSlot(slot);
	if (slot->guard)
	{
		slot->guard->slot = NULL;
		slot->guard = NULL;
	}
	memset(&slot->buf, 0, sizeof(slot->buf));
	slot->in_use = false;
	slot->done = false;
}

/* Cancels a transfer and frees what it had received. */
static void
CancelSlot(CiflowHttpSlot *slot)
{
	char	   *data = slot->buf.data;

	ReleaseSlot(slot);
	if (data)
		pfree(data);
}

/*
 * The owner's memory context goes away before the finish: the body buffer
 * goes with it (this runs before the memory is released), so the transfer
 * must stop writing into it.
 */
static void
AbandonSlot(void *arg)
{
	SlotGuard  *guard = (SlotGuard *) arg;

	if (guard->slot != NULL)
		ReleaseSlot(guard->slot);
}

/*
 * One curl_multi_perform, and the ends it reports recorded in their
 * slots, which are detached at once: an ended transfer's headers do not
 * wait for its finish to be wiped.
 */
static void
Drive(void)
{
	CURLMcode	mc;
	CURLMsg    *msg;
	int			running;
	int			queued;

	mc = curl_multi_perform(multi, &running);
	while ((msg = curl_multi_info_read(multi, &queued)) != NULL)
	{
		CiflowHttpSlot *slot = NULL;

		if (msg->msg != CURLMSG_DONE)
			continue;
		(void) curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **) &slot);
		Assert(slot != NULL && slot->in_use);
		slot->result = msg->data.result;
		slot->done = true;
		/* msg is invalid once its handle leaves the multi handle. */
		DetachSlot(slot);
	}
	if (mc != CURLM_OK)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("ciflow: HTTP transfers failed: %s", curl_multi_strerror(mc))));
}

/* A free slot with an easy handle, reset; the multi handle made on the way. */
static CiflowHttpSlot *
TakeSlot(void)
{
	CiflowHttpSlot *slot = NULL;
	int			i;

	if (multi == NULL)
	{
		multi = curl_multi_init();
		if (multi == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY),
					 errmsg("ciflow: could not create an HTTP handle")));
	}
	/* The lowest free slot, so that one transfer at a time uses one handle. */
	for (i = 0; i < CIFLOW_HTTP_MAX_PENDING && slot == NULL; i++)
	{
		if (!slots[i].in_use)
			slot = &slots[i];
	}
	if (slot == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("ciflow: more than %d HTTP transfers in flight",
						CIFLOW_HTTP_MAX_PENDING)));
	if (slot->easy == NULL)
	{
		slot->easy = curl_easy_init();
		if (slot->easy == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY),
					 errmsg("ciflow: could not create an HTTP handle")));
	}
	else
		curl_easy_reset(slot->easy);
	return slot;
}

static CiflowTransportError
ClassifyCurlError(CURLcode rc)
{
	switch (rc)
	{
		case CURLE_OPERATION_TIMEDOUT:
			return CIFLOW_TRANSPORT_TIMEOUT;
		case CURLE_FILESIZE_EXCEEDED:
			return CIFLOW_TRANSPORT_TOO_LARGE;
		case CURLE_SSL_CONNECT_ERROR:
		case CURLE_PEER_FAILED_VERIFICATION:
		case CURLE_SSL_CERTPROBLEM:
		case CURLE_SSL_CIPHER:
		case CURLE_SSL_CACERT_BADFILE:
		case CURLE_SSL_ISSUER_ERROR:
		case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
		case CURLE_SSL_INVALIDCERTSTATUS:
			return CIFLOW_TRANSPORT_TLS;
		default:
			return CIFLOW_TRANSPORT_FAILED;
	}
}

static char *
HeaderValue(CURL *h, const char *name)
{
	struct curl_header *hdr;

	if (curl_easy_header(h, name, 0, CURLH_HEADER, -1, &hdr) == CURLHE_OK &&
		hdr->value != NULL)
		return pstrdup(hdr->value);
	return NULL;
}

/* The options of one transfer; libcurl copies every string but the body. */
static void
SetOptions(CiflowHttpSlot *slot, const CiflowTransfer *t)
{
	CURL	   *h = slot->easy;

	curl_easy_setopt(h, CURLOPT_PRIVATE, (char *) slot);
	curl_easy_setopt(h, CURLOPT_URL, t->url);
	/* Sent as built: libcurl must not fold "..", which could leave the API. */
	curl_easy_setopt(h, CURLOPT_PATH_AS_IS, 1L);
	curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
	/* Credentials must never follow a redirect to another host. */
	curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 0L);
	/* No SIGALRM in a backend: libcurl must not use signals for timeouts. */
	curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS,
					 (long) ciflow_settings.connect_timeout_ms);
	curl_easy_setopt(h, CURLOPT_TIMEOUT_MS,
					 (long) ciflow_settings.request_timeout_ms);
	curl_easy_setopt(h, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t) slot->buf.limit);
	curl_easy_setopt(h, CURLOPT_TCP_KEEPALIVE, 1L);
	curl_easy_setopt(h, CURLOPT_ACCEPT_ENCODING, "");
	curl_easy_setopt(h, CURLOPT_USERAGENT, "ciflow/0.1");
	curl_easy_setopt(h, CURLOPT_SSL_VERIFYPEER, 1L);
	curl_easy_setopt(h, CURLOPT_SSL_VERIFYHOST, 2L);
	if (t->ca_file != NULL)
		curl_easy_setopt(h, CURLOPT_CAINFO, t->ca_file);
	curl_easy_setopt(h, CURLOPT_HTTPHEADER, slot->headers);
	curl_easy_setopt(h, CURLOPT_ERRORBUFFER, slot->errbuf);
	curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, WriteBody);
	curl_easy_setopt(h, CURLOPT_WRITEDATA, slot);
	curl_easy_setopt(h, CURLOPT_NOPROGRESS, 0L);
	curl_easy_setopt(h, CURLOPT_XFERINFOFUNCTION, CheckInterrupts);
	if (t->method != NULL && strcmp(t->method, "POST") == 0)
	{
		curl_easy_setopt(h, CURLOPT_POST, 1L);
		/* Not copied: it may hold a secret, and it outlives the transfer. */
		curl_easy_setopt(h, CURLOPT_POSTFIELDS, t->body ? t->body : "");
		curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE,
						 (long) (t->body ? strlen(t->body) : 0));
	}
	else
		curl_easy_setopt(h, CURLOPT_HTTPGET, 1L);
}

void
CiflowHttpStart(CiflowTransfer *t)
{
	CiflowHttpSlot *slot;
	SlotGuard  *guard;
	int			i;

	t->slot = NULL;
	t->error = CIFLOW_TRANSPORT_OK;
	t->error_text[0] = '\0';
	t->status = 0;
	t->body_out = NULL;
	t->body_len = 0;
	t->content_type = NULL;
	t->retry_after = NULL;
	t->www_authenticate = false;

	slot = TakeSlot();
	guard = palloc0(sizeof(SlotGuard));

	/*
	 * The slot is not in use until it is guarded: every way out before
	 * that wipes the headers copied so far and leaves the slot free.
	 */
	for (i = 0; i < t->nheaders; i++)
	{
		struct curl_slist *next = curl_slist_append(slot->headers, t->headers[i]);

		if (next == NULL)
		{
			DetachSlot(slot);
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY),
					 errmsg("out of memory")));
		}
		slot->headers = next;
	}

	memset(&slot->buf, 0, sizeof(slot->buf));
	slot->buf.cxt = CurrentMemoryContext;
	slot->buf.limit = (size_t) ciflow_settings.max_response_kb * 1024;
	slot->errbuf[0] = '\0';
	slot->done = false;
	slot->result = CURLE_OK;
	SetOptions(slot, t);

	guard->slot = slot;
	guard->cb.func = AbandonSlot;
	guard->cb.arg = guard;
	MemoryContextRegisterResetCallback(CurrentMemoryContext, &guard->cb);
	slot->guard = guard;
	slot->in_use = true;
	slot->ticket = ++last_ticket;
	t->slot = slot;
	t->ticket = slot->ticket;

	if (curl_multi_add_handle(multi, slot->easy) != CURLM_OK)
	{
		CancelSlot(slot);
		t->slot = NULL;
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("ciflow: could not start an HTTP transfer")));
	}
	slot->in_multi = true;

	/* On the wire now, so that the answer comes while the caller works. */
	PG_TRY();
	{
		Drive();
	}
	PG_CATCH();
	{
		CancelSlot(slot);
		t->slot = NULL;
		PG_RE_THROW();
	}
	PG_END_TRY();
}

/*
 * Sleeps until one of libcurl's sockets is ready, its timeout is due
 * (capped, so that libcurl is asked again now and then), or the latch is
 * set (a cancel, a terminate: the signal handlers set it).  The wait event
 * set is made anew each time: libcurl opens and closes sockets between two
 * waits, and a closed descriptor's number may come back as another socket.
 */
static void
WaitForSockets(void)
{
	fd_set		readfds;
	fd_set		writefds;
	fd_set		excfds;
	int			maxfd = -1;
	long		timeout_ms = -1;
	int			nevents = 2;
	int			fd;
	WaitEventSet *set;
	WaitEvent	event;

	FD_ZERO(&readfds);
	FD_ZERO(&writefds);
	FD_ZERO(&excfds);
	if (curl_multi_fdset(multi, &readfds, &writefds, &excfds, &maxfd) != CURLM_OK ||
		curl_multi_timeout(multi, &timeout_ms) != CURLM_OK)
	{
		maxfd = -1;
		timeout_ms = WAIT_BLIND_MS;
	}
	if (timeout_ms < 0 || timeout_ms > WAIT_CAP_MS)
		timeout_ms = WAIT_CAP_MS;
	if (maxfd < 0)
		timeout_ms = Min(timeout_ms, WAIT_BLIND_MS);
	if (timeout_ms == 0)
		return;

	for (fd = 0; fd <= maxfd; fd++)
	{
		if (FD_ISSET(fd, &readfds) || FD_ISSET(fd, &writefds))
			nevents++;
	}
	set = CreateWaitEventSet(CurrentMemoryContext, nevents);

	/* PostgreSQL 15 has no resource owner for it: its epoll fd is ours. */
	PG_TRY();
	{
		AddWaitEventToSet(set, WL_LATCH_SET, PGINVALID_SOCKET, MyLatch, NULL);
		/* As WaitLatch does: a single-user backend has no postmaster. */
		if (IsUnderPostmaster)
			AddWaitEventToSet(set, WL_EXIT_ON_PM_DEATH, PGINVALID_SOCKET,
							  NULL, NULL);
		for (fd = 0; fd <= maxfd; fd++)
		{
			uint32		events = 0;

			if (FD_ISSET(fd, &readfds))
				events |= WL_SOCKET_READABLE;
			if (FD_ISSET(fd, &writefds))
				events |= WL_SOCKET_WRITEABLE;
			if (events != 0)
				AddWaitEventToSet(set, events, fd, NULL, NULL);
		}
		(void) WaitEventSetWait(set, timeout_ms, &event, 1, PG_WAIT_EXTENSION);
	}
	PG_FINALLY();
	{
		FreeWaitEventSet(set);
	}
	PG_END_TRY();
}

/* Moves the slot's result into t, in the memory context of the start. */
static void
CollectSlot(CiflowHttpSlot *slot, CiflowTransfer *t)
{
	CURLcode	rc = slot->result;
	BodyBuffer	buf = slot->buf;
	MemoryContext old;

	Assert(slot->done && !slot->in_multi && slot->headers == NULL);

	if (rc == CURLE_ABORTED_BY_CALLBACK)
	{
		CancelSlot(slot);
		CHECK_FOR_INTERRUPTS();
		/* An interrupt that raised nothing: report a plain failure. */
		t->error = CIFLOW_TRANSPORT_FAILED;
		strlcpy(t->error_text, "transfer interrupted", sizeof(t->error_text));
		return;
	}
	if (rc != CURLE_OK)
	{
		t->error = buf.too_large ? CIFLOW_TRANSPORT_TOO_LARGE : ClassifyCurlError(rc);
		strlcpy(t->error_text, slot->errbuf[0] ? slot->errbuf : curl_easy_strerror(rc),
				sizeof(t->error_text));
		CancelSlot(slot);
		if (buf.out_of_memory)
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY),
					 errmsg("out of memory"),
					 errdetail("Failed while receiving a response of %zu bytes.",
							   buf.len)));
		return;
	}

	old = MemoryContextSwitchTo(buf.cxt);
	curl_easy_getinfo(slot->easy, CURLINFO_RESPONSE_CODE, &t->status);
	{
		char	   *ct = NULL;

		if (curl_easy_getinfo(slot->easy, CURLINFO_CONTENT_TYPE, &ct) == CURLE_OK && ct)
			t->content_type = pstrdup(ct);
	}
	t->retry_after = HeaderValue(slot->easy, "Retry-After");
	{
		char	   *wa = HeaderValue(slot->easy, "WWW-Authenticate");

		t->www_authenticate = (wa != NULL);
	}
	if (buf.data == NULL)
		buf.data = palloc(1);
	MemoryContextSwitchTo(old);
	buf.data[buf.len] = '\0';
	t->body_out = buf.data;
	t->body_len = buf.len;
	ReleaseSlot(slot);
}

void
CiflowHttpFinish(CiflowTransfer *t)
{
	CiflowHttpSlot *slot = SlotOf(t);

	if (slot == NULL)
		elog(ERROR, "ciflow: finishing an HTTP transfer that is not in flight");

	/*
	 * Whatever is raised here (a cancel, a terminate, out of memory), the
	 * transfer is cancelled first, so the handle can serve the next one.
	 */
	PG_TRY();
	{
		while (!slot->done)
		{
			WaitForSockets();
			ResetLatch(MyLatch);
			CHECK_FOR_INTERRUPTS();
			Drive();
		}
		CollectSlot(slot, t);
		t->slot = NULL;
	}
	PG_CATCH();
	{
		/* Not when CollectSlot had given it back already. */
		if (SlotOf(t) != NULL)
			CancelSlot(slot);
		t->slot = NULL;
		PG_RE_THROW();
	}
	PG_END_TRY();
}

void
CiflowHttpTransfer(CiflowTransfer *t)
{
	CiflowHttpStart(t);
	CiflowHttpFinish(t);
}

time_t
CiflowHttpDate(const char *value)
{
	return curl_getdate(value, NULL);
}

/* Whether scheme is one of the NULL-terminated list (any case). */
static bool
SchemeIn(const char *scheme, const char *const *schemes)
{
	for (; *schemes != NULL; schemes++)
	{
		if (pg_strcasecmp(scheme, *schemes) == 0)
			return true;
	}
	return false;
}

bool
CiflowParseUrl(const char *url, char **origin)
{
	static const char *const web[] = {"http", "https", NULL};

	return CiflowParseUrlSchemes(url, web, origin);
}

bool
CiflowParseUrlSchemes(const char *url, const char *const *schemes, char **origin)
{
	CURLU	   *u = curl_url();
	char	   *scheme = NULL;
	char	   *host = NULL;
	char	   *port = NULL;
	char	   *user = NULL;
	bool		ok = false;

	if (u == NULL)
		ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));

	/* No user:password@ either: it would end up in ciflow.connections. */
	if (url != NULL &&
		strpbrk(url, " \t\r\n") == NULL &&
		curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK &&
		curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) == CURLUE_OK &&
		curl_url_get(u, CURLUPART_HOST, &host, 0) == CURLUE_OK &&
		curl_url_get(u, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT) == CURLUE_OK &&
		SchemeIn(scheme, schemes) &&
		host[0] != '\0' &&
		curl_url_get(u, CURLUPART_USER, &user, 0) == CURLUE_NO_USER)
	{
		ok = true;
		if (origin != NULL)
		{
			char	   *o = psprintf("%s://%s:%s", scheme, host, port);
			char	   *p;

			for (p = o; *p; p++)
				*p = pg_tolower((unsigned char) *p);
			*origin = o;
		}
	}
	curl_free(scheme);
	curl_free(host);
	curl_free(port);
	curl_free(user);
	curl_url_cleanup(u);
	return ok;
}

char *
CiflowResolveUrl(const char *base, const char *ref)
{
	CURLU	   *u;
	char	   *out = NULL;
	char	   *result = NULL;

	/* An absolute link is followed verbatim: libcurl must not rewrite it. */
	if (pg_strncasecmp(ref, "http://", 7) == 0 ||
		pg_strncasecmp(ref, "https://", 8) == 0)
		return pstrdup(ref);

	u = curl_url();
	if (u == NULL)
		ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
	if (curl_url_set(u, CURLUPART_URL, base, 0) == CURLUE_OK &&
		curl_url_set(u, CURLUPART_URL, ref, 0) == CURLUE_OK &&
		curl_url_get(u, CURLUPART_URL, &out, 0) == CURLUE_OK)
		result = pstrdup(out);
	curl_free(out);
	curl_url_cleanup(u);
	return result;
}

/* "." or "..", also spelled with %2e, which a server may decode first. */
static bool
IsDotSegment(const char *seg, size_t len)
{
	int			dots = 0;
	size_t		i = 0;

	while (i < len)
	{
		if (seg[i] == '.')
			i++;
		else if (len - i >= 3 && seg[i] == '%' && seg[i + 1] == '2' &&
				 (seg[i + 2] == 'e' || seg[i + 2] == 'E'))
			i += 3;
		else
			return false;
		dots++;
	}
	return dots == 1 || dots == 2;
}

bool
CiflowUrlIsPlain(const char *url)
{
	const char *path;

	if (strpbrk(url, "?#") != NULL)
		return false;
	path = strstr(url, "://");
	if (path == NULL)
		return false;
	path = strchr(path + 3, '/');
	while (path != NULL)
	{
		const char *seg = path + 1;
		const char *end = strchr(seg, '/');
		size_t		len = end ? (size_t) (end - seg) : strlen(seg);

		if (IsDotSegment(seg, len))
			return false;
		path = end;
	}
	return true;
}

char *
CiflowPathSegment(const char *s, const char *what)
{
	if (s == NULL || s[0] == '\0' || IsDotSegment(s, strlen(s)))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s \"%s\" cannot be part of a URL path", what, s ? s : ""),
				 errdetail("It must not be empty, \".\" or \"..\".")));
	return CiflowUrlEncode(s);
}

bool
CiflowIsPathSegment(const char *s)
{
	return s != NULL && s[0] != '\0' && !IsDotSegment(s, strlen(s));
}

char *
CiflowUrlEncode(const char *s)
{
	static const char hex[] = "0123456789ABCDEF";
	StringInfoData out;
	const unsigned char *p;

	initStringInfo(&out);
	for (p = (const unsigned char *) s; *p; p++)
	{
		if ((*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') ||
			(*p >= '0' && *p <= '9') ||
			*p == '-' || *p == '.' || *p == '_' || *p == '~')
			appendStringInfoChar(&out, (char) *p);
		else
		{
			appendStringInfoChar(&out, '%');
			appendStringInfoChar(&out, hex[*p >> 4]);
			appendStringInfoChar(&out, hex[*p & 0x0F]);
		}
	}
	return out.data;
}
