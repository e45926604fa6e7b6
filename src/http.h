/*-------------------------------------------------------------------------
 *
 * http.h
 *	  One HTTP transfer through libcurl.  Nothing else in ciflow talks to
 *	  libcurl; retries and error reporting belong to request.c.
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

typedef struct CiflowTransfer
{
	/* request */
	const char *method;			/* "GET" or "POST" */
	const char *url;
	const char *body;			/* POST body or NULL */
	const char *headers[CIFLOW_HTTP_MAX_HEADERS];
	int			nheaders;
	const char *ca_file;		/* extra CA bundle or NULL */

	/* response, allocated in the caller's memory context */
	CiflowTransportError error;
	char		error_text[256];	/* libcurl's words for a transport error */
	long		status;
	char	   *body_out;		/* NUL-terminated; may contain NULs before */
	size_t		body_len;
	char	   *content_type;	/* or NULL */
	char	   *retry_after;	/* Retry-After header value or NULL */
	bool		www_authenticate;	/* a WWW-Authenticate header came back */
} CiflowTransfer;

/* Performs the transfer; interrupts (cancel, terminate) are raised as usual. */
extern void CiflowHttpTransfer(CiflowTransfer *t);

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
