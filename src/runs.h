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
#include "nodes/pg_list.h"
#include "request.h"

/* Run-row fields a sync reports back. */
typedef struct CiflowRunState
{
	int64		run_id;
	int			pages;
	int			page_at;		/* the page being read or loaded (messages) */
	int64		rows;
	int64		rows_expected;	/* -1 when unknown */
	CiflowCallStats stats;
	TimestampTz started_at;
	TimestampTz finished_at;
	int			pid;			/* the process running it */
	int64		inserted;		/* the difference applied to the target */
	int64		updated;
	int64		deleted;
	char	   *watermark;		/* JSON text, or NULL: where the next
								 * incremental run resumes */
} CiflowRunState;

/* Each of these needs a transaction, and acts as the catalog's owner (catalog.c). */
extern void CiflowRunInsert(CiflowRunState *run, const char *connection,
							const char *entity, const char *target,
							const char *mode);
extern void CiflowRunProgress(const CiflowRunState *run);
extern void CiflowRunFinish(CiflowRunState *run, bool succeeded,
							const char *error);

/* Marks runs of this target left 'running' by a dead process as failed. */
extern void CiflowRunFailAbandoned(const char *target, int64 current_run);

/* The watermark of the target's last successful run (JSON text), or NULL. */
extern char *CiflowRunLastWatermark(const char *target);

/* Records the staging heap of a run (for the sweep after a crash); InvalidOid: gone. */
extern void CiflowRunSetStaging(int64 run_id, Oid staging_relid);

/* Staging heaps recorded by runs of this target left 'running' (Oids). */
extern List *CiflowRunAbandonedStaging(const char *target, int64 current_run);

/* Whether some run into this target has succeeded (it is ciflow's to fill). */
extern bool CiflowRunTargetFilled(const char *target);

/*
 * Fails every run left 'running' by a process that is gone; returns the
 * staging heaps they recorded (the launcher, at its start).
 */
extern List *CiflowRunFailInterrupted(void);

/*
 * Deletes up to batch finished runs older than retention_s (never the run
 * that holds a target's watermark); returns how many went.
 */
extern int64 CiflowRunTrim(int retention_s, int batch);

#endif							/* CIFLOW_RUNS_H */
