/*-------------------------------------------------------------------------
 *
 * apply.c
 *	  Publishing the staged pull, in the one transaction that also records
 *	  the run's end: the staged rows become the target's.
 *
 *	  A re-sync is the difference, as ordinary statements through the
 *	  executor (SPI over the staging heap): DELETE of the keys the pull no
 *	  longer holds, UPDATE of the rows whose entity columns differ (NULL-
 *	  safe: IS DISTINCT FROM; equal rows are never touched, so they write
 *	  neither a row version nor WAL), INSERT of new keys.  Triggers,
 *	  constraints, foreign keys, partition routing, defaults, generated
 *	  columns, logical replication and MVCC readers all see a normal
 *	  transaction.  Only the entity's columns are named: columns of the
 *	  user's own get their default on inserted rows and keep their values
 *	  on updated ones; columns of attributes the service dropped stay, filled
 *	  with NULL.  The statement shapes are those Citus accepts from a
 *	  local staging table (shared/vendor/README.txt): key sets compared with
 *	  EXCEPT, UPDATE ... FROM.  MERGE was measured and not used: PG15's has
 *	  no WHEN NOT MATCHED BY SOURCE (deletes need a statement anyway),
 *	  Citus refuses it from a local table, and it was no faster.
 *
 *	  An incremental pull upserts: UPDATE and INSERT as above, no DELETE
 *	  of missing keys; only the deletions a delta link reported (staged as
 *	  marked keys) are deleted.
 *
 *	  A first sync has filled the new target in place (target.c): the
 *	  publish renames it and builds its key once, no row is copied.  An
 *	  index build that finds a key twice (23505) is rolled back, the
 *	  duplicates are dropped and the key built again: duplicates cost
 *	  nothing when there are none.  Where a publication takes every table
 *	  of the schema, the target is instead created in this transaction,
 *	  filled with one INSERT from the unlogged staging heap, and keyed
 *	  afterwards.  Either way a failed first sync leaves nothing.
 *
 *	  Duplicate keys in the pull (offset paging over changing data) are
 *	  dropped in linear time: a hash aggregate finds the keys staged more
 *	  than once, a hash join deletes every version but the last received.
 *	  The staging heap numbers rows as they arrive; in a target filled in
 *	  place, which only ever had rows appended by one process (the loader
 *	  skips the free space map), the order of arrival is the ctid's.
 *
 *	  Citus distributed tables take these statements as they are (the
 *	  forms were chosen for that); reference tables need their staging
 *	  table registered with Citus first (see CiflowApplyStaged).
 *
 *	  This file changes rows only; DDL is target.c's.  It never talks to
 *	  the service or to ciflow's catalog.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "lib/stringinfo.h"
#include "storage/proc.h"
#include "utils/builtins.h"
#include "utils/guc.h"

#include "apply.h"

/*
 * Lock waits of a sync end: one minute unless the session (the database's
 * or role's settings) bounds them itself.  A reader never holds a lock the
 * row changes wait for; a LOCK TABLE or a long ALTER may.
 */
void
CiflowBoundLockWaits(void)
{
	if (LockTimeout == 0)
		(void) set_config_option("lock_timeout", "60s", PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_LOCAL, true, 0, false);
}

/* "a.k1 OPERATOR(pg_catalog.=) b.k1 AND ...": keys are never NULL. */
static char *
KeysEqual(const CiflowShape *shape, const char *a, const char *b)
{
	StringInfoData s;
	int			k;

	initStringInfo(&s);
	for (k = 0; k < shape->nkeys; k++)
	{
		const char *col = quote_identifier(shape->columns[shape->keys[k]].name);

		appendStringInfo(&s, "%s%s.%s OPERATOR(pg_catalog.=) %s.%s", k ? " AND " : "",
						 a, col, b, col);
	}
	return s.data;
}

static char *
Columns(const CiflowShape *shape, bool keys_only, const char *prefix)
{
	StringInfoData s;

	initStringInfo(&s);
	CiflowAppendColumns(&s, shape, keys_only, prefix);
	return s.data;
}

static int64
ScalarInt8(const char *sql)
{
	bool		isnull;
	Datum		d;

	if (CiflowExecSql(sql) != 1)
		return 0;
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	return isnull ? 0 : DatumGetInt64(d);
}

/*
 * Keeps the last version received of every key staged more than once in
 * rel, whose column "order" grows in the order of arrival; returns how
 * many rows went.
 */
static int64
DropDuplicates(const char *rel, const CiflowShape *shape, const char *order)
{
	char	   *keys = Columns(shape, true, "");
	const char *last = quote_identifier(order);

	return (int64) CiflowExecSql(
		psprintf("DELETE FROM %s AS s USING"
				 " (SELECT %s, pg_catalog.max(%s) AS last FROM %s GROUP BY %s"
				 "  HAVING pg_catalog.count(*) OPERATOR(pg_catalog.>) 1) AS d"
				 " WHERE %s AND s.%s OPERATOR(pg_catalog.<) d.last",
				 rel, keys, last, rel, keys, KeysEqual(shape, "s", "d"), last));
}

/*
 * UPDATE of the rows whose entity columns (other than the key) differ,
 * and of those still holding a value of an attribute the service dropped
 * (filled with NULL once, then equal like the others).
 */
static int64
UpdateChanged(const CiflowTarget *t, const CiflowShape *shape)
{
	StringInfoData set;
	StringInfoData old_values;
	StringInfoData new_values;
	ListCell   *lc;
	int			c;

	initStringInfo(&set);
	initStringInfo(&old_values);
	initStringInfo(&new_values);
	for (c = 0; c < shape->ncolumns; c++)
	{
		const char *col = quote_identifier(shape->columns[c].name);
		const char *sep = set.len ? ", " : "";

		if (shape->columns[c].is_key || !shape->columns[c].selected)
			continue;
		appendStringInfo(&set, "%s%s = s.%s", sep, col, col);
		appendStringInfo(&old_values, "%st.%s", sep, col);
		appendStringInfo(&new_values, "%ss.%s", sep, col);
	}
	foreach(lc, CiflowRetiredColumns(t, shape))
	{
		const char *col = quote_identifier(lfirst(lc));
		const char *sep = set.len ? ", " : "";

		appendStringInfo(&set, "%s%s = NULL", sep, col);
		appendStringInfo(&old_values, "%st.%s", sep, col);
		appendStringInfo(&new_values, "%sNULL", sep);
	}
	if (set.len == 0)
		return 0;				/* every column is part of the key */
	return (int64) CiflowExecSql(psprintf("UPDATE %s AS t SET %s FROM %s AS s WHERE %s"
										  " AND ROW(%s) IS DISTINCT FROM ROW(%s)",
										  t->qualified, set.data, t->staging,
										  KeysEqual(shape, "t", "s"),
										  old_values.data, new_values.data));
}

static void
ApplyDifference(const CiflowTarget *t, const CiflowShape *shape, bool deletes,
				CiflowApplyCounts *counts)
{
	char	   *keys = Columns(shape, true, "");
	char	   *columns = Columns(shape, false, "");

	if (deletes)
		counts->deleted = (int64) CiflowExecSql(
			psprintf("DELETE FROM %s WHERE (%s) IN (SELECT %s FROM %s EXCEPT SELECT %s FROM %s)",
					 t->qualified, keys, keys, t->qualified, keys, t->staging));
	counts->updated = UpdateChanged(t, shape);
	counts->inserted = (int64) CiflowExecSql(
		psprintf("INSERT INTO %s (%s) SELECT %s FROM %s AS s"
				 " WHERE (%s) IN (SELECT %s FROM %s EXCEPT SELECT %s FROM %s)",
				 t->qualified, columns, Columns(shape, false, "s."), t->staging,
				 Columns(shape, true, "s."), keys, t->staging, keys, t->qualified));
}

/*
 * An incremental pull's deletions (a delta link's $deletedEntity entries,
 * staged as keys marked deleted, the last version of their key): DELETE
 * of those keys, then out of the staging heap, so that the upsert sees
 * only changed rows.
 */
static int64
ApplyDeletions(const CiflowTarget *t, const CiflowShape *shape)
{
	char	   *keys = Columns(shape, true, "");
	const char *deleted = quote_identifier(CIFLOW_STAGE_DELETED);
	int64		n;

	n = (int64) CiflowExecSql(psprintf("DELETE FROM %s WHERE (%s) IN (SELECT %s FROM %s WHERE %s)",
									   t->qualified, keys, keys, t->staging, deleted));
	CiflowExecSql(psprintf("DELETE FROM %s WHERE %s", t->staging, deleted));
	return n;
}

/* Every staged row into a relation (a new target, or a swap's new heap). */
static int64
InsertAll(const char *into, const CiflowTarget *t, const CiflowShape *shape)
{
	char	   *columns = Columns(shape, false, "");

	return (int64) CiflowExecSql(psprintf("INSERT INTO %s (%s) SELECT %s FROM %s",
										  into, columns, columns, t->staging));
}

static void
Swap(CiflowTarget *t, const CiflowShape *shape, CiflowApplyCounts *counts)
{
	Oid			new_heap;
	char	   *heap_name;

	CiflowCheckSwap(t);
	counts->deleted = ScalarInt8(psprintf("SELECT pg_catalog.count(*) FROM %s", t->qualified));
	heap_name = CiflowSwapBegin(t, &new_heap);
	counts->inserted = InsertAll(heap_name, t, shape);
	CiflowSwapFinish(t, new_heap);
}

/*
 * A target filled in place: renamed, then its key built once; duplicates
 * are looked for only when that build finds one.
 */
static void
PublishInPlace(CiflowTarget *t, const CiflowShape *shape, int64 staged,
			   CiflowApplyCounts *counts)
{
	CiflowPublishInPlace(t);
	if (shape->nkeys > 0 && !CiflowTryAddPrimaryKey(t, shape))
	{
		counts->duplicates = DropDuplicates(t->qualified, shape, "ctid");
		CiflowAddPrimaryKey(t, shape);
	}
	counts->inserted = staged - counts->duplicates;
}

void
CiflowApplyStaged(CiflowTarget *t, const CiflowShape *shape, CiflowPublishMethod method,
				  int64 staged, CiflowApplyCounts *counts)
{
	memset(counts, 0, sizeof(*counts));
	CiflowBoundLockWaits();
	SPI_connect();
	if (t->in_place)
	{
		PublishInPlace(t, shape, staged, counts);
		SPI_finish();
		return;
	}
	if (shape->nkeys > 0)
		counts->duplicates = DropDuplicates(t->staging, shape, CIFLOW_STAGE_SEQ);
	/* The joins below are planned from the staged rows' statistics. */
	CiflowExecSql(psprintf("ANALYZE %s", t->staging));

	if (t->is_new)
	{
		/* A publication takes every table of the schema (target.c). */
		CiflowCreateTarget(t, shape);
		counts->inserted = InsertAll(t->qualified, t, shape);
		CiflowAddPrimaryKey(t, shape);
	}
	else if (method == CIFLOW_PUBLISH_SWAP)
		Swap(t, shape, counts);
	else
	{
		CiflowCheckColumns(t, shape);

		/*
		 * The one Citus branch: Citus refuses DML on a reference table that
		 * reads a plain local table, but accepts it once the staging table
		 * is a Citus local table (it lives on the coordinator, beside the
		 * reference table's placement there).  Distributed tables take the
		 * statements below as they are.
		 */
		if (CiflowCitusTableKind(t->relid) == CIFLOW_CITUS_REFERENCE)
			CiflowExecSql(psprintf("SELECT pg_catalog.citus_add_local_table_to_metadata(%s)",
								   quote_literal_cstr(t->staging)));
		if (method == CIFLOW_PUBLISH_UPSERT && shape->nkeys > 0)
			counts->deleted = ApplyDeletions(t, shape);
		if (shape->nkeys > 0)
			ApplyDifference(t, shape, method == CIFLOW_PUBLISH_DIFF, counts);
		else
		{
			/* Without a key, rows have no identity to compare: replace them. */
			counts->deleted = (int64) CiflowExecSql(psprintf("DELETE FROM %s", t->qualified));
			counts->inserted = InsertAll(t->qualified, t, shape);
		}
	}
	SPI_finish();
}

char *
CiflowStagedMaximum(const CiflowTarget *t, const CiflowShape *shape)
{
	const CiflowColumn *col;
	const char *expr;
	char	   *result = NULL;

	if (shape->incremental < 0)
		return NULL;
	col = &shape->columns[shape->incremental];
	switch (col->typid)
	{
		case TIMESTAMPTZOID:
			expr = "pg_catalog.to_char(pg_catalog.max(%s) AT TIME ZONE 'UTC',"
				" 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')";
			break;
		case DATEOID:
		case INT2OID:
		case INT4OID:
		case INT8OID:
		case NUMERICOID:
		case FLOAT8OID:
		case TEXTOID:
			expr = "pg_catalog.max(%s)::pg_catalog.text";
			break;
		default:
			return NULL;		/* no order ciflow can resume from */
	}
	SPI_connect();
	/* Once published, the rows filled in place are the target's. */
	if (CiflowExecSql(psprintf("SELECT %s FROM %s", psprintf(expr, quote_identifier(col->name)),
							   t->in_place && OidIsValid(t->relid) ?
							   t->qualified : t->staging)) == 1)
	{
		char	   *value = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);

		result = value ? SPI_palloc(strlen(value) + 1) : NULL;
		if (value)
			strcpy(result, value);
	}
	SPI_finish();
	return result;
}
