/*-------------------------------------------------------------------------
 *
 * apply.h
 *	  Publishing a complete (or incremental) pull: the staged rows become
 *	  the target's in one transaction, as ordinary row changes.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CIFLOW_APPLY_H
#define CIFLOW_APPLY_H

#include "shape.h"
#include "target.h"

typedef enum CiflowPublishMethod
{
	CIFLOW_PUBLISH_DIFF,		/* INSERT, UPDATE, DELETE of the difference */
	CIFLOW_PUBLISH_UPSERT,		/* incremental: INSERT and UPDATE only */
	CIFLOW_PUBLISH_SWAP			/* replace the storage (publish => 'swap') */
} CiflowPublishMethod;

typedef struct CiflowApplyCounts
{
	int64		inserted;
	int64		updated;
	int64		deleted;
	int64		duplicates;		/* staged rows dropped: an older version */
} CiflowApplyCounts;

/*
 * In the publishing transaction (which the caller commits with the run's
 * end): de-duplicates the staged rows, then makes a new target of them
 * (target->relid set; the heap filled in place is the target from then
 * on), or applies the difference to the existing one.  staged is how many
 * rows the pull staged.  Lock waits are bounded by lock_timeout (one
 * minute when the session sets none).
 */
extern void CiflowApplyStaged(CiflowTarget *target, const CiflowShape *shape,
							  CiflowPublishMethod method, int64 staged,
							  CiflowApplyCounts *counts);

/* In a transaction: lock waits end (lock_timeout) unless already bounded. */
extern void CiflowBoundLockWaits(void);

/*
 * The largest staged value of the shape's incremental column, as text
 * (timestamps in UTC, ISO 8601), or NULL when there is none.
 */
extern char *CiflowStagedMaximum(const CiflowTarget *target, const CiflowShape *shape);

#endif							/* CIFLOW_APPLY_H */
