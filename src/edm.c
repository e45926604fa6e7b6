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

#include "catalog/pg_type.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"

#include "ciflow.h"
#include "edm.h"

CIFLOW_SQL_FUNCTION(ciflow_edm_type);

/* How a value of the type is written in a $filter (OData ABNF, part 2). */
typedef enum EdmLiteral
{
	EDM_LIT_STRING,				/* 'text', quotes doubled */
	EDM_LIT_NUMBER,				/* 42, -1.5, 1e3 */
	EDM_LIT_BOOLEAN,			/* true, false */
	EDM_LIT_PLAIN,				/* GUID, date, time, timestamp: unquoted */
	EDM_LIT_DURATION,			/* duration'P1DT2H' */
	EDM_LIT_BINARY				/* binary'base64url' */
} EdmLiteral;

typedef struct EdmType
{
	const char *edm;
	Oid			typid;
	EdmLiteral	literal;
} EdmType;

static const EdmType edm_types[] =
{
	{"Edm.String", TEXTOID, EDM_LIT_STRING},
	{"Edm.Boolean", BOOLOID, EDM_LIT_BOOLEAN},
	/* PostgreSQL has no one-byte integer: Byte and SByte both fit smallint. */
	{"Edm.Byte", INT2OID, EDM_LIT_NUMBER},
	{"Edm.SByte", INT2OID, EDM_LIT_NUMBER},
	{"Edm.Int16", INT2OID, EDM_LIT_NUMBER},
	{"Edm.Int32", INT4OID, EDM_LIT_NUMBER},
	{"Edm.Int64", INT8OID, EDM_LIT_NUMBER},
	{"Edm.Single", FLOAT4OID, EDM_LIT_NUMBER},
	{"Edm.Double", FLOAT8OID, EDM_LIT_NUMBER},
	{"Edm.Decimal", NUMERICOID, EDM_LIT_NUMBER},
	{"Edm.DateTimeOffset", TIMESTAMPTZOID, EDM_LIT_PLAIN},
	{"Edm.Date", DATEOID, EDM_LIT_PLAIN},
	{"Edm.TimeOfDay", TIMEOID, EDM_LIT_PLAIN},
	{"Edm.Duration", INTERVALOID, EDM_LIT_DURATION},
	{"Edm.Guid", UUIDOID, EDM_LIT_PLAIN},
	{"Edm.Binary", BYTEAOID, EDM_LIT_BINARY},
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

/*
 * An unquoted literal goes into the filter as it is, so it may hold only
 * the characters its type's literals use, and must be a value of the type
 * (checked by the PostgreSQL type's own input function, which raises 22P02
 * or 22007 with the type's usual words).
 */
static void
CheckPlainLiteral(const EdmType *t, const char *value)
{
	const char *allowed;
	const char *p;
	Oid			infunc;
	Oid			ioparam;

	switch (t->literal)
	{
		case EDM_LIT_NUMBER:
			allowed = "0123456789+-.eE";
			break;
		default:
			allowed = "0123456789abcdefABCDEF-:.TZ+";
			break;
	}
	for (p = value; *p; p++)
	{
		if (strchr(allowed, *p) == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
					 errmsg("invalid key value \"%s\" for a key of type %s", value, t->edm),
					 errdetail("A %s literal cannot contain \"%c\".", t->edm, *p)));
	}
	if (value[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
				 errmsg("invalid key value \"\" for a key of type %s", t->edm)));
	getTypeInputInfo(t->typid, &infunc, &ioparam);
	(void) OidInputFunctionCall(infunc, (char *) value, ioparam, -1);
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
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
						 errmsg("invalid key value \"%s\" for a key of type %s", value, t->edm),
						 errhint("An Edm.Boolean key is true or false.")));
			appendStringInfoString(&out, pg_strcasecmp(value, "true") == 0 ? "true" : "false");
			break;
		default:
			CheckPlainLiteral(t, value);
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
