/*-------------------------------------------------------------------------
 *
 * ciflow.c
 *	  Module entry point: GUCs, libcurl's global setup, and small helpers
 *	  every file shares.  It owns no behaviour of its own; anything about
 *	  connections, requests or syncs belongs to the file named after it.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <curl/curl.h>

#include "access/xact.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/resowner.h"

#include "auth.h"
#include "ciflow.h"
#include "convert.h"
#include "launcher.h"
#include "ratelimit.h"

PG_MODULE_MAGIC;

PGDLLEXPORT void _PG_init(void);

/* Filled in by the GUCs below: their boot values are the defaults. */
CiflowSettings ciflow_settings;
char	   *ciflow_database = NULL;

void
_PG_init(void)
{
	/*
	 * curl_global_init is not thread-safe, but a backend is single-threaded
	 * and loads us once.
	 */
	if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("ciflow: could not initialize libcurl")));

	DefineCustomIntVariable("ciflow.connect_timeout",
							"Time allowed to connect to the service.",
							NULL,
							&ciflow_settings.connect_timeout_ms,
							10000, 1, 600000,
							PGC_USERSET, GUC_UNIT_MS,
							NULL, NULL, NULL);
	DefineCustomIntVariable("ciflow.request_timeout",
							"Time allowed for one whole HTTP request.",
							NULL,
							&ciflow_settings.request_timeout_ms,
							60000, 1, 3600000,
							PGC_USERSET, GUC_UNIT_MS,
							NULL, NULL, NULL);
	DefineCustomIntVariable("ciflow.max_response_size",
							"Largest response body accepted from the service.",
							"One page must fit: a sync holds one page in memory at a time.  Superusers only: a huge value would let any role exhaust the server's memory.",
							&ciflow_settings.max_response_kb,
							65536, 1, 1048576,
							PGC_SUSET, GUC_UNIT_KB,
							NULL, NULL, NULL);
	DefineCustomIntVariable("ciflow.max_attempts",
							"Attempts per request before a retryable failure becomes an error.",
							"Applies to 429, 5xx and transport failures; other errors fail at once.",
							&ciflow_settings.max_attempts,
							5, 1, 100,
							PGC_USERSET, 0,
							NULL, NULL, NULL);
	DefineCustomIntVariable("ciflow.retry_base_delay",
							"First back-off delay; each retry doubles it (with 25% jitter).",
							NULL,
							&ciflow_settings.retry_base_delay_ms,
							1000, 0, 600000,
							PGC_USERSET, GUC_UNIT_MS,
							NULL, NULL, NULL);
	DefineCustomIntVariable("ciflow.max_retry_after",
							"Longest Retry-After wait honoured for one retry.",
							NULL,
							&ciflow_settings.max_retry_after_s,
							120, 0, 3600,
							PGC_USERSET, GUC_UNIT_S,
							NULL, NULL, NULL);
	DefineCustomIntVariable("ciflow.max_pages",
							"Most pages one sync reads before it fails (a paging-loop guard).",
							NULL,
							&ciflow_settings.max_pages,
							1000000, 1, INT_MAX,
							PGC_USERSET, 0,
							NULL, NULL, NULL);

	DefineCustomBoolVariable("ciflow.analyze_after_sync",
							 "Whether a sync that changed its target ends with ANALYZE of it.",
							 "Off, as after COPY: autovacuum analyzes a new or much changed table at its next pass.",
							 &ciflow_settings.analyze_after_sync,
							 false,
							 PGC_USERSET, 0,
							 NULL, NULL, NULL);

	DefineCustomIntVariable("ciflow.event_retention",
							"How long rows of ciflow.events are kept.",
							"ciflow.trim_events() deletes older ones.  Superusers only: the log is shared by every role.",
							&ciflow_settings.event_retention_s,
							30 * 24 * 3600, 1, INT_MAX,
							PGC_SUSET, GUC_UNIT_S,
							NULL, NULL, NULL);

	/*
	 * The launcher (launcher.c).  Its database is fixed at server start,
	 * and exists only then: a library loaded later may not define it.
	 */
	if (process_shared_preload_libraries_in_progress)
		DefineCustomStringVariable("ciflow.database",
								   "Database in which the launcher runs ciflow's jobs.",
								   "One launcher per cluster; its database must hold the extension.",
								   &ciflow_database,
								   "postgres",
								   PGC_POSTMASTER, 0,
								   NULL, NULL, NULL);
	DefineCustomIntVariable("ciflow.max_concurrent_jobs",
							"Most job runs (each a background worker) the launcher runs at once.",
							"Each takes a slot of max_worker_processes.",
							&ciflow_settings.max_concurrent_jobs,
							4, 1, 64,
							PGC_SIGHUP, 0,
							NULL, NULL, NULL);
	DefineCustomIntVariable("ciflow.max_backoff",
							"Longest delay before a failing job runs again.",
							"A failing job waits twice as long after each failure (with jitter), up to this.",
							&ciflow_settings.max_backoff_s,
							3600, 1, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);
	DefineCustomIntVariable("ciflow.run_retention",
							"How long finished rows of ciflow.sync_runs are kept.",
							"The launcher deletes older ones, except each target's last successful run.",
							&ciflow_settings.run_retention_s,
							30 * 24 * 3600, 1, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);
	DefineCustomIntVariable("ciflow.delivery_max_attempts",
							"Attempts per event delivery (the first included) before it is marked failed.",
							"Applies to 5xx, 408, 429 and transport failures; other answers fail at once.",
							&ciflow_settings.delivery_max_attempts,
							8, 1, 100,
							PGC_SUSET, 0,
							NULL, NULL, NULL);

	MarkGUCPrefixReserved("ciflow");

	CiflowJsonUsepalloc();
	CiflowAuthInit();
	CiflowRateLimitInit();
	CiflowLauncherInit();
	if (process_shared_preload_libraries_in_progress)
		CiflowLauncherRegister();
}

void
CiflowRefuseRestricted(void)
{
	if (InSecurityRestrictedOperation())
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("ciflow cannot be used within a security-restricted operation"),
				 errdetail("Index expressions, materialized view refreshes and maintenance commands run as another role than the one that issued them."),
				 errhint("Call ciflow directly, not from such an expression.")));
}

/* Secrets are wiped, not just freed, so no copy lingers in freed memory. */
void
CiflowFreeSecret(char *s)
{
	if (s)
	{
		explicit_bzero(s, strlen(s));
		pfree(s);
	}
}

ErrorData *
CiflowTrySubtransaction(void (*fn) (void *arg), void *arg)
{
	MemoryContext cxt = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;
	ErrorData  *volatile edata = NULL;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(cxt);
	PG_TRY();
	{
		fn(arg);
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(cxt);
		CurrentResourceOwner = owner;
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(cxt);
		CurrentResourceOwner = owner;
	}
	PG_END_TRY();
	return edata;
}

char *
CiflowTextArg(FunctionCallInfo fcinfo, int n)
{
	return PG_ARGISNULL(n) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(n));
}

bool
CiflowIsSimpleName(const char *name)
{
	const char *p;

	if (name == NULL || name[0] == '\0' || strlen(name) >= NAMEDATALEN)
		return false;
	if (!(name[0] == '_' || (name[0] >= 'a' && name[0] <= 'z')))
		return false;
	for (p = name; *p; p++)
	{
		if (!(*p == '_' || (*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9')))
			return false;
	}
	return true;
}
