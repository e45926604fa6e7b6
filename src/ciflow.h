/*-------------------------------------------------------------------------
 *
 * ciflow.h
 *	  Settings shared by every part of ciflow, and small helpers.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CIFLOW_H
#define CIFLOW_H

#include "postgres.h"

#include "fmgr.h"

/*
 * Every GUC of ciflow lives in one struct so that a sync can hand the
 * caller's values to the background worker that runs it in one copy.
 */
typedef struct CiflowSettings
{
	int			connect_timeout_ms;
	int			request_timeout_ms;
	int			max_response_kb;
	int			max_attempts;
	int			retry_base_delay_ms;
	int			max_retry_after_s;
	int			max_pages;
	int			event_retention_s;	/* ciflow.events rows older than this go */
	int			run_retention_s;	/* ciflow.sync_runs rows older than this go */
	int			max_concurrent_jobs;	/* the launcher's children at once */
	int			max_backoff_s;	/* longest back-off of a failing job */
	int			delivery_max_attempts;	/* per event delivery, first included */
	bool		analyze_after_sync; /* ANALYZE a target a sync changed */
} CiflowSettings;

extern CiflowSettings ciflow_settings;

/* ciflow.database: where the launcher runs jobs. */
extern char *ciflow_database;

/*
 * Declares a SQL-callable function.  The library is built with hidden
 * visibility: these, the magic block, _PG_init and the worker's entry point
 * are all it exports, and all are named ciflow_*.
 */
#define CIFLOW_SQL_FUNCTION(name) \
	extern PGDLLEXPORT Datum name(PG_FUNCTION_ARGS); \
	PG_FUNCTION_INFO_V1(name)

/*
 * Refuses to work inside a security-restricted operation (an index
 * expression, REFRESH MATERIALIZED VIEW, maintenance as a table's owner):
 * a call to the service there would run as someone the caller chose.
 */
extern void CiflowRefuseRestricted(void);

/*
 * Runs fn(arg) in a subtransaction, as PL/pgSQL runs a block with an
 * EXCEPTION clause: the memory context and resource owner are left as they
 * were, whichever way it ends.  NULL when fn succeeded; else its error, in
 * the caller's context, rolled back: the caller rethrows it or drops it.
 */
extern ErrorData *CiflowTrySubtransaction(void (*fn) (void *arg), void *arg);

/* Wipes a palloc'd string that held a secret, then frees it (NULL is fine). */
extern void CiflowFreeSecret(char *s);

/* Argument n of a SQL-callable function as a C string, or NULL. */
extern char *CiflowTextArg(FunctionCallInfo fcinfo, int n);

/* Lower-case letters, digits and underscores, not starting with a digit. */
extern bool CiflowIsSimpleName(const char *name);

#endif							/* CIFLOW_H */
