/*-------------------------------------------------------------------------
 *
 * catalog.c
 *	  Access to ciflow's own tables (connection settings, secrets and
 *	  grants, sync runs) with rights the caller does not have, without ever
 *	  running anything the caller could have defined.
 *
 *	  Reads are relation scans, the way postgres_fdw reads its foreign
 *	  servers: no SQL is parsed, so no operator, function or search_path of
 *	  the caller's takes part, and no privilege check is made.  Writes go
 *	  through SPI with prepared plans, as the extension's owner (not the
 *	  bootstrap superuser), inside a security-restricted operation, with
 *	  search_path fixed to pg_catalog, pg_temp at a GUC nest level of their
 *	  own; the statements themselves name every object and operator with
 *	  its schema.  Errors raised by a write lose the context line that
 *	  would show ciflow's statement.
 *
 *	  This file knows nothing of what the rows mean; connection.c and
 *	  runs.c do.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "catalog/indexing.h"
#include "catalog/namespace.h"
#include "catalog/pg_extension.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"

#include "catalog.h"

/*
 * The role that owns ciflow's tables: the extension's owner.  Looked up
 * each time (a catalog index probe), so that nothing stale survives a
 * DROP and CREATE EXTENSION in the same session.
 */
static Oid
ExtensionOwner(void)
{
	Oid			extoid = get_extension_oid("ciflow", false);
	Relation	rel;
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tup;
	Oid			owner;

	rel = table_open(ExtensionRelationId, AccessShareLock);
	ScanKeyInit(&key, Anum_pg_extension_oid, BTEqualStrategyNumber, F_OIDEQ,
				ObjectIdGetDatum(extoid));
	scan = systable_beginscan(rel, ExtensionOidIndexId, true, NULL, 1, &key);
	tup = systable_getnext(scan);
	if (!HeapTupleIsValid(tup))
		elog(ERROR, "could not find extension ciflow (OID %u)", extoid);
	owner = ((Form_pg_extension) GETSTRUCT(tup))->extowner;
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	return owner;
}

void
CiflowCatalogEnter(CiflowCatalogScope *scope)
{
	GetUserIdAndSecContext(&scope->userid, &scope->sec_context);
	SetUserIdAndSecContext(ExtensionOwner(),
						   scope->sec_context |
						   SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
	scope->guc_nest = NewGUCNestLevel();
	(void) set_config_option("search_path", "pg_catalog, pg_temp",
							 PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
}

void
CiflowCatalogLeave(const CiflowCatalogScope *scope)
{
	AtEOXact_GUC(true, scope->guc_nest);
	SetUserIdAndSecContext(scope->userid, scope->sec_context);
}

Oid
CiflowCatalogRelid(const char *relname)
{
	Oid			nspid = get_namespace_oid("ciflow", false);
	Oid			relid = get_relname_relid(relname, nspid);

	if (!OidIsValid(relid))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("ciflow's table ciflow.%s is missing", relname),
				 errhint("Run ALTER EXTENSION ciflow UPDATE.")));
	return relid;
}

List *
CiflowCatalogLookup(const char *relname, const char *column, const char *value,
					TupleDesc *desc)
{
	Oid			relid = CiflowCatalogRelid(relname);
	AttrNumber	attno = get_attnum(relid, column);
	Relation	rel;
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tup;
	List	   *result = NIL;

	if (attno == InvalidAttrNumber)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("ciflow's tables are older than its library"),
				 errdetail("ciflow.%s has no column \"%s\".", relname, column),
				 errhint("Run ALTER EXTENSION ciflow UPDATE.")));

	/*
	 * A heap scan with a key: these tables are small, and it leaves the
	 * index's collation out of the question (texteq is collation-blind).
	 */
	rel = table_open(relid, AccessShareLock);
	ScanKeyInit(&key, attno, BTEqualStrategyNumber, F_TEXTEQ,
				CStringGetTextDatum(value));
	scan = systable_beginscan(rel, InvalidOid, false,
							  ActiveSnapshotSet() ? GetActiveSnapshot() :
							  GetTransactionSnapshot(), 1, &key);
	while (HeapTupleIsValid(tup = systable_getnext(scan)))
		result = lappend(result, heap_copytuple(tup));
	systable_endscan(scan);
	*desc = CreateTupleDescCopy(RelationGetDescr(rel));
	table_close(rel, AccessShareLock);
	return result;
}

char *
CiflowCatalogText(HeapTuple tup, TupleDesc desc, const char *column)
{
	bool		isnull;
	Datum		d = CiflowCatalogDatum(tup, desc, column, &isnull);

	return isnull ? NULL : TextDatumGetCString(d);
}

Datum
CiflowCatalogDatum(HeapTuple tup, TupleDesc desc, const char *column, bool *isnull)
{
	int			i;

	for (i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);

		if (!att->attisdropped && strcmp(NameStr(att->attname), column) == 0)
			return heap_getattr(tup, i + 1, desc, isnull);
	}
	ereport(ERROR,
			(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
			 errmsg("ciflow's tables are older than its library"),
			 errdetail("A table of ciflow has no column \"%s\".", column),
			 errhint("Run ALTER EXTENSION ciflow UPDATE.")));
	pg_unreachable();
}

/*
 * An error from ciflow's own statement shows what failed, not how: its
 * context (the statement text) and internal query are dropped.
 */
static void
RethrowWithoutStatement(MemoryContext cxt, const CiflowCatalogScope *scope)
{
	ErrorData  *edata;

	/*
	 * The caller's identity and search_path come back at once, not only at
	 * the abort, so that nothing between here and the abort runs elevated.
	 */
	AtEOXact_GUC(false, scope->guc_nest);
	SetUserIdAndSecContext(scope->userid, scope->sec_context);
	MemoryContextSwitchTo(cxt);
	edata = CopyErrorData();
	FlushErrorState();
	edata->context = NULL;
	edata->internalquery = NULL;
	edata->internalpos = 0;
	edata->cursorpos = 0;
	edata->hide_stmt = true;
	ReThrowError(edata);
}

uint64
CiflowCatalogExecute(CiflowCatalogStatement *stmt, Datum *values, const char *nulls,
				   HeapTuple *returned, TupleDesc *returned_desc)
{
	MemoryContext cxt = CurrentMemoryContext;
	CiflowCatalogScope scope;
	uint64		processed = 0;

	CiflowCatalogEnter(&scope);
	PG_TRY();
	{
		int			rc;

		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		if (stmt->plan == NULL)
		{
			SPIPlanPtr	plan = SPI_prepare(stmt->sql, stmt->nargs, stmt->types);

			if (plan == NULL)
				elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
			SPI_keepplan(plan);
			stmt->plan = plan;
		}
		rc = SPI_execute_plan(stmt->plan, values, nulls, false, 0);
		if (rc < 0)
			elog(ERROR, "SPI_execute_plan failed: %s", SPI_result_code_string(rc));
		processed = SPI_processed;
		if (returned != NULL)
		{
			MemoryContext old = MemoryContextSwitchTo(cxt);

			*returned = (processed > 0 && SPI_tuptable != NULL) ?
				heap_copytuple(SPI_tuptable->vals[0]) : NULL;
			if (returned_desc && SPI_tuptable != NULL)
				*returned_desc = CreateTupleDescCopy(SPI_tuptable->tupdesc);
			MemoryContextSwitchTo(old);
		}
		SPI_finish();
	}
	PG_CATCH();
	{
		/* The transaction's abort undoes the SPI connection. */
		RethrowWithoutStatement(cxt, &scope);
	}
	PG_END_TRY();
	CiflowCatalogLeave(&scope);
	return processed;
}
