/*-------------------------------------------------------------------------
 *
 * load.h
 *	  JSON rows of one page into typed tuples of the staging heap.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CIFLOW_LOAD_H
#define CIFLOW_LOAD_H

#include "ciflow_json.h"

#include "utils/rel.h"
#include "target.h"			/* CIFLOW_STAGE_SEQ, the shape */

typedef struct CiflowLoader CiflowLoader;

/*
 * Prepares conversions for the staging heap's descriptor; lives in cxt,
 * which must outlast the transactions of the run.
 */
extern CiflowLoader *CiflowLoaderCreate(const CiflowShape *shape,
										Relation staging, MemoryContext cxt);

/*
 * A delta pull's pages also hold deletions ({"@odata.context":
 * ".../$deletedEntity", "id": key}): staged as the key alone, marked in
 * CIFLOW_STAGE_DELETED.  Needs a single-column key.  Off by default.
 */
extern void CiflowLoaderAcceptDeletions(CiflowLoader *loader, bool accept);

/* Inserts one page's rows; returns how many.  page_no is for messages. */
extern int	CiflowLoadPage(CiflowLoader *loader, Relation staging,
						   json_t *rows, int page_no);

#endif							/* CIFLOW_LOAD_H */
