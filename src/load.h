/*-------------------------------------------------------------------------
 *
 * load.h
 *	  The rows of one page's body into typed tuples of the staging heap.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CIFLOW_LOAD_H
#define CIFLOW_LOAD_H

#include "utils/rel.h"
#include "pageparse.h"
#include "target.h"			/* CIFLOW_STAGE_SEQ, the shape */

typedef struct CiflowLoader CiflowLoader;

/*
 * Prepares conversions for the staging heap's descriptor; lives in cxt,
 * which must outlast the transactions of the run.  frozen: the heap is a
 * new table that becomes the target at publish, and its rows go in frozen
 * (see load.c).
 */
extern CiflowLoader *CiflowLoaderCreate(const CiflowShape *shape, Relation staging,
										bool frozen, MemoryContext cxt);

/*
 * A delta pull's pages also hold deletions ({"@odata.context":
 * ".../$deletedEntity", "id": key}): staged as the key alone, marked in
 * CIFLOW_STAGE_DELETED.  Needs a single-column key.  Off by default.
 */
extern void CiflowLoaderAcceptDeletions(CiflowLoader *loader, bool accept);

/*
 * Parses one page's body into tuples that the loader holds until
 * CiflowLoaderInsert; *info gets the page's annotations, valid until the
 * next page.  page_no is for messages.  In a transaction: a column type's
 * input function may read the catalogs.  The body is spent (its strings
 * are ended in place) and may be freed as soon as this returns.
 */
extern void CiflowLoaderParse(CiflowLoader *loader, char *body, size_t len,
							  int page_no, const char *failmsg, CiflowPageInfo *info);

/* Inserts the tuples of the page parsed last; returns how many. */
extern int	CiflowLoaderInsert(CiflowLoader *loader, Relation staging);

#endif							/* CIFLOW_LOAD_H */
