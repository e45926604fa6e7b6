/*-------------------------------------------------------------------------
 *
 * jobs.h
 *	  ciflow.job_definitions: scheduling a job, the bookkeeping of its
 *	  runs, and pg_cron-style schedules.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CIFLOW_JOBS_H
#define CIFLOW_JOBS_H

#include "datatype/timestamp.h"

/* A parsed 5-field cron schedule (UTC), as pg_cron reads it. */
typedef struct CiflowCron
{
	uint64		minute;			/* bit n: minute n, 0-59 */
	uint32		hour;			/* bit n: hour n, 0-23 */
	uint32		dom;			/* bit n: day of month n, 1-31 */
	uint32		month;			/* bit n: month n, 1-12 */
	uint32		dow;			/* bit n: weekday n, 0 (Sunday) - 6 */
	bool		dom_star;		/* the field began with '*' */
	bool		dow_star;
} CiflowCron;

/* Parses spec; false (with *error set) if it is not a schedule. */
extern bool CiflowCronParse(const char *spec, CiflowCron *cron, char **error);

/* The first minute strictly after `after` that the schedule names, or 0. */
extern TimestampTz CiflowCronNext(const CiflowCron *cron, TimestampTz after);

/* A job the launcher may start now (read by CiflowJobNext). */
typedef struct CiflowJob
{
	int64		id;
	bool		watch;
	char	   *connection;
	char	   *entity;
	char	   *schema;
	char	   *table;
	char	   *mode;
	Oid			owner;
	bool		on_event;
	int64		event_id;		/* the next matching event, 0 for none */
	bool		has_next;		/* next_run_at is set */
	double		wait_s;			/* next_run_at - now, in seconds */
	bool		running;		/* a run of it is going on, by its row */
} CiflowJob;

/*
 * The enabled job with the smallest id above after_id, read in the current
 * transaction; false when there is none.
 */
extern bool CiflowJobNext(int64 after_id, CiflowJob *job);

/*
 * A run's own bookkeeping (each needs a transaction).  Begin marks the job
 * running; it returns false when the job is gone, and sets *owner_exists.
 * End records the outcome, the next run (with a back-off after a failure)
 * and moves an on_event job's cursor to the event the run answered
 * (event_id, 0 for none): a run that a crash interrupts before its end is
 * run again for the same event, one that ended never is.
 */
extern bool CiflowJobBegin(int64 job_id, bool *owner_exists);
extern void CiflowJobEnd(int64 job_id, int64 run_id, int64 event_id,
						 bool succeeded, const char *error);

/* Marks the jobs left 'running' by a gone process as failed (at the launcher's start). */
extern void CiflowJobsFailInterrupted(void);

#endif							/* CIFLOW_JOBS_H */
