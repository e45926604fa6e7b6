/*-------------------------------------------------------------------------
 *
 * pageparse.h
 *	  One page of an entity, read straight from the response buffer: each
 *	  row's fields go to a sink as the parser meets them, and the page's
 *	  annotations are kept.  No document tree is built.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CIFLOW_PAGEPARSE_H
#define CIFLOW_PAGEPARSE_H

#include "common/jsonapi.h"

/*
 * What the loader does with a row.  field is the attribute's name as sent.
 * A scalar's token is de-escaped for a string, the lexeme otherwise, and
 * NULL for JSON null; a composite (object or array) value comes as its
 * JSON text, json[0 .. len).  Both are valid only during the call: the
 * sink copies what it keeps.  It may raise an ERROR.
 */
typedef struct CiflowRowSink
{
	void	   *arg;
	void		(*row_start) (void *arg);
	void		(*scalar) (void *arg, const char *field, char *token, JsonTokenType type);
	void		(*composite) (void *arg, const char *field, const char *json, int len);
	void		(*row_end) (void *arg);
} CiflowRowSink;

/* A page's own annotations; strings in the memory context of the parse. */
typedef struct CiflowPageInfo
{
	int			rows;			/* elements of "value" */
	char	   *next_link;		/* @odata.nextLink, or NULL */
	char	   *delta_link;		/* @odata.deltaLink, or NULL */
	int64		count;			/* @odata.count, or -1 */
} CiflowPageInfo;

/*
 * Parses body[0 .. len) (UTF-8, as the service sends it; NUL-terminated at
 * len) as an OData collection page: {"value": [row, ...], annotations}.
 * Errors (not JSON, invalid UTF-8, no "value" array, a row that is not an
 * object) are raised under failmsg.  Memory allocated by the parse itself
 * is freed row by row.  The body is the parse's to write: its strings are
 * ended in place, so it is of no use afterwards.
 */
extern void CiflowParsePage(char *body, size_t len, const CiflowRowSink *sink,
							CiflowPageInfo *info, const char *failmsg);

/*
 * A single JSON value (a test or a small document): a scalar goes to
 * scalar, a composite to composite, with field NULL.
 */
extern void CiflowParseValue(char *json, size_t len, const CiflowRowSink *sink,
							 const char *failmsg);

#endif							/* CIFLOW_PAGEPARSE_H */
