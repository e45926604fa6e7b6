/*-------------------------------------------------------------------------
 *
 * request.c
 *	  The one request path every call takes: credentials (only to the
 *	  connection's own host), the transfer, the retry policy, and the
 *	  mapping of failures to ERRORs with SQLSTATE, DETAIL and HINT.
 *
 *	  A request is started (its first attempt put on the wire) and finished
 *	  (the answer awaited, judged, retried as often as the policy allows),
 *	  so that a caller can work while an answer comes; every attempt, the
 *	  first one included, takes its slot of the call limit when it starts.
 *	  An attempt's credential headers exist only while the attempt is
 *	  being started: http.c holds its own copies until the transfer ends.
 *
 *	  It decides what a status means; it does not know what the caller
 *	  asked for (the caller passes the error message that says so), it
 *	  never parses pages or metadata, and it does not talk to libcurl.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <time.h>

#include "common/pg_prng.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/latch.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "ciflow.h"
#include "http.h"
#include "ratelimit.h"
#include "request.h"

#define SERVICE_MESSAGE_MAX 200

static CiflowTokenSource token_source = NULL;

void
CiflowSetTokenSource(CiflowTokenSource source)
{
	token_source = source;
}

/* A token from a token endpoint can be renewed; a static one cannot. */
static bool
TokenRenewable(const CiflowConnection *conn)
{
	return conn->bearer_token == NULL && conn->token_url != NULL;
}

static const char *
MemberString(json_t *obj, const char *key)
{
	json_t	   *v = json_object_get(obj, key);

	return json_is_string(v) ? json_string_value(v) : NULL;
}

/*
 * The service's own words for an error: the first of error.message,
 * message, error_description (Entra), error.code, errorCode, error, and
 * else the first bytes of the body, made safe to print.
 */
char *
CiflowServiceMessage(const char *body, size_t len)
{
	json_t	   *root;
	const char *msg = NULL;
	char	   *result = NULL;

	if (len == 0)
		return pstrdup("(empty body)");

	root = json_loadb(body, len, 0, NULL);
	if (root != NULL && json_is_object(root))
	{
		json_t	   *err = json_object_get(root, "error");

		if (json_is_object(err))
			msg = MemberString(err, "message");
		if (msg == NULL)
			msg = MemberString(root, "message");
		if (msg == NULL)
			msg = MemberString(root, "error_description");
		if (msg == NULL && json_is_object(err))
			msg = MemberString(err, "code");
		if (msg == NULL)
			msg = MemberString(root, "errorCode");
		if (msg == NULL)
			msg = MemberString(root, "error");
		if (msg != NULL)
		{
			/* Entra appends trace ids and timestamps on further lines. */
			result = pnstrdup(msg, strcspn(msg, "\r\n"));
			if (strlen(result) > SERVICE_MESSAGE_MAX * 4)
				result[pg_mbcliplen(result, strlen(result), SERVICE_MESSAGE_MAX * 4)] = '\0';
		}
	}
	if (root)
		json_decref(root);

	if (result == NULL)
	{
		size_t		n = Min(len, SERVICE_MESSAGE_MAX);
		size_t		i;

		result = pnstrdup(body, n);
		for (i = 0; i < n; i++)
		{
			unsigned char c = (unsigned char) result[i];

			/* HTML, binary or cut-off UTF-8 must not break the message. */
			if (c < 0x20 || c >= 0x80)
				result[i] = (c == '\n' || c == '\r' || c == '\t') ? ' ' : '?';
		}
		if (len > n)
			result = psprintf("%s...", result);
	}
	return result;
}

/* A 401 from the API gateway (bad key) carries {"statusCode":401,...}. */
static bool
IsGatewayBody(const char *body, size_t len)
{
	json_t	   *root = json_loadb(body, len, 0, NULL);
	bool		result;

	result = root != NULL && json_is_object(root) &&
		json_object_get(root, "statusCode") != NULL;
	if (root)
		json_decref(root);
	return result;
}

static int
StatusSqlstate(long status)
{
	switch (status)
	{
		case 400:
			return ERRCODE_INVALID_PARAMETER_VALUE;
		case 401:
			return ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION;
		case 403:
			return ERRCODE_INSUFFICIENT_PRIVILEGE;
		case 404:
			return ERRCODE_UNDEFINED_OBJECT;
		case 406:
		case 409:
			return ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE;
		case 429:
			return ERRCODE_CONFIGURATION_LIMIT_EXCEEDED;
		default:
			if (status >= 500)
				return ERRCODE_CONNECTION_FAILURE;
			if (status >= 400)
				return ERRCODE_INVALID_PARAMETER_VALUE;
			return ERRCODE_PROTOCOL_VIOLATION;
	}
}

static const char *
StatusHint(const CiflowRequest *req, long status, bool gateway)
{
	switch (status)
	{
		case 401:
			if (gateway)
				return "Check the connection's subscription_key.";
			return "Check the connection's token_url, client_id, client_secret and scope, or its bearer_token.";
		case 403:
			return "The application needs the Customer Insights API permission and must be a user of the instance.";
		case 404:
			return req->not_found_hint;
		case 429:
			return "The service keeps rate limiting: lower the connection's max_calls or try again later.";
		default:
			if (status >= 500)
				return "The service keeps failing; ciflow.max_attempts sets how often a call is tried.";
			return NULL;
	}
}

static void
ReportStatus(const CiflowRequest *req, long status, const char *body,
			 size_t len, int attempts, bool gateway)
{
	char	   *msg = CiflowServiceMessage(body, len);
	const char *hint = StatusHint(req, status, gateway);

	ereport(ERROR,
			(errcode(StatusSqlstate(status)),
			 errmsg("%s", req->failmsg),
			 attempts > 1 ?
			 errdetail("%sHTTP status %ld after %d attempts: %s",
					   req->detail_prefix ? req->detail_prefix : "",
					   status, attempts, msg) :
			 errdetail("%sHTTP status %ld: %s",
					   req->detail_prefix ? req->detail_prefix : "",
					   status, msg),
			 hint ? errhint("%s", hint) : 0));
}

static void
ReportTransport(const CiflowRequest *req, const CiflowTransfer *t, int attempts)
{
	const char *prefix = req->detail_prefix ? req->detail_prefix : "";

	switch (t->error)
	{
		case CIFLOW_TRANSPORT_TOO_LARGE:
			ereport(ERROR,
					(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
					 errmsg("%s", req->failmsg),
					 errdetail("%sThe response is larger than ciflow.max_response_size (%d kB).",
							   prefix, ciflow_settings.max_response_kb),
					 errhint("Lower the connection's page_size or raise ciflow.max_response_size.")));
			break;
		case CIFLOW_TRANSPORT_TLS:
			ereport(ERROR,
					(errcode(ERRCODE_CONNECTION_FAILURE),
					 errmsg("%s", req->failmsg),
					 errdetail("%sTLS failure: %s", prefix, t->error_text),
					 errhint("The server's certificate must be signed by a CA in the system bundle or in the connection's ca_file.")));
			break;
		default:
			ereport(ERROR,
					(errcode(ERRCODE_CONNECTION_FAILURE),
					 errmsg("%s", req->failmsg),
					 errdetail("%s%s after %d attempt%s: %s", prefix,
							   t->error == CIFLOW_TRANSPORT_TIMEOUT ?
							   "Timed out" : "Transport failure",
							   attempts, attempts == 1 ? "" : "s", t->error_text),
					 errhint("Check that the service is reachable; ciflow.connect_timeout and ciflow.request_timeout bound each call.")));
	}
}

/* Retry-After is whole seconds or an HTTP-date; -1 when absent or unreadable. */
int64
CiflowRetryAfterMs(const char *value)
{
	char	   *end;
	long		secs;

	if (value == NULL)
		return -1;
	while (*value == ' ')
		value++;
	secs = strtol(value, &end, 10);
	if (end != value && (*end == '\0' || *end == ' ' || *end == '\r'))
		return (int64) Max(secs, 0) * 1000;
	{
		time_t		when = CiflowHttpDate(value);

		if (when == -1)
			return -1;
		return (int64) Max(when - time(NULL), 0) * 1000;
	}
}

/* base * 2^(attempt-1), +-25% jitter, so that many clients do not align. */
int64
CiflowBackoffMs(int attempt)
{
	double		delay = ciflow_settings.retry_base_delay_ms;
	int			i;

	for (i = 1; i < attempt && delay < 600000.0; i++)
		delay *= 2;
	delay = Min(delay, 600000.0);
	return (int64) (delay * (0.75 + 0.5 * pg_prng_double(&pg_global_prng_state)));
}

/* Sleeps on the latch, so a cancel or a terminate ends the wait at once. */
static void
WaitMs(int64 ms)
{
	TimestampTz deadline = GetCurrentTimestamp() + ms * 1000;

	for (;;)
	{
		long		left;

		CHECK_FOR_INTERRUPTS();
		left = (long) ((deadline - GetCurrentTimestamp()) / 1000);
		if (left <= 0)
			break;
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 left, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}

static void
AddHeader(CiflowTransfer *t, char *header)
{
	Assert(t->nheaders < CIFLOW_HTTP_MAX_HEADERS);
	t->headers[t->nheaders++] = header;
}

/*
 * A request between its start and its finish.  req's strings are copied
 * (a caller may build them in a context it resets before the finish), but
 * not body, conn and stats, whose owners keep them: the body may be a form
 * with the client secret, and conn holds the credentials.
 */
struct CiflowPendingRequest
{
	CiflowRequest req;
	MemoryContext cxt;			/* of the start: every attempt's answer */
	CiflowTransfer t;			/* the attempt in flight */
	bool		in_flight;		/* t is started and not finished */
	int			attempt;		/* attempts counted against the policy */
	bool		token_renewed;	/* the one renewal after a 401 is spent */
};

static char *
CopyString(const char *s)
{
	return s ? pstrdup(s) : NULL;
}

static void
FreeString(const char *s)
{
	if (s)
		pfree((char *) s);
}

/*
 * Starts one attempt: credentials, a slot of the call limit, the transfer
 * on the wire.  The credential headers exist only inside this function and
 * are wiped on the way out, also when the wait for a slot or the start is
 * interrupted: http.c copied them into the transfer and wipes its copies
 * when the transfer ends.
 */
static void
StartAttempt(CiflowPendingRequest *p, bool force_new_token)
{
	const CiflowRequest *req = &p->req;
	const CiflowConnection *conn = req->conn;
	CiflowTransfer *t = &p->t;
	char	   *volatile token = NULL;
	char	   *volatile auth_header = NULL;
	char	   *volatile key_header = NULL;
	MemoryContext old = MemoryContextSwitchTo(p->cxt);

	memset(t, 0, sizeof(*t));
	t->method = req->method ? req->method : "GET";
	t->url = req->url;
	t->body = req->body;
	t->ca_file = conn->ca_file;

	PG_TRY();
	{
		if (req->api_call)
		{
			Assert(token_source != NULL);
			token = token_source(conn, force_new_token, req->failmsg);
			AddHeader(t, req->accept ? psprintf("Accept: %s", req->accept) :
					  "Accept: application/json;odata.metadata=minimal;IEEE754Compatible=true");
			if (token != NULL)
			{
				auth_header = psprintf("Authorization: Bearer %s", token);
				AddHeader(t, auth_header);
			}
			if (conn->subscription_key != NULL)
			{
				key_header = psprintf("Ocp-Apim-Subscription-Key: %s",
									  conn->subscription_key);
				AddHeader(t, key_header);
			}
			if (conn->flavor == CIFLOW_FLAVOR_DATAVERSE)
			{
				AddHeader(t, "OData-Version: 4.0");
				AddHeader(t, "OData-MaxVersion: 4.0");
			}
			if (req->prefer != NULL)
				AddHeader(t, psprintf("Prefer: %s", req->prefer));
		}
		else
		{
			AddHeader(t, "Accept: application/json");
			if (req->body != NULL)
				AddHeader(t, "Content-Type: application/x-www-form-urlencoded");
		}

		/* Every attempt is a call: retries count against the limit too. */
		if (req->api_call)
			CiflowRateLimitAcquire(conn);
		if (req->stats)
		{
			req->stats->calls++;
			/* A transport failure has no status: never report an older one. */
			req->stats->last_status = 0;
		}
		elog(DEBUG1, "ciflow: %s %s (attempt %d)", t->method,
			 req->api_call ? req->url : "token endpoint", p->attempt);
		CiflowHttpStart(t);
		p->in_flight = true;
	}
	PG_CATCH();
	{
		CiflowFreeSecret(token);
		CiflowFreeSecret(auth_header);
		CiflowFreeSecret(key_header);
		MemoryContextSwitchTo(old);
		PG_RE_THROW();
	}
	PG_END_TRY();
	CiflowFreeSecret(token);
	CiflowFreeSecret(auth_header);
	CiflowFreeSecret(key_header);
	/* The pointers were into the wiped strings: nothing may use them. */
	memset(t->headers, 0, sizeof(t->headers));
	t->nheaders = 0;
	MemoryContextSwitchTo(old);
}

CiflowPendingRequest *
CiflowRequestStart(const CiflowRequest *req)
{
	const CiflowConnection *conn = req->conn;
	CiflowPendingRequest *p;

	if (req->api_call)
	{
		char	   *origin = NULL;

		if (!CiflowParseUrl(req->url, &origin) || strcmp(origin, conn->origin) != 0)
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("%s", req->failmsg),
					 errdetail("Refusing to send the connection's credentials to %s, which is not the connection's host %s.",
							   origin ? origin : "an invalid URL", conn->origin)));
	}

	p = palloc0(sizeof(CiflowPendingRequest));
	p->req = *req;
	p->req.method = CopyString(req->method);
	p->req.url = CopyString(req->url);
	p->req.prefer = CopyString(req->prefer);
	p->req.accept = CopyString(req->accept);
	p->req.failmsg = CopyString(req->failmsg);
	p->req.detail_prefix = CopyString(req->detail_prefix);
	p->req.not_found_hint = CopyString(req->not_found_hint);
	p->cxt = CurrentMemoryContext;

	CHECK_FOR_INTERRUPTS();
	p->attempt = 1;
	StartAttempt(p, false);
	return p;
}

/* What is left of a pending request once its answer is out. */
static void
FreePending(CiflowPendingRequest *p)
{
	FreeString(p->req.method);
	FreeString(p->req.url);
	FreeString(p->req.prefer);
	FreeString(p->req.accept);
	FreeString(p->req.failmsg);
	FreeString(p->req.detail_prefix);
	FreeString(p->req.not_found_hint);
	pfree(p);
}

/* The answer of the last attempt, handed over with its body. */
static CiflowResponse
Answer(CiflowPendingRequest *p)
{
	CiflowResponse resp;

	resp.status = p->t.status;
	resp.body = p->t.body_out;
	resp.len = p->t.body_len;
	FreePending(p);
	return resp;
}

CiflowResponse
CiflowRequestFinish(CiflowPendingRequest *p)
{
	const CiflowRequest *req = &p->req;
	const CiflowConnection *conn = req->conn;
	CiflowTransfer *t = &p->t;

	if (!p->in_flight)
		elog(ERROR, "ciflow: finishing a request that is not pending");

	for (;;)
	{
		bool		force_new_token = false;
		int64		wait_ms = 0;

		/* Spent whatever happens: http.c releases the transfer on error. */
		p->in_flight = false;
		CiflowHttpFinish(t);

		if (t->error != CIFLOW_TRANSPORT_OK)
		{
			/* Size and certificate problems do not go away by trying again. */
			if (t->error == CIFLOW_TRANSPORT_TOO_LARGE ||
				t->error == CIFLOW_TRANSPORT_TLS ||
				p->attempt >= ciflow_settings.max_attempts)
				ReportTransport(req, t, p->attempt);
			wait_ms = CiflowBackoffMs(p->attempt);
		}
		else
		{
			if (req->stats)
				req->stats->last_status = (int) t->status;

			if (t->status >= 200 && t->status < 300)
				return Answer(p);

			if (t->status == 401 && req->api_call)
			{
				bool		gateway = IsGatewayBody(t->body_out, t->body_len);

				/*
				 * A rejected token is renewed once, at once and without
				 * counting an attempt; a rejected key is final.
				 */
				if (!gateway && !p->token_renewed && TokenRenewable(conn))
				{
					p->token_renewed = true;
					force_new_token = true;
				}
				else
					ReportStatus(req, t->status, t->body_out, t->body_len,
								 p->attempt, gateway);
			}
			else if (t->status == 429 || t->status == 503)
			{
				if (p->attempt >= ciflow_settings.max_attempts)
					ReportStatus(req, t->status, t->body_out, t->body_len,
								 p->attempt, false);
				wait_ms = CiflowRetryAfterMs(t->retry_after);
				if (wait_ms < 0)
					wait_ms = CiflowBackoffMs(p->attempt);
				wait_ms = Min(wait_ms, (int64) ciflow_settings.max_retry_after_s * 1000);
			}
			else if (t->status == 500 || t->status == 502 || t->status == 504)
			{
				if (p->attempt >= ciflow_settings.max_attempts)
					ReportStatus(req, t->status, t->body_out, t->body_len,
								 p->attempt, false);
				wait_ms = CiflowBackoffMs(p->attempt);
			}
			else if (req->return_refusal && t->status >= 400 && t->status < 500)
				return Answer(p);
			else
				ReportStatus(req, t->status, t->body_out, t->body_len,
							 p->attempt, false);
		}

		if (req->stats)
			req->stats->retries++;
		if (t->body_out)
			pfree(t->body_out);
		if (!force_new_token)
		{
			elog(DEBUG1, "ciflow: retrying in %lld ms", (long long) wait_ms);
			WaitMs(wait_ms);
			p->attempt++;
		}
		CHECK_FOR_INTERRUPTS();
		StartAttempt(p, force_new_token);
	}
}

CiflowResponse
CiflowRequestPerform(const CiflowRequest *req)
{
	return CiflowRequestFinish(CiflowRequestStart(req));
}

void
CiflowReframeError(ErrorData *edata, const char *failmsg)
{
	StringInfoData detail;

	if (edata->message != NULL && strcmp(edata->message, failmsg) == 0)
		return;
	initStringInfo(&detail);
	appendStringInfoString(&detail, edata->message ? edata->message : "unknown error");
	if (edata->detail)
		appendStringInfo(&detail, "; %s", edata->detail);
	/* A statement of ciflow's own is not the user's business. */
	if (edata->context && strncmp(edata->context, "SQL statement", 13) != 0)
		appendStringInfo(&detail, "; %.*s", (int) strcspn(edata->context, "\n"),
						 edata->context);
	edata->message = pstrdup(failmsg);
	edata->detail = detail.data;
	edata->context = NULL;
}

void
CiflowRethrowUnder(MemoryContext cxt, const char *failmsg)
{
	ErrorData  *edata;

	MemoryContextSwitchTo(cxt);
	edata = CopyErrorData();
	FlushErrorState();
	CiflowReframeError(edata, failmsg);
	ReThrowError(edata);
}

json_t *
CiflowParseJson(const char *body, size_t len, const char *failmsg)
{
	json_error_t jerr;
	json_t	   *root;

	/*
	 * NULs are allowed here and refused, with their own SQLSTATE, by the
	 * loader.
	 */
	root = json_loadb(body, len, JSON_ALLOW_NUL, &jerr);
	if (root == NULL && strstr(jerr.text, "too big integer") != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
				 errmsg("%s", failmsg),
				 errdetail("A number in the response does not fit in 64 bits (line %d, column %d).",
						   jerr.line, jerr.column),
				 errhint("Larger numbers must come as strings, as IEEE754Compatible=true asks.")));
	if (root == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_JSON_TEXT),
				 errmsg("%s", failmsg),
				 errdetail("The response (%zu bytes) is not valid JSON: %s at line %d, column %d.",
						   len, jerr.text, jerr.line, jerr.column),
				 errhint("Check that base_url points at the service's API.")));
	return root;
}

void
CiflowRaiseRefusal(const CiflowRequest *req, const CiflowResponse *resp)
{
	ReportStatus(req, resp->status, resp->body, resp->len, 1, false);
	pg_unreachable();
}

json_t *
CiflowRequestJson(const CiflowRequest *req)
{
	CiflowResponse resp = CiflowRequestPerform(req);
	json_t	   *root;

	if (resp.status >= 400)
	{
		pfree(resp.body);
		return NULL;
	}
	root = CiflowParseJson(resp.body, resp.len, req->failmsg);
	pfree(resp.body);
	return root;
}
