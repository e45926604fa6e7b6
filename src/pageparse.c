/*-------------------------------------------------------------------------
 *
 * pageparse.c
 *	  One page of an entity, read with PostgreSQL's own JSON parser
 *	  (common/jsonapi.h) straight from the response buffer.  A row's fields
 *	  go to the loader's sink as the parser meets them: no document tree,
 *	  no copy of the body, and the parser's own allocations freed row by
 *	  row, so a page costs its body and what the sink keeps of it.
 *
 *	  Measured on a 1000-row Customer page (514 kB): jansson's json_loadb
 *	  read 40 MB/s, pg_parse_json with field and scalar callbacks 250 MB/s,
 *	  and the lexer alone 670 MB/s.  PostgreSQL 15's lexer copies every
 *	  string character by character when it is asked for de-escaped
 *	  strings, so a page is lexed without them: the parser checks the
 *	  grammar and every escape, and reports where each token lies; a
 *	  field's name and scalar value are then taken from the body at those
 *	  places, and only a string that holds an escape is lexed once more,
 *	  alone, to be de-escaped by the same lexer.  jansson stays for small
 *	  documents (metadata, actions).
 *
 *	  This file knows the shape of an OData collection page ("value" and
 *	  the @odata annotations beside it), not the table's columns: which
 *	  field goes where, and how a token becomes a Datum, is the sink's.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "mb/pg_wchar.h"
#include "utils/memutils.h"

#include "pageparse.h"

/* Nesting levels as jsonapi.c counts them while a callback runs. */
#define LEVEL_TOP			0	/* the page object */
#define LEVEL_ANNOTATION	1	/* a field of the page object */
#define LEVEL_ROW			2	/* an element of "value" */
#define LEVEL_FIELD			3	/* a field of a row */

typedef enum TopField
{
	TOP_OTHER,
	TOP_VALUE,
	TOP_NEXT_LINK,
	TOP_DELTA_LINK,
	TOP_COUNT
} TopField;

typedef struct PageParse
{
	JsonLexContext *lex;
	char	   *body;			/* the page's: its strings end in place */
	const CiflowRowSink *sink;
	CiflowPageInfo *info;
	const char *failmsg;
	bool		single;			/* CiflowParseValue: one value, no page */
	MemoryContext keep_cxt;		/* the annotations' */
	MemoryContext row_cxt;		/* the parser's own strings; reset per row */
	TopField	top_field;
	bool		top_is_object;
	bool		in_value;		/* inside the "value" array */
	bool		saw_value;
	char	   *field;			/* the row field being read */
	char	   *composite_start;
} PageParse;

static void
NotARow(PageParse *pp)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_JSON_TEXT),
			 errmsg("%s", pp->failmsg),
			 errdetail("Row %d of the page is not a JSON object.", pp->info->rows + 1)));
}

static void
ReportJsonError(PageParse *pp, JsonParseErrorType rc, JsonLexContext *lex, size_t len)
{
	ereport(ERROR,
			(errcode(rc == JSON_UNICODE_CODE_POINT_ZERO ?
					 ERRCODE_UNTRANSLATABLE_CHARACTER : ERRCODE_INVALID_JSON_TEXT),
			 errmsg("%s", pp->failmsg),
			 errdetail("The response (%zu bytes) is not valid JSON: %s (line %d).",
					   len, json_errdetail(rc, lex), pp->lex->line_number),
			 errhint("Check that base_url points at the service's API.")));
}

/*
 * The string token at [start, end), quotes included, as text.  One that
 * holds no escape is its own bytes: its closing quote becomes the NUL that
 * ends it (the lexer is past it and never looks back).  One with an escape
 * is what the lexer makes of it alone, which also checks what the page's
 * lexing did not: surrogate pairs, \u0000.
 */
static char *
StringText(PageParse *pp, char *start, char *end)
{
	JsonLexContext *lex;
	JsonParseErrorType rc;

	if (memchr(start + 1, '\\', end - start - 2) == NULL)
	{
		end[-1] = '\0';
		return start + 1;
	}
	lex = makeJsonLexContextCstringLen(start, (int) (end - start), PG_UTF8, true);
	rc = json_lex(lex);
	if (rc != JSON_SUCCESS)
		ReportJsonError(pp, rc, lex, end - start);
	return lex->strval->data;
}

/*
 * The current token (a field's value, when a field starts) as a scalar's
 * text, NULL for null; *type gets its kind.  False for an object or array.
 */
static bool
ScalarToken(PageParse *pp, char **token, JsonTokenType *type)
{
	JsonLexContext *lex = pp->lex;

	*type = lex->token_type;
	switch (lex->token_type)
	{
		case JSON_TOKEN_STRING:
			*token = StringText(pp, lex->token_start, lex->token_terminator);
			return true;
		case JSON_TOKEN_NUMBER:
		case JSON_TOKEN_TRUE:
		case JSON_TOKEN_FALSE:
			*token = pnstrdup(lex->token_start, lex->token_terminator - lex->token_start);
			return true;
		case JSON_TOKEN_NULL:
			*token = NULL;
			return true;
		default:
			return false;
	}
}

/*
 * The name of the field that starts: the string token just before the
 * colon the lexer has passed (prev_token_terminator ends it).  Its opening
 * quote is the first one before it not escaped by an odd run of
 * backslashes: the lexer has already checked that the token is a string.
 */
static char *
FieldName(PageParse *pp)
{
	char	   *close = pp->lex->prev_token_terminator - 1;	/* the colon */
	char	   *open;

	Assert(*close == ':');
	do
		close--;
	while (*close == ' ' || *close == '\t' || *close == '\n' || *close == '\r');
	Assert(*close == '"');
	for (open = close - 1;; open--)
	{
		const char *b = open;

		if (*open != '"')
			continue;
		while (b > pp->body && b[-1] == '\\')
			b--;
		if ((open - b) % 2 == 0)
			break;
	}
	return StringText(pp, open, close + 1);
}

/* Where a composite value worth handing on starts. */
static int
CompositeLevel(const PageParse *pp)
{
	return pp->single ? LEVEL_TOP : LEVEL_FIELD;
}

static void
CompositeStart(PageParse *pp)
{
	int			level = pp->lex->lex_level;

	if (level == CompositeLevel(pp) && (pp->single || pp->in_value))
		pp->composite_start = pp->lex->token_start;
}

static void
CompositeEnd(PageParse *pp)
{
	int			level = pp->lex->lex_level;

	if (level == CompositeLevel(pp) && (pp->single || pp->in_value))
	{
		const char *end = pp->lex->prev_token_terminator;

		pp->sink->composite(pp->sink->arg, pp->field, pp->composite_start,
							(int) (end - pp->composite_start));
	}
}

static void
ObjectStart(void *state)
{
	PageParse  *pp = (PageParse *) state;

	if (pp->single)
	{
		CompositeStart(pp);
		return;
	}
	switch (pp->lex->lex_level)
	{
		case LEVEL_TOP:
			pp->top_is_object = true;
			break;
		case LEVEL_ROW:
			if (pp->in_value)
			{
				pp->field = NULL;
				pp->sink->row_start(pp->sink->arg);
			}
			break;
		default:
			CompositeStart(pp);
	}
}

static void
ObjectEnd(void *state)
{
	PageParse  *pp = (PageParse *) state;

	if (!pp->single && pp->lex->lex_level == LEVEL_ROW && pp->in_value)
	{
		pp->sink->row_end(pp->sink->arg);
		pp->info->rows++;
		/* Nothing the parser allocated for this row is needed any more. */
		MemoryContextReset(pp->row_cxt);
		return;
	}
	CompositeEnd(pp);
}

static void
ArrayStart(void *state)
{
	PageParse  *pp = (PageParse *) state;

	if (pp->single)
	{
		CompositeStart(pp);
		return;
	}
	switch (pp->lex->lex_level)
	{
		case LEVEL_ANNOTATION:
			if (pp->top_field == TOP_VALUE)
			{
				pp->in_value = true;
				pp->saw_value = true;
			}
			break;
		case LEVEL_ROW:
			if (pp->in_value)
				NotARow(pp);
			break;
		default:
			CompositeStart(pp);
	}
}

static void
ArrayEnd(void *state)
{
	PageParse  *pp = (PageParse *) state;

	if (!pp->single && pp->lex->lex_level == LEVEL_ANNOTATION)
	{
		pp->in_value = false;
		return;
	}
	CompositeEnd(pp);
}

static void
Annotation(PageParse *pp, char *token, JsonTokenType type)
{
	switch (pp->top_field)
	{
		case TOP_NEXT_LINK:
			if (type == JSON_TOKEN_STRING)
				pp->info->next_link = MemoryContextStrdup(pp->keep_cxt, token);
			break;
		case TOP_DELTA_LINK:
			if (type == JSON_TOKEN_STRING)
				pp->info->delta_link = MemoryContextStrdup(pp->keep_cxt, token);
			break;
		case TOP_COUNT:
			{
				char	   *end;
				int64		n;

				errno = 0;
				n = strtoi64(token, &end, 10);
				/* IEEE754Compatible may quote it; anything else is ignored. */
				if ((type == JSON_TOKEN_NUMBER || type == JSON_TOKEN_STRING) &&
					errno == 0 && *end == '\0' && end != token && n >= 0)
					pp->info->count = n;
			}
			break;
		default:
			break;
	}
}

/*
 * A field starts, its value's first token already lexed.  A scalar is
 * handed on here, whole; an object or array by the callbacks of its own.
 */
static void
FieldStart(void *state, char *fname, bool isnull)
{
	PageParse  *pp = (PageParse *) state;
	int			level = pp->lex->lex_level;
	char	   *name;
	char	   *token;
	JsonTokenType type;

	(void) fname;				/* NULL: the lexer keeps no strings */
	(void) isnull;
	if (level == LEVEL_ANNOTATION)
	{
		name = FieldName(pp);
		if (strcmp(name, "value") == 0)
			pp->top_field = TOP_VALUE;
		else if (strcmp(name, "@odata.nextLink") == 0)
			pp->top_field = TOP_NEXT_LINK;
		else if (strcmp(name, "@odata.deltaLink") == 0)
			pp->top_field = TOP_DELTA_LINK;
		else if (strcmp(name, "@odata.count") == 0)
			pp->top_field = TOP_COUNT;
		else
			pp->top_field = TOP_OTHER;
		if (pp->top_field != TOP_OTHER && pp->top_field != TOP_VALUE &&
			ScalarToken(pp, &token, &type) && token != NULL)
			Annotation(pp, token, type);
	}
	else if (level == LEVEL_FIELD && pp->in_value)
	{
		pp->field = FieldName(pp);
		if (ScalarToken(pp, &token, &type))
			pp->sink->scalar(pp->sink->arg, pp->field, token, type);
	}
}

/* An element of "value" must be a row. */
static void
ElementStart(void *state, bool isnull)
{
	PageParse  *pp = (PageParse *) state;

	(void) isnull;
	if (pp->lex->lex_level == LEVEL_ROW && pp->in_value &&
		pp->lex->token_type != JSON_TOKEN_OBJECT_START)
		NotARow(pp);
}

/* CiflowParseValue's one value, when it is a scalar. */
static void
SingleScalar(void *state, char *token, JsonTokenType type)
{
	PageParse  *pp = (PageParse *) state;

	if (pp->lex->lex_level == LEVEL_TOP)
		pp->sink->scalar(pp->sink->arg, NULL,
						 type == JSON_TOKEN_NULL ? NULL : token, type);
}

static void
Parse(PageParse *pp, char *body, size_t len)
{
	JsonSemAction sem;
	JsonParseErrorType rc;
	MemoryContext old;

	/*
	 * The lexer trusts its input to be valid in the encoding it is told;
	 * pages come as UTF-8 and are checked once, whole.
	 */
	if (len > (size_t) PG_INT32_MAX ||
		!pg_verify_mbstr(PG_UTF8, body, (int) len, true))
		ereport(ERROR,
				(errcode(ERRCODE_CHARACTER_NOT_IN_REPERTOIRE),
				 errmsg("%s", pp->failmsg),
				 errdetail("The response (%zu bytes) is not valid UTF-8.", len)));

	/*
	 * \u escapes become UTF-8; the sink converts to the server's encoding.
	 * A single value is small: the lexer de-escapes it as it goes.
	 */
	pp->body = body;
	pp->lex = makeJsonLexContextCstringLen(body, (int) len, PG_UTF8, pp->single);
	memset(&sem, 0, sizeof(sem));
	sem.semstate = pp;
	sem.object_start = ObjectStart;
	sem.object_end = ObjectEnd;
	sem.array_start = ArrayStart;
	sem.array_end = ArrayEnd;
	if (pp->single)
		sem.scalar = SingleScalar;
	else
	{
		sem.object_field_start = FieldStart;
		sem.array_element_start = ElementStart;
	}

	pp->keep_cxt = CurrentMemoryContext;
	pp->row_cxt = AllocSetContextCreate(CurrentMemoryContext, "ciflow page parse",
										ALLOCSET_SMALL_SIZES);
	old = MemoryContextSwitchTo(pp->row_cxt);
	rc = pg_parse_json(pp->lex, &sem);
	MemoryContextSwitchTo(old);
	if (rc != JSON_SUCCESS)
		ReportJsonError(pp, rc, pp->lex, len);
	MemoryContextDelete(pp->row_cxt);
	if (pp->lex->strval != NULL)
	{
		pfree(pp->lex->strval->data);
		pfree(pp->lex->strval);
	}
	pfree(pp->lex);
}

void
CiflowParsePage(char *body, size_t len, const CiflowRowSink *sink,
				CiflowPageInfo *info, const char *failmsg)
{
	PageParse	pp;

	memset(info, 0, sizeof(*info));
	info->count = -1;
	memset(&pp, 0, sizeof(pp));
	pp.sink = sink;
	pp.info = info;
	pp.failmsg = failmsg;
	Parse(&pp, body, len);
	if (!pp.top_is_object || !pp.saw_value)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_JSON_TEXT),
				 errmsg("%s", failmsg),
				 errdetail("The response has no \"value\" array.")));
}

void
CiflowParseValue(char *json, size_t len, const CiflowRowSink *sink,
				 const char *failmsg)
{
	PageParse	pp;
	CiflowPageInfo info;

	memset(&info, 0, sizeof(info));
	memset(&pp, 0, sizeof(pp));
	pp.sink = sink;
	pp.info = &info;
	pp.failmsg = failmsg;
	pp.single = true;
	Parse(&pp, json, len);
}
