/*-------------------------------------------------------------------------
 *
 * runs.c
 *	  ciflow.sync_runs: a run is recorded as 'running' before its first
 *	  page, its progress after every page, and its end in the transaction
 *	  that publishes (or, after a failure, in one of its own), so a failed
 *	  run stays recorded even though its caller sees an ERROR.
 *
 *	  Writes go through prepared plans, as the catalog's owner; this file
 *	  does not start or end transactions (the executor does).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "ciflow.h"
#include "runs.h"

typedef enum RunPlan
{
	PLAN_INSERT,
	PLAN_PROGRESS,
	PLAN_FINISH,
	PLAN_ABANDONED,
	NUM_RUN_PLANS
} RunPlan;

static const struct
{
	const char *sql;
	int			nargs;
	Oid			types[9];
}			run_sql[NUM_RUN_PLANS] =
{
	[PLAN_INSERT] = {
		"INSERT INTO ciflow.sync_runs (connection, entity, target, mode, run_by, pid)"
		" VALUES ($1, $2, $3, $4, $5, $6) RETURNING id, started_at",
		6, {TEXTOID, TEXTOID, TEXTOID, TEXTOID, NAMEOID, INT4OID}
	},
	[PLAN_PROGRESS] = {
		"UPDATE ciflow.sync_runs SET pages = $2, rows = $3, api_calls = $4,"
		" retries = $5, http_status = $6, rows_expected = $7 WHERE id = $1",
		7, {INT8OID, INT4OID, INT8OID, INT4OID, INT4OID, INT4OID, INT8OID}
	},
	[PLAN_FINISH] = {
		"UPDATE ciflow.sync_runs SET pages = $2, rows = $3, api_calls = $4,"
		" retries = $5, http_status = $6, rows_expected = $7, status = $8,"
		" error = $9, finished_at = clock_timestamp() WHERE id = $1"
		" RETURNING finished_at",
		9, {INT8OID, INT4OID, INT8OID, INT4OID, INT4OID, INT4OID, INT8OID, TEXTOID, TEXTOID}
	},
	[PLAN_ABANDONED] = {
		"UPDATE ciflow.sync_runs SET status = 'failed', finished_at = clock_timestamp(),"
		" error = 'interrupted: the process running it ended before it finished'"
		" WHERE target = $1 AND status = 'running' AND id <> $2",
		2, {TEXTOID, INT8OID}
	},
};

static SPIPlanPtr run_plans[NUM_RUN_PLANS];

/*
 * Runs one of the plans as the catalog's owner; EndRunPlan() must follow
 * once any RETURNING values have been read.
 */
static void
ExecRunPlan(RunPlan which, Datum *values, const char *nulls,
			CiflowSavedUser *saved)
{
	int			rc;

	CiflowBecomeOwner(saved);
	SPI_connect();
	if (run_plans[which] == NULL)
	{
		SPIPlanPtr	plan = SPI_prepare(run_sql[which].sql, run_sql[which].nargs,
									   (Oid *) run_sql[which].types);

		if (plan == NULL)
			elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
		SPI_keepplan(plan);
		run_plans[which] = plan;
	}
	rc = SPI_execute_plan(run_plans[which], values, nulls, false, 0);
	if (rc < 0)
		elog(ERROR, "SPI_execute_plan failed: %s", SPI_result_code_string(rc));
}

static void
EndRunPlan(const CiflowSavedUser *saved)
{
	SPI_finish();
	CiflowRestoreUser(saved);
}

/* Reads column n of the single RETURNING row; call before SPI_finish. */
static Datum
Returned(int n)
{
	bool		isnull;

	return SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, n, &isnull);
}

void
CiflowRunInsert(CiflowRunState *run, const char *connection, const char *entity,
				const char *target, const char *mode)
{
	Datum		values[6];
	CiflowSavedUser saved;
	NameData	run_by;

	namestrcpy(&run_by, GetUserNameFromId(GetUserId(), false));
	values[0] = CStringGetTextDatum(connection);
	values[1] = CStringGetTextDatum(entity);
	values[2] = CStringGetTextDatum(target);
	values[3] = CStringGetTextDatum(mode);
	values[4] = NameGetDatum(&run_by);
	values[5] = Int32GetDatum(MyProcPid);
	ExecRunPlan(PLAN_INSERT, values, NULL, &saved);
	run->run_id = DatumGetInt64(Returned(1));
	run->started_at = DatumGetTimestampTz(Returned(2));
	run->pid = MyProcPid;
	EndRunPlan(&saved);
}

static void
CountersToDatums(const CiflowRunState *run, Datum *values, char *nulls)
{
	values[0] = Int64GetDatum(run->run_id);
	values[1] = Int32GetDatum(run->pages);
	values[2] = Int64GetDatum(run->rows);
	values[3] = Int32GetDatum(run->stats.calls);
	values[4] = Int32GetDatum(run->stats.retries);
	values[5] = Int32GetDatum(run->stats.last_status);
	nulls[5] = run->stats.last_status ? ' ' : 'n';
	values[6] = Int64GetDatum(run->rows_expected);
	nulls[6] = run->rows_expected >= 0 ? ' ' : 'n';
}

void
CiflowRunProgress(const CiflowRunState *run)
{
	Datum		values[7];
	char		nulls[8] = "       ";
	CiflowSavedUser saved;

	CountersToDatums(run, values, nulls);
	ExecRunPlan(PLAN_PROGRESS, values, nulls, &saved);
	EndRunPlan(&saved);
}

void
CiflowRunFinish(CiflowRunState *run, bool succeeded, const char *error)
{
	Datum		values[9];
	char		nulls[10] = "         ";
	CiflowSavedUser saved;

	CountersToDatums(run, values, nulls);
	values[7] = CStringGetTextDatum(succeeded ? "succeeded" : "failed");
	values[8] = error ? CStringGetTextDatum(error) : (Datum) 0;
	nulls[8] = error ? ' ' : 'n';
	ExecRunPlan(PLAN_FINISH, values, nulls, &saved);
	if (SPI_processed == 1)
		run->finished_at = DatumGetTimestampTz(Returned(1));
	EndRunPlan(&saved);
}

void
CiflowRunFailAbandoned(const char *target, int64 current_run)
{
	Datum		values[2];
	CiflowSavedUser saved;

	values[0] = CStringGetTextDatum(target);
	values[1] = Int64GetDatum(current_run);
	ExecRunPlan(PLAN_ABANDONED, values, NULL, &saved);
	EndRunPlan(&saved);
}
