/*-------------------------------------------------------------------------
 *
 * edm.c
 *	  The Edm type map (sql-api.md section 3) as ONE table for every
 *	  flavour: the PostgreSQL type an Edm type becomes, and the form of its
 *	  literals in a $filter.  Readers of metadata (E2 for Customer Insights,
 *	  CSDL for OData and Dataverse) and the sync's shape code all ask here,
 *	  so that a type maps the same way wherever it comes from.
 *
 *	  Pure functions: no I/O, no catalog access; ciflow.edm_type() shows
 *	  the map in SQL.  Converting values is
 *	  convert.c's job, reading metadata csdl.c's.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <ctype.h>

#include "catalog/pg_type.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "utils/builtins.h"

#include "ciflow.h"
#include "edm.h"

CIFLOW_SQL_FUNCTION(ciflow_edm_type);

/* How a value of the type is written in a $filter (OData ABNF, part 2). */
typedef enum EdmLiteral
{
	EDM_LIT_STRING,				/* 'text', quotes doubled */
	EDM_LIT_INTEGER,			/* 42, -1 (within the type's range) */
	EDM_LIT_DECIMAL,			/* 42, -1.5, 1.5e3 */
	EDM_LIT_FLOAT,				/* as decimal, or NaN, INF, -INF */
	EDM_LIT_BOOLEAN,			/* true, false */
	EDM_LIT_GUID,				/* 01234567-89ab-cdef-0123-456789abcdef */
	EDM_LIT_DATE,				/* 2025-03-01 */
	EDM_LIT_DATETIME,			/* 2025-03-01T02:13:00Z, ...+02:00 */
	EDM_LIT_TIME,				/* 02:13:00.5 */
	EDM_LIT_DURATION,			/* duration'P1DT2H' */
	EDM_LIT_BINARY				/* binary'base64url' */
} EdmLiteral;

typedef struct EdmType
{
	const char *edm;
	Oid			typid;
	EdmLiteral	literal;
	int64		min;			/* integer types: the range of the type */
	int64		max;
	const char *form;			/* what a key of the type looks like (HINT) */
} EdmType;

static const EdmType edm_types[] =
{
	{"Edm.String", TEXTOID, EDM_LIT_STRING, 0, 0, NULL},
	{"Edm.Boolean", BOOLOID, EDM_LIT_BOOLEAN, 0, 0, "true or false"},
	/* PostgreSQL has no one-byte integer: Byte and SByte both fit smallint. */
	{"Edm.Byte", INT2OID, EDM_LIT_INTEGER, 0, 255,
	"a whole number from 0 to 255"},
	{"Edm.SByte", INT2OID, EDM_LIT_INTEGER, -128, 127,
	"a whole number from -128 to 127"},
	{"Edm.Int16", INT2OID, EDM_LIT_INTEGER, PG_INT16_MIN, PG_INT16_MAX,
	"a whole number from -32768 to 32767"},
	{"Edm.Int32", INT4OID, EDM_LIT_INTEGER, PG_INT32_MIN, PG_INT32_MAX,
	"a whole number from -2147483648 to 2147483647, such as 42"},
	{"Edm.Int64", INT8OID, EDM_LIT_INTEGER, PG_INT64_MIN, PG_INT64_MAX,
	"a whole number from -9223372036854775808 to 9223372036854775807, such as 42"},
	{"Edm.Single", FLOAT4OID, EDM_LIT_FLOAT, 0, 0,
	"a number such as 42, -1.5 or 2.5e-3 (or NaN, INF, -INF)"},
	{"Edm.Double", FLOAT8OID, EDM_LIT_FLOAT, 0, 0,
	"a number such as 42, -1.5 or 2.5e-3 (or NaN, INF, -INF)"},
	{"Edm.Decimal", NUMERICOID, EDM_LIT_DECIMAL, 0, 0,
	"a number such as 42, -1.5 or 2.5e-3"},
	{"Edm.DateTimeOffset", TIMESTAMPTZOID, EDM_LIT_DATETIME, 0, 0,
	"a timestamp with its offset, such as 2025-03-01T02:13:00Z or 2025-03-01T04:13:00.5+02:00"},
	{"Edm.Date", DATEOID, EDM_LIT_DATE, 0, 0, "a date such as 2025-03-01"},
	{"Edm.TimeOfDay", TIMEOID, EDM_LIT_TIME, 0, 0, "a time of day such as 02:13 or 02:13:00.5"},
	{"Edm.Duration", INTERVALOID, EDM_LIT_DURATION, 0, 0, NULL},
	{"Edm.Guid", UUIDOID, EDM_LIT_GUID, 0, 0,
	"a GUID in the 8-4-4-4-12 form, such as 01234567-89ab-cdef-0123-456789abcdef"},
	{"Edm.Binary", BYTEAOID, EDM_LIT_BINARY, 0, 0, NULL},
};

static const EdmType *
FindEdmType(const char *edm)
{
	int			i;

	for (i = 0; edm != NULL && i < (int) lengthof(edm_types); i++)
	{
		if (pg_strcasecmp(edm, edm_types[i].edm) == 0)
			return &edm_types[i];
	}
	return NULL;
}

Oid
CiflowEdmTypeOid(const char *edm)
{
	const EdmType *t = FindEdmType(edm);

	return t ? t->typid : JSONBOID;
}

bool
CiflowEdmLiteralIsQuoted(const char *edm)
{
	const EdmType *t = FindEdmType(edm);

	return t == NULL || t->literal == EDM_LIT_STRING;
}

static void
AppendQuoted(StringInfo out, const char *value)
{
	const char *p;

	appendStringInfoChar(out, '\'');
	for (p = value; *p; p++)
	{
		if (*p == '\'')
			appendStringInfoChar(out, '\'');
		appendStringInfoChar(out, *p);
	}
	appendStringInfoChar(out, '\'');
}

/* Exactly n digits at *p, moving past them; their value in *value. */
static bool
Digits(const char **p, int n, int *value)
{
	int			v = 0;
	int			i;

	for (i = 0; i < n; i++)
	{
		if (!isdigit((unsigned char) (*p)[i]))
			return false;
		v = v * 10 + ((*p)[i] - '0');
	}
	*p += n;
	if (value)
		*value = v;
	return true;
}

/* One or more digits at *p, moving past them; how many in *n. */
static bool
SomeDigits(const char **p, int *n)
{
	const char *start = *p;

	while (isdigit((unsigned char) **p))
		(*p)++;
	if (n)
		*n = (int) (*p - start);
	return *p > start;
}

static bool
Sign(const char **p)
{
	if (**p == '+' || **p == '-')
	{
		(*p)++;
		return true;
	}
	return false;
}

/* [sign] 1*19DIGIT within [t->min, t->max]. */
static bool
IsIntegerLiteral(const EdmType *t, const char *s)
{
	const char *p = s;
	bool		negative = (*p == '-');
	uint64		v = 0;
	int			n;
	const char *digits;

	Sign(&p);
	digits = p;
	if (!SomeDigits(&p, &n) || *p != '\0' || n > 19)
		return false;
	/* At most 19 digits: no uint64 overflow. */
	for (; *digits; digits++)
		v = v * 10 + (uint64) (*digits - '0');
	/* -(min + 1) + 1: -min does not fit in an int64 when min is INT64_MIN. */
	if (negative)
		return v <= (t->min < 0 ? (uint64) (-(t->min + 1)) + 1 : 0);
	return v <= (uint64) t->max;
}

/* [sign] 1*DIGIT ["." 1*DIGIT] ["e" [sign] 1*DIGIT] (decimalValue, doubleValue) */
static bool
IsNumberLiteral(const char *s, bool nan_inf)
{
	const char *p = s;

	if (nan_inf && (strcmp(s, "NaN") == 0 || strcmp(s, "INF") == 0 || strcmp(s, "-INF") == 0))
		return true;
	Sign(&p);
	if (!SomeDigits(&p, NULL))
		return false;
	if (*p == '.')
	{
		p++;
		if (!SomeDigits(&p, NULL))
			return false;
	}
	if (*p == 'e' || *p == 'E')
	{
		p++;
		Sign(&p);
		if (!SomeDigits(&p, NULL))
			return false;
	}
	return *p == '\0';
}

static bool
IsGuidLiteral(const char *s)
{
	static const int groups[] = {8, 4, 4, 4, 12};
	const char *p = s;
	int			g;
	int			i;

	for (g = 0; g < (int) lengthof(groups); g++)
	{
		if (g > 0 && *p++ != '-')
			return false;
		for (i = 0; i < groups[g]; i++, p++)
		{
			if (!isxdigit((unsigned char) *p))
				return false;
		}
	}
	return *p == '\0';
}

/* YYYY-MM-DD, a day that exists (0001-9999: what every service accepts). */
static bool
DatePart(const char **p)
{
	static const int days[] = {31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
	int			year;
	int			month;
	int			day;

	if (!Digits(p, 4, &year) || *(*p)++ != '-' || !Digits(p, 2, &month) ||
		*(*p)++ != '-' || !Digits(p, 2, &day))
		return false;
	if (year < 1 || month < 1 || month > 12 || day < 1 || day > days[month - 1])
		return false;
	/* 29 February only in a leap year. */
	if (month == 2 && day == 29 && !((year % 4 == 0 && year % 100 != 0) || year % 400 == 0))
		return false;
	return true;
}

/* hh:mm[:ss[.fraction]] (timeOfDayValue), at most 12 fractional digits. */
static bool
TimePart(const char **p)
{
	int			hour;
	int			minute;
	int			second;
	int			n;

	if (!Digits(p, 2, &hour) || *(*p)++ != ':' || !Digits(p, 2, &minute) ||
		hour > 23 || minute > 59)
		return false;
	if (**p != ':')
		return true;
	(*p)++;
	if (!Digits(p, 2, &second) || second > 59)
		return false;
	if (**p != '.')
		return true;
	(*p)++;
	return SomeDigits(p, &n) && n <= 12;
}

static bool
IsDateLiteral(const char *s)
{
	const char *p = s;

	return DatePart(&p) && *p == '\0';
}

static bool
IsTimeLiteral(const char *s)
{
	const char *p = s;

	return TimePart(&p) && *p == '\0';
}

/* date "T" timeOfDay ("Z" / sign hh:mm) (dateTimeOffsetValue) */
static bool
IsDateTimeLiteral(const char *s)
{
	const char *p = s;
	int			hour;
	int			minute;

	if (!DatePart(&p) || (*p != 'T' && *p != 't'))
		return false;
	p++;
	if (!TimePart(&p))
		return false;
	if ((*p == 'Z' || *p == 'z') && p[1] == '\0')
		return true;
	if (!Sign(&p))
		return false;
	if (!Digits(&p, 2, &hour) || *p++ != ':' || !Digits(&p, 2, &minute))
		return false;
	return *p == '\0' && hour <= 23 && minute <= 59;
}

/*
 * An unquoted literal goes into the filter as it is, so it must be exactly
 * a literal of its type in OData's ABNF: that leaves no room for anything
 * that could change the filter's meaning, and catches a value the service
 * would refuse before any call is made.  PostgreSQL's input functions are
 * not used: they accept more (" 42", "{guid}", "Feb 3 2025").
 */
static bool
IsPlainLiteral(const EdmType *t, const char *value)
{
	switch (t->literal)
	{
		case EDM_LIT_INTEGER:
			return IsIntegerLiteral(t, value);
		case EDM_LIT_DECIMAL:
			return IsNumberLiteral(value, false);
		case EDM_LIT_FLOAT:
			return IsNumberLiteral(value, true);
		case EDM_LIT_GUID:
			return IsGuidLiteral(value);
		case EDM_LIT_DATE:
			return IsDateLiteral(value);
		case EDM_LIT_TIME:
			return IsTimeLiteral(value);
		case EDM_LIT_DATETIME:
			return IsDateTimeLiteral(value);
		default:
			return false;
	}
}

static void
BadKeyValue(const EdmType *t, const char *value)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
			 errmsg("invalid key value \"%s\" for a key of type %s", value, t->edm),
			 errhint("A key of type %s is %s.", t->edm, t->form)));
}

char *
CiflowEdmLiteral(const char *edm, const char *value)
{
	const EdmType *t = FindEdmType(edm);
	StringInfoData out;

	initStringInfo(&out);
	if (t == NULL || t->literal == EDM_LIT_STRING)
	{
		AppendQuoted(&out, value);
		return out.data;
	}
	switch (t->literal)
	{
		case EDM_LIT_DURATION:
			appendStringInfoString(&out, "duration");
			AppendQuoted(&out, value);
			break;
		case EDM_LIT_BINARY:
			appendStringInfoString(&out, "binary");
			AppendQuoted(&out, value);
			break;
		case EDM_LIT_BOOLEAN:
			if (pg_strcasecmp(value, "true") != 0 && pg_strcasecmp(value, "false") != 0)
				BadKeyValue(t, value);
			appendStringInfoString(&out, pg_strcasecmp(value, "true") == 0 ? "true" : "false");
			break;
		default:
			if (!IsPlainLiteral(t, value))
				BadKeyValue(t, value);
			appendStringInfoString(&out, value);
			break;
	}
	return out.data;
}

/* ciflow.edm_type(edm_type text): the column type a sync gives it. */
Datum
ciflow_edm_type(PG_FUNCTION_ARGS)
{
	PG_RETURN_OID(CiflowEdmTypeOid(text_to_cstring(PG_GETARG_TEXT_PP(0))));
}
