/*-------------------------------------------------------------------------
 *
 * runs.h
 *	  ciflow.sync_runs bookkeeping.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CIFLOW_RUNS_H
#define CIFLOW_RUNS_H

#include "datatype/timestamp.h"
#include "request.h"

/* Run-row fields a sync reports back. */
typedef struct CiflowRunState
{
	int64		run_id;
	int			pages;
	int64		rows;
	int64		rows_expected;	/* -1 when unknown */
	CiflowCallStats stats;
	TimestampTz started_at;
	TimestampTz finished_at;
	int			pid;			/* the process running it */
} CiflowRunState;

/* Each of these needs a transaction, and writes as the catalog's owner. */
extern void CiflowRunInsert(CiflowRunState *run, const char *connection,
							const char *entity, const char *target,
							const char *mode);
extern void CiflowRunProgress(const CiflowRunState *run);
extern void CiflowRunFinish(CiflowRunState *run, bool succeeded,
							const char *error);

/* Marks runs of this target left 'running' by a dead process as failed. */
extern void CiflowRunFailAbandoned(const char *target, int64 current_run);

#endif							/* CIFLOW_RUNS_H */
