/*-------------------------------------------------------------------------
 *
 * convert.c
 *	  One JSON value to one Datum of a PostgreSQL type.  Common types get a
 *	  direct path; everything else goes through the type's input function,
 *	  so a value that does not fit raises the type's own error.
 *
 *	  Rules the services impose (A.1, A.7): timestamps and times of day may
 *	  carry 7 fractional digits (truncated to microseconds, never rounded),
 *	  and timestamps an offset (+02:00) instead of Z; Int64 and Decimal may
 *	  come as numbers or strings (IEEE754Compatible) and decimals are kept
 *	  in their shortest round-trip form; Edm.Duration is an ISO 8601
 *	  duration, possibly negative (-P1D); Edm.Binary is base64 or base64url,
 *	  padded or not; and a NUL character is refused rather than silently cut.
 *
 *	  Which PostgreSQL type an Edm type becomes is edm.c's table, not this
 *	  file's; this file only converts to a given type.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "common/base64.h"
#include "common/shortest_dec.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/date.h"
#include "utils/datetime.h"
#include "utils/float.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/numeric.h"
#include "utils/uuid.h"

#include "ciflow.h"
#include "convert.h"
#include "edm.h"
#include "pageparse.h"

CIFLOW_SQL_FUNCTION(ciflow_edm_value);

static void *
JsonPalloc(size_t size)
{
	return MemoryContextAllocExtended(CurrentMemoryContext, size, MCXT_ALLOC_HUGE);
}

static void
JsonPfree(void *ptr)
{
	if (ptr)
		pfree(ptr);
}

/*
 * With palloc underneath, a JSON document belongs to the memory context it
 * was parsed in: an ERROR or a context reset frees it, never a leak.
 */
void
CiflowJsonUsepalloc(void)
{
	json_set_alloc_funcs(JsonPalloc, JsonPfree);
}

/*
 * A string in the server encoding.  Tokens are UTF-8 without NULs (the
 * page parser refuses \u0000, the jansson path checks first), so a UTF-8
 * database takes them as they are: per value, on the loading hot path.
 */
static char *
ToServer(const char *s, size_t *len)
{
	char	   *conv;

	if (GetDatabaseEncoding() == PG_UTF8)
		return (char *) s;
	conv = pg_any_to_server(s, (int) *len, PG_UTF8);
	if (conv != s)
		*len = strlen(conv);
	return conv;
}

static void
RefuseNul(const char *s, size_t len)
{
	if (memchr(s, '\0', len) != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNTRANSLATABLE_CHARACTER),
				 errmsg("string value contains a NUL character"),
				 errdetail("PostgreSQL text cannot hold \\u0000.")));
}

static char *
RealText(double d)
{
	char	   *buf = palloc(DOUBLE_SHORTEST_DECIMAL_LEN);

	double_to_shortest_decimal_buf(d, buf);
	return buf;
}

/*
 * The service sends up to 7 fractional digits; PostgreSQL keeps 6 and would
 * round the 7th, which can move a timestamp across a second.  Truncates s
 * in place, so s must be the caller's own copy.
 */
static char *
TruncateFraction(char *s)
{
	char	   *dot = strchr(s, '.');
	char	   *p;
	int			digits = 0;

	if (dot == NULL)
		return s;
	for (p = dot + 1; *p >= '0' && *p <= '9'; p++)
		digits++;
	if (digits > 6)
		memmove(dot + 7, p, strlen(p) + 1);
	return s;
}

static void
BadValue(const char *what, const char *s)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
			 errmsg("invalid %s value: \"%.40s%s\"", what, s, strlen(s) > 40 ? "..." : "")));
}

/* The type's input function: the path of every value without a direct one. */
static Datum
Input(const CiflowConverter *conv, char *token, JsonTokenType type)
{
	if (type == JSON_TOKEN_STRING)
	{
		size_t		len = strlen(token);

		token = ToServer(token, &len);
	}
	return InputFunctionCall((FmgrInfo *) &conv->input, token,
							 conv->ioparam, conv->typmod);
}

static Datum
ConvertText(const CiflowConverter *conv, char *token, JsonTokenType type)
{
	size_t		len = strlen(token);
	char	   *s = type == JSON_TOKEN_STRING ? ToServer(token, &len) : token;

	(void) conv;
	return PointerGetDatum(cstring_to_text_with_len(s, (int) len));
}

/* Int64 may come quoted (IEEE754Compatible); all integers read alike. */
static Datum
ConvertInt2(const CiflowConverter *conv, char *token, JsonTokenType type)
{
	if (type == JSON_TOKEN_NUMBER || type == JSON_TOKEN_STRING)
		return Int16GetDatum(pg_strtoint16(token));
	return Input(conv, token, type);
}

static Datum
ConvertInt4(const CiflowConverter *conv, char *token, JsonTokenType type)
{
	if (type == JSON_TOKEN_NUMBER || type == JSON_TOKEN_STRING)
		return Int32GetDatum(pg_strtoint32(token));
	return Input(conv, token, type);
}

static Datum
ConvertInt8(const CiflowConverter *conv, char *token, JsonTokenType type)
{
	if (type == JSON_TOKEN_NUMBER || type == JSON_TOKEN_STRING)
		return Int64GetDatum(pg_strtoint64(token));
	return Input(conv, token, type);
}

/* Edm.Double, as a number or as IEEE754Compatible's "NaN", "INF", "-INF". */
static Datum
ConvertFloat8(const CiflowConverter *conv, char *token, JsonTokenType type)
{
	if (type == JSON_TOKEN_NUMBER || type == JSON_TOKEN_STRING)
		return Float8GetDatum(float8in_internal(token, NULL, "double precision", token));
	return Input(conv, token, type);
}

static Datum
ConvertBool(const CiflowConverter *conv, char *token, JsonTokenType type)
{
	if (type == JSON_TOKEN_TRUE || type == JSON_TOKEN_FALSE)
		return BoolGetDatum(type == JSON_TOKEN_TRUE);
	return Input(conv, token, type);
}

static int
HexDigit(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* "dd" at s, as a number; false unless both are digits. */
static bool
Digits(const char *s, int n, int *value)
{
	int			i;

	*value = 0;
	for (i = 0; i < n; i++)
	{
		if (s[i] < '0' || s[i] > '9')
			return false;
		*value = *value * 10 + (s[i] - '0');
	}
	return true;
}

/* "YYYY-MM-DD" at s, a real day; its Julian day number in *julian. */
static bool
ReadDay(const char *s, int *julian)
{
	int			y,
				m,
				d;

	if (!Digits(s, 4, &y) || s[4] != '-' || !Digits(s + 5, 2, &m) || s[7] != '-' ||
		!Digits(s + 8, 2, &d))
		return false;
	if (y < 1 || m < 1 || m > 12 || d < 1 || d > day_tab[isleap(y) ? 1 : 0][m - 1])
		return false;
	*julian = date2j(y, m, d);
	return true;
}

/*
 * The services' one timestamp form, "YYYY-MM-DDTHH:MM:SS[.f...](Z|+HH:MM)",
 * read without the general date parser (a fraction beyond microseconds is
 * truncated, as TruncateFraction does).  Anything else returns false and
 * takes the input function's path, which judges it.
 */
static bool
ReadTimestamptz(const char *s, TimestampTz *result)
{
	int			julian,
				h,
				mi,
				sec,
				digits = 0;
	int64		usec = 0;
	int			offset = 0;
	const char *p;

	if (!ReadDay(s, &julian) || (s[10] != 'T' && s[10] != 't') ||
		!Digits(s + 11, 2, &h) || s[13] != ':' || !Digits(s + 14, 2, &mi) ||
		s[16] != ':' || !Digits(s + 17, 2, &sec) || h > 23 || mi > 59 || sec > 59)
		return false;
	p = s + 19;
	if (*p == '.')
	{
		p++;
		if (*p < '0' || *p > '9')
			return false;
		for (; *p >= '0' && *p <= '9'; p++)
		{
			if (digits++ < 6)
				usec = usec * 10 + (*p - '0');
		}
		for (; digits < 6; digits++)
			usec *= 10;
	}
	if (*p == 'Z' || *p == 'z')
		p++;
	else if (*p == '+' || *p == '-')
	{
		int			oh,
					om;

		if (!Digits(p + 1, 2, &oh) || p[3] != ':' || !Digits(p + 4, 2, &om) ||
			oh > 15 || om > 59)
			return false;
		offset = (oh * MINS_PER_HOUR + om) * SECS_PER_MINUTE;
		if (*p == '-')
			offset = -offset;
		p += 6;
	}
	else
		return false;
	if (*p != '\0')
		return false;
	*result = ((int64) (julian - POSTGRES_EPOCH_JDATE) * SECS_PER_DAY +
			   (h * MINS_PER_HOUR + mi) * SECS_PER_MINUTE + sec - offset) * USECS_PER_SEC + usec;
	return true;
}

static Datum
ConvertTimestamptz(const CiflowConverter *conv, char *token, JsonTokenType type)
{
	TimestampTz ts;

	if (type == JSON_TOKEN_STRING && ReadTimestamptz(token, &ts))
		return TimestampTzGetDatum(ts);
	if (type == JSON_TOKEN_STRING)
		return Input(conv, TruncateFraction(token), type);
	return Input(conv, token, type);
}

static Datum
ConvertTime(const CiflowConverter *conv, char *token, JsonTokenType type)
{
	if (type == JSON_TOKEN_STRING)
		return Input(conv, TruncateFraction(token), type);
	return Input(conv, token, type);
}

static Datum
ConvertDate(const CiflowConverter *conv, char *token, JsonTokenType type)
{
	int			julian;

	if (type == JSON_TOKEN_STRING && strlen(token) == 10 && ReadDay(token, &julian))
		return DateADTGetDatum(julian - POSTGRES_EPOCH_JDATE);
	return Input(conv, token, type);
}

/*
 * Edm.Guid in its one JSON form, 8-4-4-4-12 hex digits, read straight into
 * the 16 bytes; any other spelling is the input function's to judge.
 */
static Datum
ConvertUuid(const CiflowConverter *conv, char *token, JsonTokenType type)
{
	pg_uuid_t  *uuid;
	int			i;
	int			n = 0;

	if (type != JSON_TOKEN_STRING || strlen(token) != 36)
		return Input(conv, token, type);
	uuid = palloc(sizeof(pg_uuid_t));
	for (i = 0; i < 36; i++)
	{
		int			hi,
					lo;

		if (i == 8 || i == 13 || i == 18 || i == 23)
		{
			if (token[i] != '-')
				return Input(conv, token, type);
			continue;
		}
		hi = HexDigit(token[i]);
		lo = HexDigit(token[++i]);
		if (hi < 0 || lo < 0)
			return Input(conv, token, type);
		uuid->data[n++] = (unsigned char) (hi << 4 | lo);
	}
	return UUIDPGetDatum(uuid);
}

/*
 * Edm.Binary: base64 (RFC 4648 section 4) or base64url (section 5), with
 * or without padding; OData's JSON format uses base64url, services send
 * both.  Anything else is refused, never decoded partially.
 */
static Datum
DecodeBinary(const char *s)
{
	size_t		len = strlen(s);
	char	   *std = palloc(len + 4);
	size_t		n = 0;
	size_t		i;
	int			decoded;
	bytea	   *result;

	for (i = 0; i < len; i++)
	{
		char		c = s[i];

		if (c == '-')
			c = '+';
		else if (c == '_')
			c = '/';
		else if (c == '=')
			break;
		else if (!(isalnum((unsigned char) c) || c == '+' || c == '/'))
			BadValue("Edm.Binary (base64 or base64url)", s);
		std[n++] = c;
	}
	/* Only padding may follow the first '='. */
	for (; i < len; i++)
	{
		if (s[i] != '=')
			BadValue("Edm.Binary (base64 or base64url)", s);
	}
	if (n % 4 == 1 || n > (size_t) (PG_INT32_MAX / 2))
		BadValue("Edm.Binary (base64 or base64url)", s);
	while (n % 4 != 0)
		std[n++] = '=';

	result = palloc(VARHDRSZ + pg_b64_dec_len((int) n));
	decoded = pg_b64_decode(std, (int) n, VARDATA(result), pg_b64_dec_len((int) n));
	if (decoded < 0)
		BadValue("Edm.Binary (base64 or base64url)", s);
	SET_VARSIZE(result, VARHDRSZ + decoded);
	pfree(std);
	return PointerGetDatum(result);
}

static Datum
ConvertBytea(const CiflowConverter *conv, char *token, JsonTokenType type)
{
	if (type == JSON_TOKEN_STRING)
		return DecodeBinary(token);
	return Input(conv, token, type);
}

/*
 * Edm.Duration: PostgreSQL reads ISO 8601 durations ("P1DT2H3.5S") but not
 * a leading minus, which OData allows ("-PT5M"): read the rest, negate.
 */
static Datum
ConvertInterval(const CiflowConverter *conv, char *token, JsonTokenType type)
{
	if (type != JSON_TOKEN_STRING)
		return Input(conv, token, type);
	if (token[0] != '-' && token[0] != 'P')
		BadValue("Edm.Duration (ISO 8601, e.g. P1DT2H)", token);
	if (token[0] != '-')
		return Input(conv, token, type);
	if (token[1] != 'P')
		BadValue("Edm.Duration (ISO 8601, e.g. -PT5M)", token);
	return DirectFunctionCall1(interval_um, Input(conv, token + 1, type));
}

/* A scalar into jsonb, from its token: a one-element "raw scalar" array. */
static JsonbValue *
PushToken(JsonbParseState **state, JsonbIteratorToken tok, char *token, JsonTokenType type)
{
	JsonbValue	v;

	switch (type)
	{
		case JSON_TOKEN_STRING:
			{
				size_t		len = strlen(token);

				v.type = jbvString;
				v.val.string.val = ToServer(token, &len);
				v.val.string.len = (int) len;
				break;
			}
		case JSON_TOKEN_NUMBER:
			v.type = jbvNumeric;
			v.val.numeric = DatumGetNumeric(DirectFunctionCall3(numeric_in,
																CStringGetDatum(token),
																ObjectIdGetDatum(InvalidOid),
																Int32GetDatum(-1)));
			break;
		case JSON_TOKEN_TRUE:
		case JSON_TOKEN_FALSE:
			v.type = jbvBool;
			v.val.boolean = (type == JSON_TOKEN_TRUE);
			break;
		default:
			v.type = jbvNull;
			break;
	}
	return pushJsonbValue(state, tok, &v);
}

static Jsonb *
ScalarJsonb(char *token, JsonTokenType type)
{
	JsonbParseState *state = NULL;
	JsonbValue	arr;

	arr.type = jbvArray;
	arr.val.array.rawScalar = true;
	arr.val.array.nElems = 1;
	(void) pushJsonbValue(&state, WJB_BEGIN_ARRAY, &arr);
	(void) PushToken(&state, WJB_ELEM, token, type);
	return JsonbValueToJsonb(pushJsonbValue(&state, WJB_END_ARRAY, NULL));
}

static Datum
ConvertJsonb(const CiflowConverter *conv, char *token, JsonTokenType type)
{
	(void) conv;
	return JsonbPGetDatum(ScalarJsonb(token, type));
}

void
CiflowConverterInit(CiflowConverter *conv, Oid typid, int32 typmod,
					MemoryContext cxt)
{
	Oid			infunc;

	conv->typid = typid;
	conv->typmod = typmod;
	getTypeInputInfo(typid, &infunc, &conv->ioparam);
	fmgr_info_cxt(infunc, &conv->input, cxt);

	/* Chosen once per column: the hot path makes no decision per value. */
	switch (typid)
	{
		case TEXTOID:
			conv->fn = ConvertText;
			break;
		case INT2OID:
			conv->fn = ConvertInt2;
			break;
		case INT4OID:
			conv->fn = ConvertInt4;
			break;
		case INT8OID:
			conv->fn = ConvertInt8;
			break;
		case FLOAT8OID:
			conv->fn = ConvertFloat8;
			break;
		case BOOLOID:
			conv->fn = ConvertBool;
			break;
		case TIMESTAMPTZOID:
			conv->fn = ConvertTimestamptz;
			break;
		case TIMEOID:
			conv->fn = ConvertTime;
			break;
		case DATEOID:
			conv->fn = ConvertDate;
			break;
		case UUIDOID:
			conv->fn = ConvertUuid;
			break;
		case INTERVALOID:
			conv->fn = ConvertInterval;
			break;
		case BYTEAOID:
			conv->fn = ConvertBytea;
			break;
		case JSONBOID:
			conv->fn = ConvertJsonb;
			break;
		default:
			/* numeric, real and any type of a user's own column */
			conv->fn = Input;
			break;
	}
}

Datum
CiflowConvertComposite(const CiflowConverter *conv, const char *json, int len)
{
	size_t		n = (size_t) len;
	char	   *text = ToServer(pnstrdup(json, n), &n);

	if (conv->typid == JSONBOID)
		return DirectFunctionCall1(jsonb_in, CStringGetDatum(text));
	return InputFunctionCall((FmgrInfo *) &conv->input, text,
							 conv->ioparam, conv->typmod);
}

/* A jansson scalar as the page parser would have delivered it. */
static char *
JanssonToken(json_t *value, JsonTokenType *type)
{
	size_t		len;

	switch (json_typeof(value))
	{
		case JSON_STRING:
			*type = JSON_TOKEN_STRING;
			RefuseNul(json_string_value(value), json_string_length(value));
			return (char *) json_string_value(value);
		case JSON_INTEGER:
			*type = JSON_TOKEN_NUMBER;
			return psprintf("%lld", (long long) json_integer_value(value));
		case JSON_REAL:
			*type = JSON_TOKEN_NUMBER;
			return RealText(json_real_value(value));
		case JSON_TRUE:
			*type = JSON_TOKEN_TRUE;
			return "true";
		case JSON_FALSE:
			*type = JSON_TOKEN_FALSE;
			return "false";
		default:
			*type = JSON_TOKEN_NULL;
			(void) len;
			return NULL;
	}
}

Datum
CiflowConvert(const CiflowConverter *conv, json_t *value, bool *isnull)
{
	JsonTokenType type;
	char	   *token;

	*isnull = (value == NULL || json_is_null(value));
	if (*isnull)
		return (Datum) 0;
	if (json_is_object(value) || json_is_array(value))
	{
		Jsonb	   *jb = CiflowJsonToJsonb(value);

		if (conv->typid == JSONBOID)
			return JsonbPGetDatum(jb);
		return InputFunctionCall((FmgrInfo *) &conv->input,
								 JsonbToCString(NULL, &jb->root, 0),
								 conv->ioparam, conv->typmod);
	}
	token = JanssonToken(value, &type);
	/* The converters may truncate a copy, never the document's own string. */
	return conv->fn(conv, type == JSON_TOKEN_STRING ? pstrdup(token) : token, type);
}

static JsonbValue *
PushScalar(JsonbParseState **state, JsonbIteratorToken tok, json_t *value)
{
	JsonTokenType type;
	char	   *token = JanssonToken(value, &type);

	return PushToken(state, tok, token, type);
}

/* Returns what pushJsonbValue returns: the finished value at the outermost end. */
static JsonbValue *
PushValue(JsonbParseState **state, JsonbIteratorToken tok, json_t *value)
{
	check_stack_depth();

	if (json_is_object(value))
	{
		const char *key;
		json_t	   *member;

		(void) pushJsonbValue(state, WJB_BEGIN_OBJECT, NULL);
		json_object_foreach(value, key, member)
		{
			JsonbValue	k;
			size_t		len = strlen(key);

			k.type = jbvString;
			k.val.string.val = ToServer(key, &len);
			k.val.string.len = (int) len;
			(void) pushJsonbValue(state, WJB_KEY, &k);
			(void) PushValue(state, WJB_VALUE, member);
		}
		return pushJsonbValue(state, WJB_END_OBJECT, NULL);
	}
	if (json_is_array(value))
	{
		size_t		i;
		json_t	   *elem;

		(void) pushJsonbValue(state, WJB_BEGIN_ARRAY, NULL);
		json_array_foreach(value, i, elem)
			(void) PushValue(state, WJB_ELEM, elem);
		return pushJsonbValue(state, WJB_END_ARRAY, NULL);
	}
	return PushScalar(state, tok, value);
}

/* Builds jsonb straight from the parsed document: no text round trip. */
Jsonb *
CiflowJsonToJsonb(json_t *value)
{
	JsonbParseState *state = NULL;
	JsonTokenType type;
	char	   *token;

	if (json_is_object(value) || json_is_array(value))
		return JsonbValueToJsonb(PushValue(&state, WJB_VALUE, value));
	token = JanssonToken(value, &type);
	return ScalarJsonb(token, type);
}

/*
 * ciflow.edm_value(value jsonb, edm_type text): the value as a sync stores
 * it in a column of edm_type (edm.c's map), as that column type's text.
 * It lets users and tests see exactly how a service's value is read.
 */
/* One value into one Datum: what a page's sink does per field. */
typedef struct ValueSink
{
	const CiflowConverter *conv;
	Datum		value;
	bool		isnull;
} ValueSink;

static void
ValueScalar(void *arg, const char *field, char *token, JsonTokenType type)
{
	ValueSink  *vs = (ValueSink *) arg;

	(void) field;
	vs->isnull = (token == NULL);
	if (!vs->isnull)
		vs->value = vs->conv->fn(vs->conv, token, type);
}

static void
ValueComposite(void *arg, const char *field, const char *json, int len)
{
	ValueSink  *vs = (ValueSink *) arg;

	(void) field;
	vs->isnull = false;
	vs->value = CiflowConvertComposite(vs->conv, json, len);
}

/*
 * ciflow.edm_value(value jsonb, edm_type text): the value as a sync stores
 * it in a column of edm_type (edm.c's map), as that column type's text.
 * It lets users and tests see exactly how a service's value is read: it
 * goes through the page parser's tokens and the same converters.
 */
Datum
ciflow_edm_value(PG_FUNCTION_ARGS)
{
	Jsonb	   *jb;
	char	   *edm;
	char	   *json_text;
	CiflowConverter conv;
	CiflowRowSink sink;
	ValueSink	vs;
	Oid			outfunc;
	bool		isvarlena;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_NULL();
	jb = PG_GETARG_JSONB_P(0);
	edm = text_to_cstring(PG_GETARG_TEXT_PP(1));
	json_text = JsonbToCString(NULL, &jb->root, VARSIZE(jb));
	/* The parser reads what the services send: UTF-8. */
	json_text = pg_server_to_any(json_text, (int) strlen(json_text), PG_UTF8);
	CiflowConverterInit(&conv, CiflowEdmTypeOid(edm), -1, CurrentMemoryContext);

	memset(&sink, 0, sizeof(sink));
	memset(&vs, 0, sizeof(vs));
	vs.conv = &conv;
	vs.isnull = true;
	sink.arg = &vs;
	sink.scalar = ValueScalar;
	sink.composite = ValueComposite;
	CiflowParseValue(json_text, strlen(json_text), &sink, "value cannot be read as the service's JSON");
	if (vs.isnull)
		PG_RETURN_NULL();
	getTypeOutputInfo(conv.typid, &outfunc, &isvarlena);
	PG_RETURN_TEXT_P(cstring_to_text(OidOutputFunctionCall(outfunc, vs.value)));
}
