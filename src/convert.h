/*-------------------------------------------------------------------------
 *
 * convert.h
 *	  JSON values (page parser tokens, or jansson) to PostgreSQL Datums
 *	  of a given type.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CIFLOW_CONVERT_H
#define CIFLOW_CONVERT_H

#include "ciflow_json.h"

#include "common/jsonapi.h"
#include "fmgr.h"
#include "utils/jsonb.h"

typedef struct CiflowConverter CiflowConverter;

/*
 * A scalar as the page parser delivers it (never NULL here: JSON null is
 * the caller's to handle); token is the converter's to modify.
 */
typedef Datum (*CiflowTokenConverter) (const CiflowConverter *conv, char *token,
									   JsonTokenType type);

struct CiflowConverter
{
	Oid			typid;
	int32		typmod;
	Oid			ioparam;
	FmgrInfo	input;			/* the type's input function */
	CiflowTokenConverter fn;	/* chosen once, by type */
};

/* jansson allocates with palloc in the current memory context. */
extern void CiflowJsonUsepalloc(void);

extern void CiflowConverterInit(CiflowConverter *conv, Oid typid, int32 typmod,
								MemoryContext cxt);

/* A composite (object or array) value's JSON text, UTF-8. */
extern Datum CiflowConvertComposite(const CiflowConverter *conv, const char *json, int len);

/* A jansson value (small documents); JSON null or NULL gives *isnull. */
extern Datum CiflowConvert(const CiflowConverter *conv, json_t *value, bool *isnull);

extern Jsonb *CiflowJsonToJsonb(json_t *value);

#endif							/* CIFLOW_CONVERT_H */
