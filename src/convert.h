/*-------------------------------------------------------------------------
 *
 * convert.h
 *	  JSON values (jansson) to PostgreSQL Datums of a given type.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CIFLOW_CONVERT_H
#define CIFLOW_CONVERT_H

#include "ciflow_json.h"

#include "fmgr.h"
#include "utils/jsonb.h"

typedef struct CiflowConverter
{
	Oid			typid;
	int32		typmod;
	Oid			ioparam;
	FmgrInfo	input;			/* the type's input function */
} CiflowConverter;

/* jansson allocates with palloc in the current memory context. */
extern void CiflowJsonUsepalloc(void);

extern void CiflowConverterInit(CiflowConverter *conv, Oid typid, int32 typmod,
								MemoryContext cxt);

/* JSON null or a missing value (NULL) gives *isnull. */
extern Datum CiflowConvert(const CiflowConverter *conv, json_t *value, bool *isnull);

extern Jsonb *CiflowJsonToJsonb(json_t *value);

#endif							/* CIFLOW_CONVERT_H */
