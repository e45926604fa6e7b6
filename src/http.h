/*-------------------------------------------------------------------------
 *
 * http.h
 *	  HTTP transfers through libcurl: one at a time (CiflowHttpTransfer) or
 *	  started now and finished later (CiflowHttpStart, CiflowHttpFinish), so
 *	  that a caller can receive one response while it works on another.
 *	  Nothing else in ciflow talks to libcurl; credentials, retries and
 *	  error reporting belong to request.c.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CIFLOW_HTTP_H
#define CIFLOW_HTTP_H

#define CIFLOW_HTTP_MAX_HEADERS 8

typedef enum CiflowTransportError
{
	CIFLOW_TRANSPORT_OK,
	CIFLOW_TRANSPORT_FAILED,	/* connect error, reset, cut-short body */
	CIFLOW_TRANSPORT_TIMEOUT,
	CIFLOW_TRANSPORT_TLS,		/* certificate or handshake failure */
	CIFLOW_TRANSPORT_TOO_LARGE	/* over ciflow.max_response_size */
} CiflowTransportError;

/* A transfer in flight; private to http.c. */
typedef struct CiflowHttpSlot CiflowHttpSlot;

typedef struct CiflowTransfer
{
	/*
	 * request: copied at the start, except body, which libcurl reads in
	 * place and must outlive the transfer (it may hold a secret: not copied)
	 */
	const char *method;			/* "GET" or "POST" */
	const char *url;
	const char *body;			/* POST body or NULL */
	const char *headers[CIFLOW_HTTP_MAX_HEADERS];
	int			nheaders;
	const char *ca_file;		/* extra CA bundle or NULL */

	/*
	 * set by CiflowHttpStart, cleared when the transfer is finished; the
	 * ticket tells this transfer from a later one in the same slot
	 */
	CiflowHttpSlot *slot;
	uint64		ticket;

	/*
	 * response, filled by CiflowHttpFinish and allocated in the memory
	 * context that was current at CiflowHttpStart
	 */
	CiflowTransportError error;
	char		error_text[256];	/* libcurl's words for a transport error */
	long		status;
	char	   *body_out;		/* NUL-terminated; may contain NULs before */
	size_t		body_len;
	char	   *content_type;	/* or NULL */
	char	   *retry_after;	/* Retry-After header value or NULL */
	bool		www_authenticate;	/* a WWW-Authenticate header came back */
} CiflowTransfer;

/*
 * Every transfer runs in one libcurl multi handle per process, so that
 * keep-alive connections are shared, with a handle of its own from a small
 * pool (CIFLOW_HTTP_MAX_PENDING), so that a second transfer (a token, a
 * metadata call) can run while a first is pending.
 *
 * CiflowHttpStart sets the transfer up, adds it and drives it as far as it
 * goes without blocking, then returns.  Until CiflowHttpFinish, the body
 * arrives into a buffer in the memory context current at the start,
 * whenever any transfer is driven (a start, or a wait in
 * CiflowHttpFinish).  Raises an ERROR only when no handle can be had;
 * then nothing is left in flight.
 *
 * A started transfer must be finished.  If that memory
 * context is reset or deleted first (an ERROR whose cleanup drops the
 * context, say), the transfer is cancelled then: no handle stays in the
 * multi handle and libcurl's copies of the headers are wiped.
 *
 * ciflow.request_timeout counts from the start, as before: a caller that
 * works longer than that between the start and the finish times its
 * transfer out, whether or not the answer has arrived.
 */
#define CIFLOW_HTTP_MAX_PENDING 4

extern void CiflowHttpStart(CiflowTransfer *t);

/*
 * Waits, on the latch and the transfers' sockets, until the transfer is
 * complete and fills its response, as CiflowHttpTransfer does.  A cancel
 * or terminate is raised within a fraction of a second; the transfer is
 * then cancelled.  A failed transfer is reported in t->error, never raised.
 */
extern void CiflowHttpFinish(CiflowTransfer *t);

/* Start and finish; interrupts (cancel, terminate) are raised as usual. */
extern void CiflowHttpTransfer(CiflowTransfer *t);

/* An HTTP-date (RFC 9110) as a time_t, -1 when it is not one. */
extern time_t CiflowHttpDate(const char *value);

/*
 * Parses an http(s) URL.  Returns false for anything else.  *origin gets
 * "scheme://host:port" (lower case, default port filled in).
 */
extern bool CiflowParseUrl(const char *url, char **origin);

/* The same for a URL whose scheme is one of schemes (NULL-terminated). */
extern bool CiflowParseUrlSchemes(const char *url, const char *const *schemes,
								  char **origin);

/* Resolves a possibly relative reference against base (RFC 3986). */
extern char *CiflowResolveUrl(const char *base, const char *ref);

/* No query, no fragment, no "." or ".." path segment (even as %2e). */
extern bool CiflowUrlIsPlain(const char *url);

/* Whether s can be one path segment: not empty, ".", or "..". */
extern bool CiflowIsPathSegment(const char *s);

/*
 * s percent-encoded as one path segment ("/" included); 22023 naming what
 * it is when it cannot be one.
 */
extern char *CiflowPathSegment(const char *s, const char *what);

/* Percent-encodes everything but RFC 3986 unreserved characters. */
extern char *CiflowUrlEncode(const char *s);

#endif							/* CIFLOW_HTTP_H */
