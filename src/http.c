/*-------------------------------------------------------------------------
 *
 * http.c
 *	  One HTTP transfer through libcurl, interruptible and bounded, and the
 *	  URL helpers that need libcurl's parser.
 *
 *	  This is the only file that talks to libcurl.  It knows nothing about
 *	  credentials, retries or the service's error bodies (request.c owns
 *	  those) and never raises an ERROR for a failed transfer: it reports
 *	  what happened and lets the request path decide.  The one exception is
 *	  an interrupt, which is raised as PostgreSQL always raises it.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <curl/curl.h>

#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "utils/memutils.h"

#include "ciflow.h"
#include "http.h"

/* One easy handle per process, so keep-alive connections are reused. */
static CURL *curl_handle = NULL;

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
 * Runs inside libcurl, so it must not ereport: a longjmp would leave the
 * handle mid-transfer.  Allocation failures and the size limit abort the
 * transfer instead and are reported after curl_easy_perform returns.
 */
static size_t
WriteBody(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	BodyBuffer *buf = (BodyBuffer *) userdata;
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

		newcap = Max(newcap, 16384);
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
 * libcurl calls this often during a transfer, also while it waits for
 * data; a cancel or terminate request stops the transfer within a fraction
 * of a second and is raised once libcurl has returned.
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

static CURL *
GetHandle(void)
{
	if (curl_handle == NULL)
	{
		curl_handle = curl_easy_init();
		if (curl_handle == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY),
					 errmsg("ciflow: could not create an HTTP handle")));
	}
	else
		curl_easy_reset(curl_handle);
	return curl_handle;
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

void
CiflowHttpTransfer(CiflowTransfer *t)
{
	CURL	   *h = GetHandle();
	struct curl_slist *headers = NULL;
	char		errbuf[CURL_ERROR_SIZE];
	BodyBuffer	buf;
	CURLcode	rc;
	int			i;

	memset(&buf, 0, sizeof(buf));
	buf.cxt = CurrentMemoryContext;
	buf.limit = (size_t) ciflow_settings.max_response_kb * 1024;
	errbuf[0] = '\0';

	t->error = CIFLOW_TRANSPORT_OK;
	t->error_text[0] = '\0';
	t->status = 0;
	t->body_out = NULL;
	t->body_len = 0;
	t->content_type = NULL;
	t->retry_after = NULL;
	t->www_authenticate = false;

	for (i = 0; i < t->nheaders; i++)
	{
		struct curl_slist *next = curl_slist_append(headers, t->headers[i]);

		if (next == NULL)
		{
			curl_slist_free_all(headers);
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY),
					 errmsg("out of memory")));
		}
		headers = next;
	}

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
	curl_easy_setopt(h, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t) buf.limit);
	curl_easy_setopt(h, CURLOPT_TCP_KEEPALIVE, 1L);
	curl_easy_setopt(h, CURLOPT_ACCEPT_ENCODING, "");
	curl_easy_setopt(h, CURLOPT_USERAGENT, "ciflow/0.1");
	curl_easy_setopt(h, CURLOPT_SSL_VERIFYPEER, 1L);
	curl_easy_setopt(h, CURLOPT_SSL_VERIFYHOST, 2L);
	if (t->ca_file != NULL)
		curl_easy_setopt(h, CURLOPT_CAINFO, t->ca_file);
	curl_easy_setopt(h, CURLOPT_HTTPHEADER, headers);
	curl_easy_setopt(h, CURLOPT_ERRORBUFFER, errbuf);
	curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, WriteBody);
	curl_easy_setopt(h, CURLOPT_WRITEDATA, &buf);
	curl_easy_setopt(h, CURLOPT_NOPROGRESS, 0L);
	curl_easy_setopt(h, CURLOPT_XFERINFOFUNCTION, CheckInterrupts);
	if (t->method != NULL && strcmp(t->method, "POST") == 0)
	{
		curl_easy_setopt(h, CURLOPT_POST, 1L);
		curl_easy_setopt(h, CURLOPT_POSTFIELDS, t->body ? t->body : "");
		curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE,
						 (long) (t->body ? strlen(t->body) : 0));
	}
	else
		curl_easy_setopt(h, CURLOPT_HTTPGET, 1L);

	rc = curl_easy_perform(h);

	/*
	 * The header list holds libcurl's copies of the credentials: wiped and
	 * gone before anything can fail.
	 */
	curl_easy_setopt(h, CURLOPT_HTTPHEADER, NULL);
	WipeHeaderList(headers);
	curl_slist_free_all(headers);

	if (rc == CURLE_ABORTED_BY_CALLBACK)
	{
		CHECK_FOR_INTERRUPTS();
		/* An interrupt that raised nothing: report a plain failure. */
		t->error = CIFLOW_TRANSPORT_FAILED;
		strlcpy(t->error_text, "transfer interrupted", sizeof(t->error_text));
		return;
	}
	if (rc != CURLE_OK)
	{
		if (buf.out_of_memory)
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY),
					 errmsg("out of memory"),
					 errdetail("Failed while receiving a response of %zu bytes.",
							   buf.len)));
		t->error = buf.too_large ? CIFLOW_TRANSPORT_TOO_LARGE : ClassifyCurlError(rc);
		strlcpy(t->error_text, errbuf[0] ? errbuf : curl_easy_strerror(rc),
				sizeof(t->error_text));
		if (buf.data)
			pfree(buf.data);
		return;
	}

	curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &t->status);
	{
		char	   *ct = NULL;

		if (curl_easy_getinfo(h, CURLINFO_CONTENT_TYPE, &ct) == CURLE_OK && ct)
			t->content_type = pstrdup(ct);
	}
	t->retry_after = HeaderValue(h, "Retry-After");
	{
		char	   *wa = HeaderValue(h, "WWW-Authenticate");

		t->www_authenticate = (wa != NULL);
	}
	if (buf.data == NULL)
		buf.data = palloc(1);
	buf.data[buf.len] = '\0';
	t->body_out = buf.data;
	t->body_len = buf.len;
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
