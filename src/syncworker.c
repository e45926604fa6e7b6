/*-------------------------------------------------------------------------
 *
 * syncworker.c
 *	  ciflow.sync(): runs the sync executor in a dynamic background worker
 *	  and answers in the caller's session.
 *
 *	  Why a worker: a sync commits its run row, its pages and its end in
 *	  transactions of its own, which a function called inside the caller's
 *	  transaction cannot do; like VACUUM it therefore refuses to run inside
 *	  a transaction block.  The caller validates its arguments, resolves
 *	  the target with its own search_path, hands everything (its ciflow.*
 *	  settings included) to the worker through a DSM segment, and waits.
 *	  The worker acts as the calling role.
 *
 *	  A sync belongs to its caller, as a parallel worker belongs to its
 *	  leader: the worker's NOTICEs, WARNINGs and its ERROR travel back
 *	  through a shm_mq (pq_redirect_to_shm_mq) and are raised in the
 *	  caller's session with every field; a cancel, statement_timeout or the
 *	  end of the caller's session terminates the worker (an error-cleanup
 *	  callback, which also runs at FATAL exit) and waits for it to record
 *	  its run as failed.  Page transactions do not wait for WAL flushes
 *	  (synchronous_commit off in the worker); the worker flushes the WAL of
 *	  its last commit before it reports.
 *
 *	  The launcher (launcher.c) starts the same worker for a run of a job
 *	  (CiflowStartJobWorker): a sync, or a monitoring pass for a watch, as
 *	  the job's owner.  No one waits for such a run: the segment has no
 *	  queue, the worker's messages go to the server log, and the run
 *	  records its outcome in the job's row (jobs.c) besides its run row.
 *	  This file owns the worker and its segment; it does not decide when
 *	  jobs run (launcher.c) nor what a run writes (sync.c, monitor.c).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/namespace.h"
#include "fmgr.h"
#include "funcapi.h"
#include "libpq/pqformat.h"
#include "libpq/pqmq.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "storage/dsm.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lock.h"
#include "storage/proc.h"
#include "storage/shm_mq.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "ciflow.h"
#include "connection.h"
#include "delivery.h"
#include "jobs.h"
#include "monitor.h"
#include "sync.h"
#include "syncworker.h"
#include "target.h"

CIFLOW_SQL_FUNCTION(ciflow_sync);
PGDLLEXPORT void ciflow_sync_worker_main(Datum main_arg);

#define SYNC_SHARED_MAGIC 0x63696632

/* The worker's messages: as roomy as a parallel worker's error queue. */
#define SYNC_QUEUE_SIZE 16384

/* The strings a sync needs, in this order, in SyncShared.strings. */
typedef enum SyncString
{
	STR_CONNECTION,
	STR_ENTITY,
	STR_SCHEMA,
	STR_TABLE,
	STR_FILTER,
	STR_FIELDS,
	STR_MODE,
	STR_PUBLISH,
	NUM_SYNC_STRINGS
} SyncString;

typedef struct SyncShared
{
	uint32		magic;
	Oid			dbid;
	Oid			login_userid;	/* the session's authenticated role */
	Oid			userid;			/* the role the sync acts as */
	bool		adopt;			/* may fill a table no run has filled */
	CiflowSettings settings;

	/* a run of a job (no caller waits): its id, 0 for ciflow.sync */
	int64		job_id;
	int64		event_id;		/* on_event jobs: the event it answers */
	bool		watch;			/* a monitoring pass, not a sync */
	bool		deliver;		/* a delivery pass (the launcher's) */

	/* written by the worker; its error comes through the queue */
	bool		finished;
	bool		failed;
	CiflowRunState run;			/* its pointers are the worker's: unusable */
	char		watermark[8192];	/* run.watermark's text, "" for none */

	Size		queue_offset;	/* the shm_mq, after the strings; 0: none */
	int			offsets[NUM_SYNC_STRINGS];	/* -1 for NULL */
	char		strings[FLEXIBLE_ARRAY_MEMBER];
} SyncShared;

static const char *
SharedString(const SyncShared *sh, SyncString which)
{
	return sh->offsets[which] < 0 ? NULL : sh->strings + sh->offsets[which];
}

/*
 * The worker turns SIGTERM into a query cancel: the executor's error path
 * then drops the staging heap and records the failed run before exiting.
 */
static void
SyncWorkerSigterm(SIGNAL_ARGS)
{
	int			save_errno = errno;

	QueryCancelPending = true;
	InterruptPending = true;
	SetLatch(MyLatch);
	errno = save_errno;
}

/*
 * Hands the worker's error to the caller through the queue, with every
 * field, and keeps it out of the worker's own log line: the caller's
 * session raises and logs it.
 */
static void
SendErrorToCaller(ErrorData *edata)
{
	edata->output_to_server = false;
	edata->output_to_client = true;
	PG_TRY();
	{
		ReThrowError(edata);
	}
	PG_CATCH();
	{
		EmitErrorReport();
		FlushErrorState();
	}
	PG_END_TRY();
}

static ErrorData *LogCaughtError(const char *what);

/* Runs step in a transaction of its own, with a snapshot. */
static void
InTransaction(void (*step) (SyncShared *sh, void *arg), SyncShared *sh, void *arg)
{
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	step(sh, arg);
	PopActiveSnapshot();
	CommitTransactionCommand();
}

static void
BeginJob(SyncShared *sh, void *arg)
{
	bool	   *found_and_owner = (bool *) arg;

	found_and_owner[0] = CiflowJobBegin(sh->job_id, &found_and_owner[1]);
}

static void
WatchPass(SyncShared *sh, void *arg)
{
	TupleDesc	desc;

	(void) sh;
	(void) CiflowMonitorPass(((CiflowSyncArgs *) arg)->connection, &desc);
}

static void
EndJob(SyncShared *sh, void *arg)
{
	CiflowJobEnd(sh->job_id, sh->run.run_id, sh->event_id, arg == NULL, (const char *) arg);
}

/*
 * One run of a job: the job is marked running, then the sync or the pass
 * runs as the job's owner, who can do no more than that role can (SET ROLE
 * is refused, as in a SECURITY DEFINER function), then the outcome goes
 * into the job's row.  An owner dropped since is the run's error.
 */
static void
RunJob(SyncShared *sh, CiflowSyncArgs *args)
{
	bool		found_and_owner[2] = {false, false};
	char	   *volatile error = NULL;
	char	   *what = psprintf("ciflow job " INT64_FORMAT, sh->job_id);

	pgstat_report_activity(STATE_RUNNING,
						   sh->watch ? psprintf("ciflow job " INT64_FORMAT ": watch of %s",
												sh->job_id, args->connection) :
						   psprintf("ciflow job " INT64_FORMAT ": sync of %s from %s",
									sh->job_id, args->entity, args->connection));
	InTransaction(BeginJob, sh, found_and_owner);
	if (!found_and_owner[0])
		return;					/* unscheduled since */
	if (!found_and_owner[1])
		error = psprintf("the role (OID %u) that scheduled ciflow job " INT64_FORMAT " no longer exists",
						 sh->userid, sh->job_id);
	else
	{
		Oid			save_userid;
		int			save_sec_context;

		GetUserIdAndSecContext(&save_userid, &save_sec_context);
		SetUserIdAndSecContext(sh->userid, save_sec_context | SECURITY_LOCAL_USERID_CHANGE);
		PG_TRY();
		{
			if (sh->watch)
				InTransaction(WatchPass, sh, args);
			else
				CiflowSyncExecute(args, &sh->run);
		}
		PG_CATCH();
		{
			ErrorData  *edata = LogCaughtError(what);

			error = edata->detail ? psprintf("%s: %s", edata->message, edata->detail) :
				pstrdup(edata->message);
		}
		PG_END_TRY();
		SetUserIdAndSecContext(save_userid, save_sec_context);
	}
	InTransaction(EndJob, sh, error);
}

static void RunForCaller(SyncShared *sh, CiflowSyncArgs *args);

/*
 * In a PG_CATCH of a run no caller waits for: the error, copied, cleared
 * and logged as what's failure, its transaction rolled back.
 */
static ErrorData *
LogCaughtError(const char *what)
{
	ErrorData  *edata;

	MemoryContextSwitchTo(TopMemoryContext);
	edata = CopyErrorData();
	FlushErrorState();
	AbortCurrentTransaction();
	ereport(LOG,
			(errmsg("%s failed: %s", what, edata->message),
			 edata->detail ? errdetail_internal("%s", edata->detail) : 0));
	return edata;
}

/*
 * A delivery pass started by the launcher: it commits its own short
 * transactions (delivery.c); an error goes to the server log, and the
 * deliveries it left are due again when their lease ends.
 */
static void
RunDeliveryPass(void)
{
	int			attempted = 0;

	pgstat_report_activity(STATE_RUNNING, "ciflow delivery pass");
	PG_TRY();
	{
		CiflowDeliveryPass(true, &attempted);
	}
	PG_CATCH();
	{
		(void) LogCaughtError("ciflow delivery pass");
	}
	PG_END_TRY();
}

void
ciflow_sync_worker_main(Datum main_arg)
{
	dsm_segment *seg;
	SyncShared *sh;
	shm_mq	   *mq;
	CiflowSyncArgs args;

	pqsignal(SIGTERM, SyncWorkerSigterm);
	BackgroundWorkerUnblockSignals();

	seg = dsm_attach(DatumGetUInt32(main_arg));
	if (seg == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("ciflow sync worker: its caller has gone away")));
	sh = dsm_segment_address(seg);
	if (sh->magic != SYNC_SHARED_MAGIC)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("ciflow sync worker: bad shared memory segment")));

	/* From here on, what the worker reports goes to the caller. */
	if (sh->queue_offset != 0)
	{
		mq = (shm_mq *) ((char *) sh + sh->queue_offset);
		shm_mq_set_sender(mq, MyProc);
		pq_redirect_to_shm_mq(seg, shm_mq_attach(mq, seg, NULL));
	}

	/*
	 * Connect as the role that logged in (it may log in), then act as the
	 * caller's current role, which may be a NOLOGIN role taken by SET ROLE.
	 * A job's run connects without a role and acts as the job's owner once
	 * it has checked that the owner still exists (RunJob).
	 */
	BackgroundWorkerInitializeConnectionByOid(sh->dbid, sh->login_userid, 0);
	if (sh->job_id == 0)
		SetUserIdAndSecContext(sh->userid, 0);
	ciflow_settings = sh->settings;

	/*
	 * Each page is a transaction of its own; none needs to wait for its WAL
	 * to reach disk, only the last one does (below).
	 */
	SetConfigOption("synchronous_commit", "off", PGC_USERSET, PGC_S_SESSION);

	args.connection = SharedString(sh, STR_CONNECTION);
	args.entity = SharedString(sh, STR_ENTITY);
	args.schema = SharedString(sh, STR_SCHEMA);
	args.table = SharedString(sh, STR_TABLE);
	args.filter = SharedString(sh, STR_FILTER);
	args.fields = SharedString(sh, STR_FIELDS);
	args.mode = SharedString(sh, STR_MODE);
	args.publish = SharedString(sh, STR_PUBLISH);
	args.adopt = sh->adopt;
	pgstat_report_appname(sh->deliver ? "ciflow delivery" :
						  sh->watch ? "ciflow watch" : "ciflow sync");

	if (sh->deliver)
		RunDeliveryPass();
	else if (sh->job_id != 0)
		RunJob(sh, &args);
	else
		RunForCaller(sh, &args);

	/* The run's end (and the data) are durable before the caller hears. */
	XLogFlush(XactLastCommitEnd);

	pg_write_barrier();
	sh->finished = true;
	pgstat_report_activity(STATE_IDLE, NULL);
	dsm_detach(seg);
	proc_exit(0);
}

/* A run of ciflow.sync: its outcome, and its error, go to the caller. */
static void
RunForCaller(SyncShared *sh, CiflowSyncArgs *args)
{
	PG_TRY();
	{
		CiflowSyncExecute(args, &sh->run);
		if (sh->run.watermark != NULL &&
			strlcpy(sh->watermark, sh->run.watermark, sizeof(sh->watermark)) >= sizeof(sh->watermark))
			sh->watermark[0] = '\0';	/* stored in full; the returned row shows NULL */
		sh->run.watermark = NULL;
		sh->failed = false;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(TopMemoryContext);
		edata = CopyErrorData();
		FlushErrorState();
		sh->failed = true;
		SendErrorToCaller(edata);
	}
	PG_END_TRY();
}


static dsm_segment *
CreateShared(const char *strings[NUM_SYNC_STRINGS], Size queue_size)
{
	Size		size = offsetof(SyncShared, strings);
	dsm_segment *seg;
	SyncShared *sh;
	int			i;
	int			off = 0;

	Size		queue_offset;

	for (i = 0; i < NUM_SYNC_STRINGS; i++)
		size += strings[i] ? strlen(strings[i]) + 1 : 0;
	queue_offset = queue_size > 0 ? MAXALIGN(size) : 0;
	size = MAXALIGN(size) + queue_size;
	seg = dsm_create(size, 0);
	sh = dsm_segment_address(seg);
	memset(sh, 0, offsetof(SyncShared, strings));
	sh->magic = SYNC_SHARED_MAGIC;
	sh->dbid = MyDatabaseId;
	sh->login_userid = GetAuthenticatedUserId();
	sh->userid = GetUserId();
	sh->settings = ciflow_settings;
	sh->queue_offset = queue_offset;
	for (i = 0; i < NUM_SYNC_STRINGS; i++)
	{
		sh->offsets[i] = strings[i] ? off : -1;
		if (strings[i])
		{
			strcpy(sh->strings + off, strings[i]);
			off += strlen(strings[i]) + 1;
		}
	}
	return seg;
}

/*
 * Runs at an error or FATAL exit of the caller while the worker runs: the
 * worker is told to stop and waited for, so that when the caller's error
 * (or its session's end) is seen, the run is recorded as failed and the
 * target is as it was.
 */
static void
StopWorker(int code, Datum arg)
{
	BackgroundWorkerHandle *handle = (BackgroundWorkerHandle *) DatumGetPointer(arg);

	(void) code;
	TerminateBackgroundWorker(handle);
	HOLD_INTERRUPTS();
	(void) WaitForBackgroundWorkerShutdown(handle);
	RESUME_INTERRUPTS();
}

/*
 * Re-raises a NOTICE or WARNING of the worker here; keeps its ERROR (the
 * last message it sends) for the caller to raise once the worker is gone.
 */
static void
HandleWorkerMessage(const char *data, Size nbytes, ErrorData **error)
{
	StringInfoData msg;
	char		msgtype;
	ErrorData	edata;

	initStringInfo(&msg);
	appendBinaryStringInfo(&msg, data, nbytes);
	msgtype = pq_getmsgbyte(&msg);
	if (msgtype != 'E' && msgtype != 'N')
		return;					/* NOTIFY and the like mean nothing here */
	pq_parse_errornotice(&msg, &edata);
	if (msgtype == 'E')
	{
		*error = palloc(sizeof(ErrorData));
		**error = edata;
		(*error)->elevel = ERROR;
	}
	else
	{
		edata.elevel = Min(edata.elevel, WARNING);
		ThrowErrorData(&edata);
	}
}

/*
 * Starts the worker of the segment, which tells this process when it
 * starts and stops; false when no worker slot is free.
 */
static bool
StartWorker(dsm_segment *seg, BackgroundWorkerHandle **handle)
{
	SyncShared *sh = dsm_segment_address(seg);
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = BGW_NEVER_RESTART;
	strlcpy(worker.bgw_library_name, "ciflow", BGW_MAXLEN);
	strlcpy(worker.bgw_function_name, "ciflow_sync_worker_main", BGW_MAXLEN);
	if (sh->deliver)
		strlcpy(worker.bgw_name, "ciflow delivery pass", BGW_MAXLEN);
	else if (sh->watch)
		snprintf(worker.bgw_name, BGW_MAXLEN, "ciflow watch of %s",
				 SharedString(sh, STR_CONNECTION));
	else
		snprintf(worker.bgw_name, BGW_MAXLEN, "ciflow sync of %s from %s",
				 SharedString(sh, STR_ENTITY), SharedString(sh, STR_CONNECTION));
	strlcpy(worker.bgw_type, sh->deliver ? "ciflow delivery" :
			sh->watch ? "ciflow watch" : "ciflow sync", BGW_MAXLEN);
	worker.bgw_main_arg = UInt32GetDatum(dsm_segment_handle(seg));
	worker.bgw_notify_pid = MyProcPid;
	return RegisterDynamicBackgroundWorker(&worker, handle);
}

dsm_segment *
CiflowStartJobWorker(const CiflowJob *job, BackgroundWorkerHandle **handle,
					 const char **error)
{
	const char *strings[NUM_SYNC_STRINGS];
	dsm_segment *seg;
	SyncShared *sh;

	memset(strings, 0, sizeof(strings));
	if (job != NULL)
	{
		strings[STR_CONNECTION] = job->connection;
		strings[STR_ENTITY] = job->watch ? NULL : job->entity;
		strings[STR_SCHEMA] = job->watch ? NULL : job->schema;
		strings[STR_TABLE] = job->watch ? NULL : job->table;
		strings[STR_MODE] = job->mode;
		strings[STR_PUBLISH] = "diff";
	}
	seg = CreateShared(strings, 0);
	sh = dsm_segment_address(seg);
	sh->login_userid = InvalidOid;
	sh->deliver = job == NULL;
	if (job != NULL)
	{
		sh->userid = job->owner;
		sh->job_id = job->id;
		sh->event_id = job->event_id;
		sh->watch = job->watch;
	}
	if (!StartWorker(seg, handle))
	{
		dsm_detach(seg);
		*error = "no background worker slot is free (raise max_worker_processes)";
		return NULL;
	}
	return seg;
}

bool
CiflowJobWorkerFinished(dsm_segment *seg)
{
	SyncShared *sh = dsm_segment_address(seg);

	pg_read_barrier();
	return sh->finished;
}

/*
 * Starts the worker and relays its messages until it is gone; returns its
 * ERROR, if it sent one.  The waits sleep on the latch, which the queue
 * sets, and check for interrupts.
 */
static ErrorData *
RunWorker(dsm_segment *seg, const char *connection, const char *entity)
{
	SyncShared *sh = dsm_segment_address(seg);
	shm_mq	   *mq = (shm_mq *) ((char *) sh + sh->queue_offset);
	shm_mq_handle *mqh;
	BackgroundWorkerHandle *handle;
	ErrorData  *error = NULL;

	mq = shm_mq_create(mq, SYNC_QUEUE_SIZE);
	shm_mq_set_receiver(mq, MyProc);

	if (!StartWorker(seg, &handle))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_RESOURCES),
				 errmsg("%s", CiflowSyncFailMessage(connection, entity)),
				 errdetail("No background worker slot is free for the sync."),
				 errhint("Raise max_worker_processes, or run fewer syncs at once.")));
	/* With the handle, a worker that never starts reads as detached. */
	mqh = shm_mq_attach(mq, seg, handle);

	PG_ENSURE_ERROR_CLEANUP(StopWorker, PointerGetDatum(handle));
	{
		for (;;)
		{
			Size		nbytes;
			void	   *data;
			shm_mq_result res;

			CHECK_FOR_INTERRUPTS();
			res = shm_mq_receive(mqh, &nbytes, &data, true);
			if (res == SHM_MQ_SUCCESS)
				HandleWorkerMessage(data, nbytes, &error);
			else if (res == SHM_MQ_DETACHED)
				break;
			else
			{
				(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_EXIT_ON_PM_DEATH, -1,
								 PG_WAIT_EXTENSION);
				ResetLatch(MyLatch);
			}
		}
		(void) WaitForBackgroundWorkerShutdown(handle);
	}
	PG_END_ENSURE_ERROR_CLEANUP(StopWorker, PointerGetDatum(handle));
	return error;
}

/*
 * The worker cannot see this transaction's uncommitted work, and would
 * wait forever for a lock this transaction holds on the target.
 */
static void
CheckCallerTransaction(const char *schema, const char *table)
{
	Oid			nspid = get_namespace_oid(schema, true);
	Oid			relid = OidIsValid(nspid) ? get_relname_relid(table, nspid) : InvalidOid;

	if (TransactionIdIsValid(GetTopTransactionIdIfAny()))
		ereport(ERROR,
				(errcode(ERRCODE_ACTIVE_SQL_TRANSACTION),
				 errmsg("ciflow.sync cannot run in a transaction that has already written data"),
				 errhint("Run it in a transaction of its own: the sync commits in a background worker.")));
	if (OidIsValid(relid))
	{
		LOCKTAG		tag;
		LOCKMODE	mode;

		SET_LOCKTAG_RELATION(tag, MyDatabaseId, relid);
		for (mode = AccessShareLock; mode <= AccessExclusiveLock; mode++)
		{
			if (LockHeldByMe(&tag, mode))
				ereport(ERROR,
						(errcode(ERRCODE_LOCK_NOT_AVAILABLE),
						 errmsg("ciflow.sync cannot replace %s while this transaction holds a lock on it",
								CiflowTargetName(schema, table)),
						 errhint("Run the sync outside the transaction that reads the table.")));
		}
	}
}

/* The finished run, as a row of ciflow.sync_runs. */
static Datum
RunRow(FunctionCallInfo fcinfo, const SyncShared *sh, const char *target)
{
	TupleDesc	desc;
	Datum	   *values;
	bool	   *nulls;
	int			i;
	const CiflowRunState *run = &sh->run;

	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "ciflow.sync must return ciflow.sync_runs");
	desc = BlessTupleDesc(desc);
	values = palloc0(sizeof(Datum) * desc->natts);
	nulls = palloc(sizeof(bool) * desc->natts);

	for (i = 0; i < desc->natts; i++)
	{
		const char *col = NameStr(TupleDescAttr(desc, i)->attname);

		nulls[i] = false;
		if (strcmp(col, "id") == 0)
			values[i] = Int64GetDatum(run->run_id);
		else if (strcmp(col, "connection") == 0)
			values[i] = CStringGetTextDatum(SharedString(sh, STR_CONNECTION));
		else if (strcmp(col, "entity") == 0)
			values[i] = CStringGetTextDatum(SharedString(sh, STR_ENTITY));
		else if (strcmp(col, "target") == 0)
			values[i] = CStringGetTextDatum(target);
		else if (strcmp(col, "mode") == 0)
			values[i] = CStringGetTextDatum(SharedString(sh, STR_MODE));
		else if (strcmp(col, "status") == 0)
			values[i] = CStringGetTextDatum("succeeded");
		else if (strcmp(col, "started_at") == 0)
			values[i] = TimestampTzGetDatum(run->started_at);
		else if (strcmp(col, "finished_at") == 0)
			values[i] = TimestampTzGetDatum(run->finished_at);
		else if (strcmp(col, "pages") == 0)
			values[i] = Int32GetDatum(run->pages);
		else if (strcmp(col, "rows") == 0)
			values[i] = Int64GetDatum(run->rows);
		else if (strcmp(col, "api_calls") == 0)
			values[i] = Int32GetDatum(run->stats.calls);
		else if (strcmp(col, "retries") == 0)
			values[i] = Int32GetDatum(run->stats.retries);
		else if (strcmp(col, "http_status") == 0 && run->stats.last_status != 0)
			values[i] = Int32GetDatum(run->stats.last_status);
		else if (strcmp(col, "rows_expected") == 0 && run->rows_expected >= 0)
			values[i] = Int64GetDatum(run->rows_expected);
		else if (strcmp(col, "inserted") == 0)
			values[i] = Int64GetDatum(run->inserted);
		else if (strcmp(col, "updated") == 0)
			values[i] = Int64GetDatum(run->updated);
		else if (strcmp(col, "deleted") == 0)
			values[i] = Int64GetDatum(run->deleted);
		else if (strcmp(col, "watermark") == 0 && sh->watermark[0] != '\0')
			values[i] = DirectFunctionCall1(jsonb_in, CStringGetDatum(sh->watermark));
		else if (strcmp(col, "pid") == 0)
			values[i] = Int32GetDatum(run->pid);
		else if (strcmp(col, "run_by") == 0)
			values[i] = DirectFunctionCall1(namein,
											CStringGetDatum(GetUserNameFromId(GetUserId(), false)));
		else
			nulls[i] = true;
	}
	return HeapTupleGetDatum(heap_form_tuple(desc, values, nulls));
}

Datum
ciflow_sync(PG_FUNCTION_ARGS)
{
	const char *strings[NUM_SYNC_STRINGS];
	char	   *schema;
	char	   *table;
	dsm_segment *seg;
	SyncShared *sh;
	ErrorData  *error;
	Datum		result;

	MemoryContext cxt = CurrentMemoryContext;

	strings[STR_CONNECTION] = CiflowTextArg(fcinfo, 0);
	strings[STR_ENTITY] = CiflowTextArg(fcinfo, 1);
	strings[STR_FILTER] = CiflowTextArg(fcinfo, 3);
	strings[STR_FIELDS] = CiflowTextArg(fcinfo, 4);
	strings[STR_MODE] = PG_ARGISNULL(5) ? "full" : CiflowTextArg(fcinfo, 5);
	strings[STR_PUBLISH] = PG_NARGS() <= 6 || PG_ARGISNULL(6) ? "diff" : CiflowTextArg(fcinfo, 6);

	CiflowRefuseRestricted();

	/* Like VACUUM: it commits on its own, which a ROLLBACK could not undo. */
	if (IsTransactionBlock() || IsSubTransaction())
		ereport(ERROR,
				(errcode(ERRCODE_ACTIVE_SQL_TRANSACTION),
				 errmsg("ciflow.sync cannot run inside a transaction block"),
				 errdetail("A sync commits its pages and its run in transactions of its own."),
				 errhint("Run it on its own, outside BEGIN ... COMMIT.")));

	/* Unknown connections and bad arguments fail here, before any worker. */
	PG_TRY();
	{
		if (strings[STR_ENTITY] == NULL || strings[STR_ENTITY][0] == '\0')
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("entity must not be null or empty")));
		if (strcmp(strings[STR_MODE], "full") != 0 &&
			strcmp(strings[STR_MODE], "incremental") != 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("invalid sync mode \"%s\"", strings[STR_MODE]),
					 errhint("Use 'full' or 'incremental'.")));
		if (strcmp(strings[STR_PUBLISH], "diff") != 0 &&
			strcmp(strings[STR_PUBLISH], "swap") != 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("invalid publish method \"%s\"", strings[STR_PUBLISH]),
					 errhint("Use 'diff' (row changes, the default) or 'swap'.")));
		(void) CiflowGetConnection(strings[STR_CONNECTION]);
		CiflowResolveTarget(strings[STR_CONNECTION], strings[STR_ENTITY],
							CiflowTextArg(fcinfo, 2), &schema, &table);
		CheckCallerTransaction(schema, table);
	}
	PG_CATCH();
	{
		CiflowRethrowUnder(cxt, CiflowSyncFailMessage(strings[STR_CONNECTION],
												strings[STR_ENTITY]));
	}
	PG_END_TRY();
	strings[STR_SCHEMA] = schema;
	strings[STR_TABLE] = table;

	seg = CreateShared(strings, SYNC_QUEUE_SIZE);
	sh = dsm_segment_address(seg);
	sh->adopt = PG_NARGS() > 7 && !PG_ARGISNULL(7) && PG_GETARG_BOOL(7);
	error = RunWorker(seg, strings[STR_CONNECTION], strings[STR_ENTITY]);
	pg_read_barrier();

	if (error != NULL)
		ThrowErrorData(error);
	if (!sh->finished)
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("%s", CiflowSyncFailMessage(strings[STR_CONNECTION], strings[STR_ENTITY])),
				 errdetail("The sync worker ended before it finished."),
				 errhint("See ciflow.sync_runs and the server log.")));
	if (sh->failed)
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("%s", CiflowSyncFailMessage(strings[STR_CONNECTION], strings[STR_ENTITY])),
				 errdetail("The sync worker failed without saying why."),
				 errhint("See ciflow.sync_runs and the server log.")));

	result = RunRow(fcinfo, sh, CiflowTargetName(schema, table));
	dsm_detach(seg);
	PG_RETURN_DATUM(result);
}
