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
#include "utils/datetime.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/numeric.h"

#include "ciflow.h"
#include "convert.h"
#include "edm.h"

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

void
CiflowConverterInit(CiflowConverter *conv, Oid typid, int32 typmod,
					MemoryContext cxt)
{
	Oid			infunc;

	conv->typid = typid;
	conv->typmod = typmod;
	getTypeInputInfo(typid, &infunc, &conv->ioparam);
	fmgr_info_cxt(infunc, &conv->input, cxt);
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

/*
 * UTF-8 text in the server encoding.  jansson has already validated it, so
 * a UTF-8 database takes it as it is (per value, on the loading hot path).
 */
static char *
ToServer(const char *s, size_t *len)
{
	char	   *conv;

	RefuseNul(s, *len);
	if (GetDatabaseEncoding() == PG_UTF8)
		return (char *) s;
	conv = pg_any_to_server(s, (int) *len, PG_UTF8);
	if (conv != s)
		*len = strlen(conv);
	return conv;
}

static char *
ServerString(json_t *value, size_t *len)
{
	*len = json_string_length(value);
	return ToServer(json_string_value(value), len);
}

static char *
RealText(double d)
{
	char	   *buf = palloc(DOUBLE_SHORTEST_DECIMAL_LEN);

	double_to_shortest_decimal_buf(d, buf);
	return buf;
}

/* The text a value would have as a scalar: what the input functions read. */
static char *
ScalarText(json_t *value)
{
	size_t		len;

	switch (json_typeof(value))
	{
		case JSON_STRING:
			return ServerString(value, &len);
		case JSON_INTEGER:
			return psprintf("%lld", (long long) json_integer_value(value));
		case JSON_REAL:
			return RealText(json_real_value(value));
		case JSON_TRUE:
			return pstrdup("true");
		case JSON_FALSE:
			return pstrdup("false");
		default:
			return JsonbToCString(NULL, &CiflowJsonToJsonb(value)->root, 0);
	}
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

/*
 * Edm.Duration: PostgreSQL reads ISO 8601 durations ("P1DT2H3.5S") but not
 * a leading minus, which OData allows ("-PT5M"): read the rest, negate.
 */
static Datum
DecodeDuration(const CiflowConverter *conv, const char *s)
{
	Datum		d;

	if (s[0] != '-' && s[0] != 'P')
		BadValue("Edm.Duration (ISO 8601, e.g. P1DT2H)", s);
	if (s[0] != '-')
		return InputFunctionCall((FmgrInfo *) &conv->input, (char *) s,
								 conv->ioparam, conv->typmod);
	if (s[1] != 'P')
		BadValue("Edm.Duration (ISO 8601, e.g. -PT5M)", s);
	d = InputFunctionCall((FmgrInfo *) &conv->input, (char *) s + 1,
						  conv->ioparam, conv->typmod);
	return DirectFunctionCall1(interval_um, d);
}

Datum
CiflowConvert(const CiflowConverter *conv, json_t *value, bool *isnull)
{
	char	   *text;

	*isnull = (value == NULL || json_is_null(value));
	if (*isnull)
		return (Datum) 0;

	switch (conv->typid)
	{
		case TEXTOID:
			if (json_is_string(value))
			{
				size_t		len;
				char	   *s = ServerString(value, &len);

				return PointerGetDatum(cstring_to_text_with_len(s, (int) len));
			}
			return CStringGetTextDatum(ScalarText(value));
		case INT4OID:
			if (json_is_integer(value) &&
				json_integer_value(value) >= PG_INT32_MIN &&
				json_integer_value(value) <= PG_INT32_MAX)
				return Int32GetDatum((int32) json_integer_value(value));
			break;
		case INT8OID:
			if (json_is_integer(value))
				return Int64GetDatum(json_integer_value(value));
			break;
		case FLOAT8OID:
			if (json_is_number(value))
				return Float8GetDatum(json_number_value(value));
			break;
		case BOOLOID:
			if (json_is_boolean(value))
				return BoolGetDatum(json_is_true(value));
			break;
		case NUMERICOID:
			if (json_is_integer(value))
				return NumericGetDatum(int64_to_numeric(json_integer_value(value)));
			break;
		case JSONBOID:
			return JsonbPGetDatum(CiflowJsonToJsonb(value));
		case INT2OID:
			if (json_is_integer(value) &&
				json_integer_value(value) >= PG_INT16_MIN &&
				json_integer_value(value) <= PG_INT16_MAX)
				return Int16GetDatum((int16) json_integer_value(value));
			break;
		case TIMESTAMPTZOID:
		case TIMEOID:
			if (json_is_string(value))
				return InputFunctionCall((FmgrInfo *) &conv->input,
										 TruncateFraction(pstrdup(ScalarText(value))),
										 conv->ioparam, conv->typmod);
			break;
		case INTERVALOID:
			if (json_is_string(value))
				return DecodeDuration(conv, ScalarText(value));
			break;
		case BYTEAOID:
			if (json_is_string(value))
				return DecodeBinary(ScalarText(value));
			break;
		default:
			break;
	}
	text = ScalarText(value);
	return InputFunctionCall((FmgrInfo *) &conv->input, text,
							 conv->ioparam, conv->typmod);
}

static JsonbValue *
PushScalar(JsonbParseState **state, JsonbIteratorToken tok, json_t *value)
{
	JsonbValue	v;

	switch (json_typeof(value))
	{
		case JSON_STRING:
			{
				size_t		len;

				v.type = jbvString;
				v.val.string.val = ServerString(value, &len);
				v.val.string.len = (int) len;
				break;
			}
		case JSON_INTEGER:
			v.type = jbvNumeric;
			v.val.numeric = int64_to_numeric(json_integer_value(value));
			break;
		case JSON_REAL:
			v.type = jbvNumeric;
			v.val.numeric = DatumGetNumeric(DirectFunctionCall3(numeric_in,
																CStringGetDatum(RealText(json_real_value(value))),
																ObjectIdGetDatum(InvalidOid),
																Int32GetDatum(-1)));
			break;
		case JSON_TRUE:
		case JSON_FALSE:
			v.type = jbvBool;
			v.val.boolean = json_is_true(value);
			break;
		default:
			v.type = jbvNull;
			break;
	}
	return pushJsonbValue(state, tok, &v);
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
	JsonbValue *result;

	if (json_is_object(value) || json_is_array(value))
		result = PushValue(&state, WJB_VALUE, value);
	else
	{
		/* A scalar is stored as a one-element "raw scalar" array. */
		JsonbValue	arr;

		arr.type = jbvArray;
		arr.val.array.rawScalar = true;
		arr.val.array.nElems = 1;
		(void) pushJsonbValue(&state, WJB_BEGIN_ARRAY, &arr);
		(void) PushScalar(&state, WJB_ELEM, value);
		result = pushJsonbValue(&state, WJB_END_ARRAY, NULL);
	}
	return JsonbValueToJsonb(result);
}

/*
 * ciflow.edm_value(value jsonb, edm_type text): the value as a sync stores
 * it in a column of edm_type (edm.c's map), as that column type's text.
 * It lets users and tests see exactly how a service's value is read.
 */
Datum
ciflow_edm_value(PG_FUNCTION_ARGS)
{
	Jsonb	   *jb;
	char	   *edm;
	char	   *json_text;
	json_t	   *value;
	json_error_t jerr;
	CiflowConverter conv;
	Oid			outfunc;
	bool		isvarlena;
	bool		isnull;
	Datum		d;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_NULL();
	jb = PG_GETARG_JSONB_P(0);
	edm = text_to_cstring(PG_GETARG_TEXT_PP(1));
	json_text = JsonbToCString(NULL, &jb->root, VARSIZE(jb));
	value = json_loads(json_text, JSON_DECODE_ANY | JSON_ALLOW_NUL, &jerr);
	if (value == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("value cannot be read as the service's JSON: %s", jerr.text),
				 errhint("Integers must fit in 64 bits, as on the wire.")));
	CiflowConverterInit(&conv, CiflowEdmTypeOid(edm), -1, CurrentMemoryContext);
	d = CiflowConvert(&conv, value, &isnull);
	if (isnull)
		PG_RETURN_NULL();
	getTypeOutputInfo(conv.typid, &outfunc, &isvarlena);
	PG_RETURN_TEXT_P(cstring_to_text(OidOutputFunctionCall(outfunc, d)));
}
