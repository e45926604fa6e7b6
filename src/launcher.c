/*-------------------------------------------------------------------------
 *
 * launcher.c
 *	  The launcher: a background worker, started by the postmaster when
 *	  ciflow is in shared_preload_libraries, connected to the database that
 *	  ciflow.database names, which runs each job of ciflow.job_definitions
 *	  when it is due.  Each run is a dynamic background worker of its own
 *	  (syncworker.c), up to ciflow.max_concurrent_jobs at once, so that a
 *	  slow sync never delays another job; the launcher keeps their handles
 *	  and collects them when they stop.
 *
 *	  It sleeps on its latch until the next job is due.  Its latch is set
 *	  when a child starts or stops (bgw_notify_pid), and at the commit of a
 *	  transaction that changed the jobs or recorded an event (an xact
 *	  callback, CiflowLauncherWakeAtCommit): it never polls tables in a
 *	  loop.  Each pass is a few short transactions; no HTTP call is ever
 *	  made here.
 *
 *	  When it starts (after a crash or a restart too) it marks the runs
 *	  that no living process runs any more as failed, drops their staging
 *	  heaps, and marks the jobs they belonged to.  Once a minute it trims
 *	  ciflow.sync_runs and ciflow.events.  It also starts a delivery pass
 *	  (delivery.c, one at a time) whenever a pending delivery of
 *	  ciflow.deliveries is due.  A missing extension, or an error
 *	  in a pass, is logged at most once a minute and never makes it exit.
 *
 *	  Shared memory holds what ciflow.worker_status() shows, and the
 *	  launcher's pid and PGPROC number (never a pointer: a new incarnation
 *	  of the server starts with fresh memory, and other processes find the
 *	  latch through ProcGlobal).  SIGUSR1 is the default handler of a
 *	  database-connected worker, procsignal_sigusr1_handler, and the loop
 *	  checks for interrupts, so a DROP DATABASE's barrier is absorbed at
 *	  once.
 *
 *	  It does not run syncs or polls (syncworker.c) nor write job rows
 *	  itself (jobs.c, runs.c).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "commands/dbcommands.h"
#include "commands/extension.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "catalog.h"
#include "ciflow.h"
#include "jobs.h"
#include "launcher.h"
#include "runs.h"
#include "syncworker.h"
#include "target.h"

PGDLLEXPORT void ciflow_launcher_main(Datum main_arg);
CIFLOW_SQL_FUNCTION(ciflow_worker_status);
extern PGDLLEXPORT Datum ciflow_trim_events(PG_FUNCTION_ARGS);

#define MAX_CHILDREN 64
#define LOG_EVERY_MS (60 * 1000)		/* at most one log line a minute */
#define EXTENSION_RECHECK_MS (5 * 1000) /* while the extension is missing */
#define ERROR_RETRY_MS (5 * 1000)
#define TRIM_EVERY_MS (60 * 1000)
#define LONGEST_SLEEP_MS (3600 * 1000)
#define RUN_TRIM_BATCH 1000
#define DELIVERY_GAP_MS 1000	/* between the starts of two delivery passes */

typedef struct LauncherChildInfo
{
	int64		job_id;
	int			pid;			/* 0 until it has started */
	TimestampTz started_at;
} LauncherChildInfo;

/* What ciflow.worker_status() shows; guarded by mutex. */
typedef struct LauncherShared
{
	slock_t		mutex;
	int			pid;			/* 0: no launcher */
	int			pgprocno;
	char		state[64];
	char		database[NAMEDATALEN];
	TimestampTz started_at;
	int			max_children;
	int			nchildren;
	LauncherChildInfo children[MAX_CHILDREN];
	char		last_error[512];
	TimestampTz last_error_at;
} LauncherShared;

static LauncherShared *launcher_shared = NULL;
static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;
static bool wake_at_commit = false;

/* The launcher's own: its children and what it remembers between passes. */
typedef struct LauncherChild
{
	bool		used;
	int64		job_id;
	BackgroundWorkerHandle *handle;
	dsm_segment *seg;
	TimestampTz started_at;
} LauncherChild;

static LauncherChild children[MAX_CHILDREN];
static MemoryContext launcher_cxt = NULL;	/* the children's handles */
static MemoryContext pass_cxt = NULL;	/* reset after every pass */
static bool extension_present = false;
static TimestampTz last_trim = 0;
static TimestampTz last_error_logged = 0;
static TimestampTz last_missing_logged = 0;
static TimestampTz last_delivery_pass = 0;

/* ---------- shared memory, the commit hook ---------- */

static void
LauncherShmemRequest(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(LauncherShared)));
}

static void
LauncherShmemStartup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	launcher_shared = ShmemInitStruct("ciflow launcher", sizeof(LauncherShared), &found);
	if (!found)
	{
		memset(launcher_shared, 0, sizeof(LauncherShared));
		SpinLockInit(&launcher_shared->mutex);
		strlcpy(launcher_shared->state, "not started", sizeof(launcher_shared->state));
	}
	LWLockRelease(AddinShmemInitLock);
}

/* Sets the launcher's latch, found through its PGPROC number. */
static void
WakeLauncher(void)
{
	int			pid;
	int			pgprocno;

	if (launcher_shared == NULL)
		return;
	SpinLockAcquire(&launcher_shared->mutex);
	pid = launcher_shared->pid;
	pgprocno = launcher_shared->pgprocno;
	SpinLockRelease(&launcher_shared->mutex);
	if (pid == 0 || pgprocno < 0 || pgprocno >= (int) ProcGlobal->allProcCount)
		return;
	/* A stale number at worst sets another process's latch: a spurious wake. */
	if (ProcGlobal->allProcs[pgprocno].pid == pid)
		SetLatch(&ProcGlobal->allProcs[pgprocno].procLatch);
}

static void
LauncherXactCallback(XactEvent event, void *arg)
{
	(void) arg;
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			if (wake_at_commit)
				WakeLauncher();
			wake_at_commit = false;
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
		case XACT_EVENT_PREPARE:
			wake_at_commit = false;
			break;
		default:
			break;
	}
}

void
CiflowLauncherWakeAtCommit(void)
{
	wake_at_commit = true;
}

void
CiflowLauncherInit(void)
{
	RegisterXactCallback(LauncherXactCallback, NULL);
	if (!process_shared_preload_libraries_in_progress)
		return;
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = LauncherShmemRequest;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = LauncherShmemStartup;
}

void
CiflowLauncherRegister(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	/* After an exit of its own (a database that does not exist): once a minute. */
	worker.bgw_restart_time = 60;
	strlcpy(worker.bgw_library_name, "ciflow", BGW_MAXLEN);
	strlcpy(worker.bgw_function_name, "ciflow_launcher_main", BGW_MAXLEN);
	strlcpy(worker.bgw_name, "ciflow launcher", BGW_MAXLEN);
	strlcpy(worker.bgw_type, "ciflow launcher", BGW_MAXLEN);
	RegisterBackgroundWorker(&worker);
}

void
CiflowLauncherCheckDatabase(void)
{
	char	   *here;

	if (launcher_shared == NULL)
	{
		ereport(WARNING,
				(errcode(ERRCODE_WARNING),
				 errmsg("no ciflow launcher runs in this server: the job will not run"),
				 errdetail("ciflow is not in shared_preload_libraries."),
				 errhint("Add it, set ciflow.database, and restart the server.")));
		return;
	}
	here = get_database_name(MyDatabaseId);
	if (ciflow_database != NULL && here != NULL && strcmp(here, ciflow_database) != 0)
		ereport(WARNING,
				(errcode(ERRCODE_WARNING),
				 errmsg("the jobs of database \"%s\" do not run", here),
				 errdetail("The launcher runs the jobs of database \"%s\" (ciflow.database).",
						   ciflow_database),
				 errhint("Schedule the job in that database.")));
}

/* ---------- what worker_status() shows ---------- */

static void
SetState(const char *state)
{
	SpinLockAcquire(&launcher_shared->mutex);
	strlcpy(launcher_shared->state, state, sizeof(launcher_shared->state));
	launcher_shared->max_children = ciflow_settings.max_concurrent_jobs;
	SpinLockRelease(&launcher_shared->mutex);
}

static void
PublishChildren(void)
{
	int			i;
	int			n = 0;

	SpinLockAcquire(&launcher_shared->mutex);
	for (i = 0; i < MAX_CHILDREN; i++)
	{
		pid_t		pid = 0;

		if (!children[i].used)
			continue;
		(void) GetBackgroundWorkerPid(children[i].handle, &pid);
		launcher_shared->children[n].job_id = children[i].job_id;
		launcher_shared->children[n].pid = (int) pid;
		launcher_shared->children[n].started_at = children[i].started_at;
		n++;
	}
	launcher_shared->nchildren = n;
	SpinLockRelease(&launcher_shared->mutex);
}

/*
 * Keeps the error for worker_status() and logs it, at most once a minute
 * (a missing table or a dropped extension must not flood the log).
 */
static void
ReportProblem(const char *message, TimestampTz *last_logged)
{
	TimestampTz now = GetCurrentTimestamp();

	SpinLockAcquire(&launcher_shared->mutex);
	strlcpy(launcher_shared->last_error, message, sizeof(launcher_shared->last_error));
	launcher_shared->last_error_at = now;
	SpinLockRelease(&launcher_shared->mutex);
	if (*last_logged == 0 || TimestampDifferenceExceeds(*last_logged, now, LOG_EVERY_MS))
	{
		ereport(LOG,
				(errmsg("ciflow launcher: %s", message),
				 errhint("The launcher keeps running; this is logged at most once a minute.")));
		*last_logged = now;
	}
}

static void
LauncherExit(int code, Datum arg)
{
	(void) code;
	(void) arg;
	SpinLockAcquire(&launcher_shared->mutex);
	launcher_shared->pid = 0;
	launcher_shared->nchildren = 0;
	strlcpy(launcher_shared->state, "stopped", sizeof(launcher_shared->state));
	SpinLockRelease(&launcher_shared->mutex);
}

/* ---------- one pass ---------- */

typedef void (*PassStep) (void *arg);

/*
 * Runs step in a transaction of its own; an error is reported and rolled
 * back, and the launcher goes on.  Returns whether it succeeded.
 */
static bool
InTransaction(PassStep step, void *arg, const char *activity)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	volatile bool ok = true;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, activity);
	PG_TRY();
	{
		step(arg);
		PopActiveSnapshot();
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(pass_cxt);
		edata = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		ReportProblem(psprintf("%s: %s", activity, edata->message), &last_error_logged);
		FreeErrorData(edata);
		ok = false;
	}
	PG_END_TRY();
	MemoryContextSwitchTo(oldcxt);
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);
	return ok;
}

static void
CheckExtension(void *arg)
{
	*(bool *) arg = OidIsValid(get_extension_oid("ciflow", true));
}

/* Runs and jobs that no living process runs any more are failed. */
static void
SweepInterrupted(void *arg)
{
	List	   *staging = CiflowRunFailInterrupted();

	(void) arg;
	CiflowSweepStaging(staging);
	CiflowJobsFailInterrupted();
}

static int
ChildCount(void)
{
	int			i;
	int			n = 0;

	for (i = 0; i < MAX_CHILDREN; i++)
		n += children[i].used;
	return n;
}

static bool
ChildRunning(int64 job_id)
{
	int			i;

	for (i = 0; i < MAX_CHILDREN; i++)
		if (children[i].used && children[i].job_id == job_id)
			return true;
	return false;
}

static bool
StartChild(const CiflowJob *job)
{
	int			i;
	MemoryContext oldcxt;
	const char *error = NULL;
	LauncherChild *child = NULL;

	for (i = 0; i < MAX_CHILDREN && child == NULL; i++)
		if (!children[i].used)
			child = &children[i];
	if (child == NULL)
		return false;
	oldcxt = MemoryContextSwitchTo(launcher_cxt);
	child->seg = CiflowStartJobWorker(job, &child->handle, &error);
	MemoryContextSwitchTo(oldcxt);
	if (child->seg == NULL)
	{
		ReportProblem(job ? psprintf("could not start job " INT64_FORMAT ": %s", job->id, error) :
					  psprintf("could not start a delivery pass: %s", error),
					  &last_error_logged);
		return false;
	}
	/* The segment outlives this transaction: the child may not have attached yet. */
	dsm_pin_mapping(child->seg);
	child->used = true;
	child->job_id = job ? job->id : 0;
	child->started_at = GetCurrentTimestamp();
	return true;
}

/* When the next pending delivery is due (seconds from now); NULL: none. */
static CiflowCatalogStatement next_delivery = {
	.sql = "SELECT pg_catalog.date_part('epoch', pg_catalog.min(next_attempt_at)"
	" OPERATOR(pg_catalog.-) pg_catalog.clock_timestamp())"
	" FROM ciflow.deliveries WHERE status OPERATOR(pg_catalog.=) 'pending'",
	.nargs = 0
};

/*
 * One delivery pass at a time (its child has job id 0) when a delivery is
 * due; the commit that records an event (and its deliveries) wakes us.
 */
static void
StartDeliveries(long *sleep_ms)
{
	HeapTuple	tup;
	TupleDesc	desc;
	bool		isnull;
	double		wait_s;

	if (ChildRunning(0))
		return;					/* its end wakes us */
	if (last_delivery_pass != 0 &&
		!TimestampDifferenceExceeds(last_delivery_pass, GetCurrentTimestamp(), DELIVERY_GAP_MS))
	{
		*sleep_ms = Min(*sleep_ms, DELIVERY_GAP_MS);
		return;
	}
	if (CiflowCatalogExecute(&next_delivery, NULL, NULL, &tup, &desc) == 0 || tup == NULL)
		return;
	wait_s = DatumGetFloat8(heap_getattr(tup, 1, desc, &isnull));
	if (isnull)
		return;
	if (wait_s > 0)
		*sleep_ms = Min(*sleep_ms, (long) (wait_s * 1000.0) + 1);
	else if (ChildCount() < ciflow_settings.max_concurrent_jobs)
	{
		if (StartChild(NULL))
			last_delivery_pass = GetCurrentTimestamp();
		else
			*sleep_ms = Min(*sleep_ms, ERROR_RETRY_MS);
	}
}

/* Starts the due jobs; *sleep_ms: until the next one is due. */
static void
StartDueJobs(void *arg)
{
	long	   *sleep_ms = (long *) arg;
	CiflowJob	job;
	int64		after = 0;

	while (CiflowJobNext(after, &job))
	{
		bool		due;

		after = job.id;
		CHECK_FOR_INTERRUPTS();
		if (ChildRunning(job.id) || job.running)
			continue;			/* never two runs of one job */
		if (job.on_event && job.event_id == 0)
			continue;			/* a commit that records an event wakes us */
		due = !job.has_next || job.wait_s <= 0;
		if (!due)
		{
			*sleep_ms = Min(*sleep_ms, (long) (job.wait_s * 1000.0) + 1);
			continue;
		}
		if (ChildCount() >= ciflow_settings.max_concurrent_jobs)
			continue;			/* a child's end wakes us */
		if (!StartChild(&job))
			*sleep_ms = Min(*sleep_ms, ERROR_RETRY_MS);
	}
	StartDeliveries(sleep_ms);
}

/*
 * A child that stopped without reaching its run's end (it could not
 * connect, or was terminated): its job records the failure.
 */
static void
RecordLostRun(void *arg)
{
	/* The event it answered, if any, stays due: the run is made again. */
	CiflowJobEnd(*(int64 *) arg, 0, 0, false,
				 "the job's worker ended before its run finished (see the server log)");
}

static void
CollectChildren(void)
{
	int			i;

	for (i = 0; i < MAX_CHILDREN; i++)
	{
		pid_t		pid;
		BgwHandleStatus status;
		bool		finished;
		int64		job_id;

		if (!children[i].used)
			continue;
		status = GetBackgroundWorkerPid(children[i].handle, &pid);
		if (status == BGWH_POSTMASTER_DIED)
			proc_exit(1);
		if (status != BGWH_STOPPED)
			continue;
		finished = CiflowJobWorkerFinished(children[i].seg);
		job_id = children[i].job_id;
		dsm_detach(children[i].seg);
		pfree(children[i].handle);
		children[i].used = false;
		if (!finished && job_id != 0)
			(void) InTransaction(RecordLostRun, &job_id, "ciflow launcher: recording a lost run");
	}
	PublishChildren();
}

/* Old runs and events go, in batches found through an index. */
static void
TrimRuns(void *arg)
{
	*(int64 *) arg = CiflowRunTrim(ciflow_settings.run_retention_s, RUN_TRIM_BATCH);
}

static void
TrimEvents(void *arg)
{
	LOCAL_FCINFO(fcinfo, 0);

	(void) arg;
	InitFunctionCallInfoData(*fcinfo, NULL, 0, InvalidOid, NULL, NULL);
	(void) ciflow_trim_events(fcinfo);
}

static void
Trim(void)
{
	int64		n;

	do
	{
		n = 0;
		CHECK_FOR_INTERRUPTS();
		if (!InTransaction(TrimRuns, &n, "ciflow launcher: trimming ciflow.sync_runs"))
			break;
	} while (n == RUN_TRIM_BATCH);
	(void) InTransaction(TrimEvents, NULL, "ciflow launcher: trimming ciflow.events");
	last_trim = GetCurrentTimestamp();
}

/* One pass; returns how long to sleep. */
static long
LauncherPass(void)
{
	long		sleep_ms = LONGEST_SLEEP_MS;
	bool		present = false;

	if (!InTransaction(CheckExtension, &present, "ciflow launcher: looking for the extension"))
		return ERROR_RETRY_MS;
	if (!present)
	{
		extension_present = false;
		SetState("waiting for CREATE EXTENSION ciflow");
		ReportProblem(psprintf("extension \"ciflow\" is not installed in database \"%s\"",
							   ciflow_database),
					  &last_missing_logged);
		return EXTENSION_RECHECK_MS;
	}
	if (!extension_present)
	{
		/* At start, and when the extension is created again. */
		if (!InTransaction(SweepInterrupted, NULL, "ciflow launcher: marking interrupted runs"))
			return ERROR_RETRY_MS;
		extension_present = true;
		last_trim = 0;
	}
	SetState("running");
	if (!InTransaction(StartDueJobs, &sleep_ms, "ciflow launcher: starting due jobs"))
		sleep_ms = ERROR_RETRY_MS;
	PublishChildren();
	if (last_trim == 0 ||
		TimestampDifferenceExceeds(last_trim, GetCurrentTimestamp(), TRIM_EVERY_MS))
		Trim();
	if (last_trim != 0)
		sleep_ms = Min(sleep_ms, TRIM_EVERY_MS);
	return Max(sleep_ms, 1);
}

void
ciflow_launcher_main(Datum main_arg)
{
	(void) main_arg;
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	if (launcher_shared == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("ciflow launcher: ciflow must be in shared_preload_libraries")));

	/* A database that does not exist: FATAL, and the postmaster retries in a minute. */
	BackgroundWorkerInitializeConnection(ciflow_database, NULL, 0);
	pgstat_report_appname("ciflow launcher");

	launcher_cxt = AllocSetContextCreate(TopMemoryContext, "ciflow launcher",
										 ALLOCSET_DEFAULT_SIZES);
	pass_cxt = AllocSetContextCreate(TopMemoryContext, "ciflow launcher pass",
									 ALLOCSET_DEFAULT_SIZES);
	MemoryContextSwitchTo(pass_cxt);
	SpinLockAcquire(&launcher_shared->mutex);
	launcher_shared->pid = MyProcPid;
	launcher_shared->pgprocno = MyProc->pgprocno;
	launcher_shared->started_at = GetCurrentTimestamp();
	launcher_shared->nchildren = 0;
	strlcpy(launcher_shared->database, ciflow_database, sizeof(launcher_shared->database));
	SpinLockRelease(&launcher_shared->mutex);
	before_shmem_exit(LauncherExit, (Datum) 0);
	SetState("starting");

	for (;;)
	{
		long		sleep_ms;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		CollectChildren();
		sleep_ms = LauncherPass();
		MemoryContextReset(pass_cxt);
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 sleep_ms, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}

/* ---------- ciflow.worker_status() ---------- */

Datum
ciflow_worker_status(PG_FUNCTION_ARGS)
{
	TupleDesc	desc;
	Datum		values[9];
	bool		nulls[9] = {0};
	LauncherShared copy;
	StringInfoData buf;
	int			i;

	CiflowRefuseRestricted();
	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "ciflow.worker_status must return a record");
	desc = BlessTupleDesc(desc);

	if (launcher_shared == NULL)
	{
		values[0] = CStringGetTextDatum("not loaded: ciflow is not in shared_preload_libraries");
		for (i = 1; i < 9; i++)
			nulls[i] = true;
		PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(desc, values, nulls)));
	}
	SpinLockAcquire(&launcher_shared->mutex);
	memcpy(&copy, launcher_shared, sizeof(copy));
	SpinLockRelease(&launcher_shared->mutex);

	initStringInfo(&buf);
	appendStringInfoChar(&buf, '[');
	for (i = 0; i < copy.nchildren && copy.pid != 0; i++)
		appendStringInfo(&buf, "%s{\"job_id\": " INT64_FORMAT ", \"pid\": %d, \"started_at\": \"%s\"}",
						 i > 0 ? ", " : "", copy.children[i].job_id, copy.children[i].pid,
						 timestamptz_to_str(copy.children[i].started_at));
	appendStringInfoChar(&buf, ']');

	values[0] = CStringGetTextDatum(copy.state);
	values[1] = Int32GetDatum(copy.pid);
	nulls[1] = copy.pid == 0;
	values[2] = CStringGetTextDatum(copy.database);
	nulls[2] = copy.database[0] == '\0';
	values[3] = TimestampTzGetDatum(copy.started_at);
	nulls[3] = copy.started_at == 0;
	values[4] = Int32GetDatum(copy.max_children);
	nulls[4] = copy.pid == 0;
	values[5] = Int32GetDatum(copy.pid != 0 ? copy.nchildren : 0);
	values[6] = DirectFunctionCall1(jsonb_in, CStringGetDatum(buf.data));
	values[7] = CStringGetTextDatum(copy.last_error);
	nulls[7] = copy.last_error[0] == '\0';
	values[8] = TimestampTzGetDatum(copy.last_error_at);
	nulls[8] = copy.last_error_at == 0;
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(desc, values, nulls)));
}
