/*-------------------------------------------------------------------------
 *
 * runs.c
 *	  ciflow.sync_runs: a run is recorded as 'running' before its first
 *	  page, its progress after every page, and its end in the transaction
 *	  that publishes (or, after a failure, in one of its own), so a failed
 *	  run stays recorded even though its caller sees an ERROR.
 *
 *	  Statements go through catalog.c (prepared plans, as the extension's
 *	  owner, nothing of the caller's runs); this file does not start or end
 *	  transactions (the sync executor does).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "catalog.h"
#include "ciflow.h"
#include "events.h"
#include "runs.h"

static CiflowCatalogStatement insert_run = {
	.sql = "INSERT INTO ciflow.sync_runs (connection, entity, target, mode, run_by, pid)"
	" VALUES ($1, $2, $3, $4, $5, $6) RETURNING id, started_at",
	.nargs = 6,
	.types = {TEXTOID, TEXTOID, TEXTOID, TEXTOID, NAMEOID, INT4OID}
};

static CiflowCatalogStatement progress_run = {
	.sql = "UPDATE ciflow.sync_runs SET pages = $2, rows = $3, api_calls = $4,"
	" retries = $5, http_status = $6, rows_expected = $7"
	" WHERE id OPERATOR(pg_catalog.=) $1",
	.nargs = 7,
	.types = {INT8OID, INT4OID, INT8OID, INT4OID, INT4OID, INT4OID, INT8OID}
};

static CiflowCatalogStatement finish_run = {
	.sql = "UPDATE ciflow.sync_runs SET pages = $2, rows = $3, api_calls = $4,"
	" retries = $5, http_status = $6, rows_expected = $7, status = $8,"
	" error = $9, inserted = $10, updated = $11, deleted = $12,"
	" watermark = $13::pg_catalog.jsonb,"
	" finished_at = pg_catalog.clock_timestamp()"
	" WHERE id OPERATOR(pg_catalog.=) $1 RETURNING finished_at",
	.nargs = 13,
	.types = {INT8OID, INT4OID, INT8OID, INT4OID, INT4OID, INT4OID, INT8OID, TEXTOID,
	TEXTOID, INT8OID, INT8OID, INT8OID, TEXTOID}
};

static CiflowCatalogStatement fail_abandoned = {
	.sql = "UPDATE ciflow.sync_runs SET status = 'failed',"
	" finished_at = pg_catalog.clock_timestamp(),"
	" error = 'interrupted: the process running it ended before it finished'"
	" WHERE target OPERATOR(pg_catalog.=) $1"
	" AND status OPERATOR(pg_catalog.=) 'running' AND id OPERATOR(pg_catalog.<>) $2",
	.nargs = 2,
	.types = {TEXTOID, INT8OID}
};

static CiflowCatalogStatement last_watermark = {
	.sql = "SELECT watermark::pg_catalog.text FROM ciflow.sync_runs"
	" WHERE target OPERATOR(pg_catalog.=) $1"
	" AND status OPERATOR(pg_catalog.=) 'succeeded' AND watermark IS NOT NULL"
	" ORDER BY id DESC LIMIT 1",
	.nargs = 1,
	.types = {TEXTOID}
};

/* Reads column n of a RETURNING row. */
static Datum
Returned(HeapTuple tup, TupleDesc desc, int n)
{
	bool		isnull;

	return heap_getattr(tup, n, desc, &isnull);
}

void
CiflowRunInsert(CiflowRunState *run, const char *connection, const char *entity,
				const char *target, const char *mode)
{
	Datum		values[6];
	NameData	run_by;
	HeapTuple	tup;
	TupleDesc	desc;

	namestrcpy(&run_by, GetUserNameFromId(GetUserId(), false));
	values[0] = CStringGetTextDatum(connection);
	values[1] = CStringGetTextDatum(entity);
	values[2] = CStringGetTextDatum(target);
	values[3] = CStringGetTextDatum(mode);
	values[4] = NameGetDatum(&run_by);
	values[5] = Int32GetDatum(MyProcPid);
	(void) CiflowCatalogExecute(&insert_run, values, NULL, &tup, &desc);
	run->run_id = DatumGetInt64(Returned(tup, desc, 1));
	run->started_at = DatumGetTimestampTz(Returned(tup, desc, 2));
	run->pid = MyProcPid;
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

	CountersToDatums(run, values, nulls);
	(void) CiflowCatalogExecute(&progress_run, values, nulls, NULL, NULL);
}

void
CiflowRunFinish(CiflowRunState *run, bool succeeded, const char *error)
{
	Datum		values[13];
	char		nulls[14] = "             ";
	HeapTuple	tup;
	TupleDesc	desc;

	CountersToDatums(run, values, nulls);
	values[7] = CStringGetTextDatum(succeeded ? "succeeded" : "failed");
	values[8] = error ? CStringGetTextDatum(error) : (Datum) 0;
	nulls[8] = error ? ' ' : 'n';
	values[9] = Int64GetDatum(run->inserted);
	values[10] = Int64GetDatum(run->updated);
	values[11] = Int64GetDatum(run->deleted);
	/* A failed run never advances the watermark. */
	values[12] = (succeeded && run->watermark) ? CStringGetTextDatum(run->watermark) : (Datum) 0;
	nulls[12] = (succeeded && run->watermark) ? ' ' : 'n';
	if (CiflowCatalogExecute(&finish_run, values, nulls, &tup, &desc) == 1)
		run->finished_at = DatumGetTimestampTz(Returned(tup, desc, 1));
	CiflowEventRecordSyncEnd(run->run_id);
}

void
CiflowRunFailAbandoned(const char *target, int64 current_run)
{
	Datum		values[2];

	values[0] = CStringGetTextDatum(target);
	values[1] = Int64GetDatum(current_run);
	(void) CiflowCatalogExecute(&fail_abandoned, values, NULL, NULL, NULL);
}

char *
CiflowRunLastWatermark(const char *target)
{
	Datum		values[1];
	HeapTuple	tup;
	TupleDesc	desc;
	bool		isnull;
	Datum		d;

	values[0] = CStringGetTextDatum(target);
	if (CiflowCatalogExecute(&last_watermark, values, NULL, &tup, &desc) == 0)
		return NULL;
	d = heap_getattr(tup, 1, desc, &isnull);
	return isnull ? NULL : TextDatumGetCString(d);
}

/*
 * The staging heap of a run, recorded in the transaction that creates it,
 * so that whatever ends the run (a crash included), the next run of the
 * target finds and drops it.
 */
static CiflowCatalogStatement set_staging = {
	.sql = "UPDATE ciflow.sync_runs SET staging_relid = $2"
	" WHERE id OPERATOR(pg_catalog.=) $1",
	.nargs = 2,
	.types = {INT8OID, OIDOID}
};

static CiflowCatalogStatement abandoned_staging = {
	.sql = "SELECT pg_catalog.array_agg(staging_relid) FROM ciflow.sync_runs"
	" WHERE target OPERATOR(pg_catalog.=) $1"
	" AND status OPERATOR(pg_catalog.=) 'running' AND id OPERATOR(pg_catalog.<>) $2"
	" AND staging_relid IS NOT NULL",
	.nargs = 2,
	.types = {TEXTOID, INT8OID}
};

static CiflowCatalogStatement target_filled = {
	.sql = "SELECT 1 FROM ciflow.sync_runs"
	" WHERE target OPERATOR(pg_catalog.=) $1"
	" AND status OPERATOR(pg_catalog.=) 'succeeded' LIMIT 1",
	.nargs = 1,
	.types = {TEXTOID}
};

void
CiflowRunSetStaging(int64 run_id, Oid staging_relid)
{
	Datum		values[2];

	values[0] = Int64GetDatum(run_id);
	values[1] = ObjectIdGetDatum(staging_relid);
	/* InvalidOid: the heap is gone (NULL). */
	(void) CiflowCatalogExecute(&set_staging, values,
								OidIsValid(staging_relid) ? "  " : " n", NULL, NULL);
}

/* The first column of tup, an oid[] (NULL: none), as a List of Oids. */
static List *
OidArrayColumn(HeapTuple tup, TupleDesc desc)
{
	bool		isnull;
	Datum		d = heap_getattr(tup, 1, desc, &isnull);
	Datum	   *elems;
	int			nelems;
	List	   *result = NIL;
	int			i;

	if (isnull)
		return NIL;
	deconstruct_array(DatumGetArrayTypeP(d), OIDOID, sizeof(Oid), true,
					  TYPALIGN_INT, &elems, NULL, &nelems);
	for (i = 0; i < nelems; i++)
		result = lappend_oid(result, DatumGetObjectId(elems[i]));
	return result;
}

List *
CiflowRunAbandonedStaging(const char *target, int64 current_run)
{
	Datum		values[2];
	HeapTuple	tup;
	TupleDesc	desc;

	values[0] = CStringGetTextDatum(target);
	values[1] = Int64GetDatum(current_run);
	if (CiflowCatalogExecute(&abandoned_staging, values, NULL, &tup, &desc) == 0)
		return NIL;
	return OidArrayColumn(tup, desc);
}

bool
CiflowRunTargetFilled(const char *target)
{
	Datum		values[1];

	values[0] = CStringGetTextDatum(target);
	return CiflowCatalogExecute(&target_filled, values, NULL, NULL, NULL) > 0;
}

/*
 * At the launcher's start: every run left 'running' whose process is gone
 * (a crash, a restart) is failed, whatever its target; returns the
 * staging heaps those runs recorded, for CiflowSweepStaging.
 */
static CiflowCatalogStatement fail_interrupted = {
	.sql = "WITH failed AS (UPDATE ciflow.sync_runs r SET status = 'failed',"
	" finished_at = pg_catalog.clock_timestamp(),"
	" error = 'interrupted by a server crash or restart'"
	" WHERE r.status OPERATOR(pg_catalog.=) 'running' AND NOT EXISTS"
	" (SELECT 1 FROM pg_catalog.pg_stat_get_activity(NULL::pg_catalog.int4) a"
	"  WHERE a.pid OPERATOR(pg_catalog.=) r.pid)"
	" RETURNING r.staging_relid)"
	" SELECT pg_catalog.array_agg(staging_relid) FROM failed WHERE staging_relid IS NOT NULL",
	.nargs = 0
};

List *
CiflowRunFailInterrupted(void)
{
	HeapTuple	tup;
	TupleDesc	desc;

	if (CiflowCatalogExecute(&fail_interrupted, NULL, NULL, &tup, &desc) == 0 || tup == NULL)
		return NIL;
	return OidArrayColumn(tup, desc);
}

/* One batch of finished runs older than the retention, found by index. */
static CiflowCatalogStatement trim_runs = {
	.sql = "DELETE FROM ciflow.sync_runs WHERE id OPERATOR(pg_catalog.=) ANY (ARRAY("
	" SELECT id FROM ciflow.sync_runs"
	" WHERE status OPERATOR(pg_catalog.<>) 'running'"
	" AND finished_at OPERATOR(pg_catalog.<) (pg_catalog.clock_timestamp()"
	" OPERATOR(pg_catalog.-) pg_catalog.make_interval(secs => $1))"
	" ORDER BY finished_at LIMIT $2))"
	" AND id OPERATOR(pg_catalog.<>) ALL (ARRAY("
	" SELECT DISTINCT ON (target) id FROM ciflow.sync_runs"
	" WHERE status OPERATOR(pg_catalog.=) 'succeeded' ORDER BY target, id DESC))"
	" AND id OPERATOR(pg_catalog.<>) ALL (ARRAY("
	" SELECT DISTINCT ON (target) id FROM ciflow.sync_runs"
	" WHERE status OPERATOR(pg_catalog.=) 'succeeded' AND watermark IS NOT NULL"
	" ORDER BY target, id DESC))",
	.nargs = 2,
	.types = {FLOAT8OID, INT4OID}
};

int64
CiflowRunTrim(int retention_s, int batch)
{
	Datum		values[2];

	values[0] = Float8GetDatum((double) retention_s);
	values[1] = Int32GetDatum(batch);
	return (int64) CiflowCatalogExecute(&trim_runs, values, NULL, NULL, NULL);
}
