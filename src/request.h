/*-------------------------------------------------------------------------
 *
 * request.h
 *	  The one request path: credentials, transfer, retry policy, error
 *	  mapping.  Every call to the service and to the token endpoint goes
 *	  through CiflowRequestStart and CiflowRequestFinish (together:
 *	  CiflowRequestPerform).
 *
 *-------------------------------------------------------------------------
 */
#ifndef CIFLOW_REQUEST_H
#define CIFLOW_REQUEST_H

#include "ciflow_json.h"

#include "connection.h"

/* Counters a caller can keep across many requests (a sync keeps one). */
typedef struct CiflowCallStats
{
	int			calls;			/* transfers attempted */
	int			retries;		/* transfers repeated after a failure */
	int			last_status;	/* last HTTP status seen, 0 if none */
} CiflowCallStats;

typedef struct CiflowRequest
{
	const CiflowConnection *conn;
	const char *method;			/* default GET */
	const char *url;
	const char *body;			/* POST body, form-encoded */
	bool		api_call;		/* send the bearer token and subscription key */
	const char *prefer;			/* Prefer header value, or NULL */
	const char *accept;			/* Accept header value of an API call, or NULL
								 * for OData JSON (XML for $metadata) */
	const char *failmsg;		/* primary message of any error (names
								 * connection and entity) */
	const char *detail_prefix;	/* e.g. "Token endpoint: ", or NULL */
	const char *not_found_hint; /* HINT for a 404, or NULL */
	CiflowCallStats *stats;		/* may be NULL */
	bool		return_refusal; /* a 4xx other than 401 and 429 is returned,
								 * not raised: the caller knows what it means
								 * (a delta link the service no longer
								 * honours) */
} CiflowRequest;

typedef struct CiflowResponse
{
	long		status;
	char	   *body;
	size_t		len;
} CiflowResponse;

/*
 * Where an API call's bearer token comes from: auth.c registers itself at
 * load (CiflowAuthInit), so that the request path, which auth.c uses for
 * the token request, does not depend back on it.  Returns a palloc'd token
 * or NULL when the connection has none; force_new after a rejected token.
 */
typedef char *(*CiflowTokenSource) (const CiflowConnection *conn, bool force_new,
									const char *failmsg);
extern void CiflowSetTokenSource(CiflowTokenSource source);

/*
 * The service's own words for an error answer (error.message and the
 * like, else the body's first bytes), made safe to print.
 */
extern char *CiflowServiceMessage(const char *body, size_t len);

/* Returns a 2xx answer or raises an ERROR with SQLSTATE, DETAIL and HINT. */
extern CiflowResponse CiflowRequestPerform(const CiflowRequest *req);

/*
 * The same in two halves, so that a caller can receive one answer while it
 * works on another (a page while it loads the one before).
 *
 * CiflowRequestStart checks the URL, takes a slot of the call limit (it may
 * wait for one), puts the first attempt on the wire and returns at once.
 * The pending request is allocated in the current memory context and
 * copies req's strings; req->conn, req->stats and req->body (which may
 * hold a secret and is never copied) must outlive the finish.  The
 * attempt's credential headers are wiped before it returns.
 *
 * CiflowRequestFinish waits for the answer and does what
 * CiflowRequestPerform does with it: retries (each one counted against the
 * call limit and in stats), the token renewed once after a 401, the same
 * ERRORs, return_refusal.  The body is allocated in the memory context of
 * the start.  The pending request is spent afterwards, also when it raised.
 *
 * A pending request must be finished; when its memory context is reset
 * or deleted first (an ERROR whose cleanup drops it), the transfer in
 * flight is cancelled with it (the call it made still counts).
 */
typedef struct CiflowPendingRequest CiflowPendingRequest;

extern CiflowPendingRequest *CiflowRequestStart(const CiflowRequest *req);
extern CiflowResponse CiflowRequestFinish(CiflowPendingRequest *pending);

/*
 * Same, then parses the body as JSON (22032 when it is not JSON); NULL for
 * a refusal returned under return_refusal.
 */
extern json_t *CiflowRequestJson(const CiflowRequest *req);

/* Raises a refusal returned under return_refusal, as the request path would. */
extern void CiflowRaiseRefusal(const CiflowRequest *req, const CiflowResponse *resp)
			pg_attribute_noreturn();

/*
 * Errors raised below an action or a sync (a type's input function, an
 * argument check) speak of a value, not of the call.  These put the call's
 * message first and move the original message, detail and context into the
 * DETAIL, keeping SQLSTATE and HINT.  CiflowRethrowUnder is for PG_CATCH.
 */
extern void CiflowReframeError(ErrorData *edata, const char *failmsg);
extern void CiflowRethrowUnder(MemoryContext cxt, const char *failmsg) pg_attribute_noreturn();

/* Parses a complete body as JSON, raising 22032 under failmsg when it is not. */
extern json_t *CiflowParseJson(const char *body, size_t len, const char *failmsg);

/*
 * The retry policy's delays, shared with event deliveries: Retry-After
 * (whole seconds or an HTTP-date) in ms, -1 when absent or unreadable; and
 * ciflow.retry_base_delay * 2^(attempt-1) with +-25% jitter.
 */
extern int64 CiflowRetryAfterMs(const char *value);
extern int64 CiflowBackoffMs(int attempt);

#endif							/* CIFLOW_REQUEST_H */
