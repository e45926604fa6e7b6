/*-------------------------------------------------------------------------
 *
 * syncworker.c
 *	  ciflow.sync(): runs the sync executor in a dynamic background worker
 *	  and answers in the caller's session.
 *
 *	  Why a worker: a sync commits its run row, its pages and its end in
 *	  transactions of its own, which a function called inside the caller's
 *	  transaction cannot do.  The caller validates its arguments, resolves
 *	  the target with its own search_path, hands everything (its ciflow.*
 *	  settings included) to the worker through a DSM segment, waits, and
 *	  re-raises the worker's error or returns the finished run.  The worker
 *	  acts as the calling role.  Cancelling the caller (or its
 *	  statement_timeout) terminates the worker, which records its run as
 *	  failed before it exits.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "storage/dsm.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lock.h"
#include "storage/proc.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/timestamp.h"

#include "ciflow.h"
#include "connection.h"
#include "sync.h"
#include "target.h"

CIFLOW_SQL_FUNCTION(ciflow_sync);
PGDLLEXPORT void ciflow_sync_worker_main(Datum main_arg);

#define SYNC_SHARED_MAGIC 0x63696631

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

	/* written by the worker */
	bool		finished;
	bool		failed;
	CiflowRunState run;
	int			sqlerrcode;
	char		message[1024];
	char		detail[4096];
	char		hint[1024];

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

void
ciflow_sync_worker_main(Datum main_arg)
{
	dsm_segment *seg;
	SyncShared *sh;
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

	/*
	 * Connect as the role that logged in (it may log in), then act as the
	 * caller's current role, which may be a NOLOGIN role taken by SET ROLE.
	 */
	BackgroundWorkerInitializeConnectionByOid(sh->dbid, sh->login_userid, 0);
	SetUserIdAndSecContext(sh->userid, 0);
	ciflow_settings = sh->settings;

	args.connection = SharedString(sh, STR_CONNECTION);
	args.entity = SharedString(sh, STR_ENTITY);
	args.schema = SharedString(sh, STR_SCHEMA);
	args.table = SharedString(sh, STR_TABLE);
	args.filter = SharedString(sh, STR_FILTER);
	args.fields = SharedString(sh, STR_FIELDS);
	args.mode = SharedString(sh, STR_MODE);
	args.publish = SharedString(sh, STR_PUBLISH);
	args.adopt = sh->adopt;
	pgstat_report_appname("ciflow sync");

	PG_TRY();
	{
		CiflowSyncExecute(&args, &sh->run);
		sh->failed = false;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(TopMemoryContext);
		edata = CopyErrorData();
		FlushErrorState();
		sh->failed = true;
		sh->sqlerrcode = edata->sqlerrcode;
		strlcpy(sh->message, edata->message ? edata->message : "", sizeof(sh->message));
		strlcpy(sh->detail, edata->detail ? edata->detail : "", sizeof(sh->detail));
		strlcpy(sh->hint, edata->hint ? edata->hint : "", sizeof(sh->hint));
	}
	PG_END_TRY();

	pg_write_barrier();
	sh->finished = true;
	pgstat_report_activity(STATE_IDLE, NULL);
	dsm_detach(seg);
	proc_exit(0);
}

char *
SyncFailMessage(const char *connection, const char *entity)
{
	return psprintf("could not sync entity \"%s\" from connection \"%s\"",
					entity ? entity : "(null)", connection ? connection : "(null)");
}

static dsm_segment *
CreateShared(const char *strings[NUM_SYNC_STRINGS])
{
	Size		size = offsetof(SyncShared, strings);
	dsm_segment *seg;
	SyncShared *sh;
	int			i;
	int			off = 0;

	for (i = 0; i < NUM_SYNC_STRINGS; i++)
		size += strings[i] ? strlen(strings[i]) + 1 : 0;
	seg = dsm_create(size, 0);
	sh = dsm_segment_address(seg);
	memset(sh, 0, offsetof(SyncShared, strings));
	sh->magic = SYNC_SHARED_MAGIC;
	sh->dbid = MyDatabaseId;
	sh->login_userid = GetAuthenticatedUserId();
	sh->userid = GetUserId();
	sh->settings = ciflow_settings;
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
 * Waits for the worker; a cancel of the caller terminates it.  The wait
 * functions sleep on the latch and check for interrupts themselves.
 */
static void
RunWorker(dsm_segment *seg, const char *connection, const char *entity)
{
	BackgroundWorker worker;
	BackgroundWorkerHandle *handle;
	pid_t		pid;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = BGW_NEVER_RESTART;
	strlcpy(worker.bgw_library_name, "ciflow", BGW_MAXLEN);
	strlcpy(worker.bgw_function_name, "ciflow_sync_worker_main", BGW_MAXLEN);
	snprintf(worker.bgw_name, BGW_MAXLEN, "ciflow sync of %s from %s", entity, connection);
	strlcpy(worker.bgw_type, "ciflow sync", BGW_MAXLEN);
	worker.bgw_main_arg = UInt32GetDatum(dsm_segment_handle(seg));
	worker.bgw_notify_pid = MyProcPid;

	if (!RegisterDynamicBackgroundWorker(&worker, &handle))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_RESOURCES),
				 errmsg("%s", SyncFailMessage(connection, entity)),
				 errdetail("No background worker slot is free for the sync."),
				 errhint("Raise max_worker_processes, or run fewer syncs at once.")));

	PG_TRY();
	{
		if (WaitForBackgroundWorkerStartup(handle, &pid) == BGWH_STARTED)
			(void) WaitForBackgroundWorkerShutdown(handle);
	}
	PG_CATCH();
	{
		TerminateBackgroundWorker(handle);
		PG_RE_THROW();
	}
	PG_END_TRY();
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
	Datum		result;

	MemoryContext cxt = CurrentMemoryContext;

	strings[STR_CONNECTION] = CiflowTextArg(fcinfo, 0);
	strings[STR_ENTITY] = CiflowTextArg(fcinfo, 1);
	strings[STR_FILTER] = CiflowTextArg(fcinfo, 3);
	strings[STR_FIELDS] = CiflowTextArg(fcinfo, 4);
	strings[STR_MODE] = PG_ARGISNULL(5) ? "full" : CiflowTextArg(fcinfo, 5);
	strings[STR_PUBLISH] = PG_NARGS() <= 6 || PG_ARGISNULL(6) ? "diff" : CiflowTextArg(fcinfo, 6);

	CiflowRefuseRestricted();

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
		CiflowRethrowUnder(cxt, SyncFailMessage(strings[STR_CONNECTION],
												strings[STR_ENTITY]));
	}
	PG_END_TRY();
	strings[STR_SCHEMA] = schema;
	strings[STR_TABLE] = table;

	seg = CreateShared(strings);
	sh = dsm_segment_address(seg);
	sh->adopt = PG_NARGS() > 7 && !PG_ARGISNULL(7) && PG_GETARG_BOOL(7);
	RunWorker(seg, strings[STR_CONNECTION], strings[STR_ENTITY]);
	pg_read_barrier();

	if (!sh->finished)
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("%s", SyncFailMessage(strings[STR_CONNECTION], strings[STR_ENTITY])),
				 errdetail("The sync worker ended before it finished."),
				 errhint("See ciflow.sync_runs and the server log.")));
	if (sh->failed)
		ereport(ERROR,
				(errcode(sh->sqlerrcode),
				 errmsg("%s", sh->message),
				 sh->detail[0] ? errdetail("%s", sh->detail) : 0,
				 sh->hint[0] ? errhint("%s", sh->hint) : 0));

	result = RunRow(fcinfo, sh, CiflowTargetName(schema, table));
	dsm_detach(seg);
	PG_RETURN_DATUM(result);
}
