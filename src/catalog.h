/*-------------------------------------------------------------------------
 *
 * catalog.h
 *	  ciflow's own tables, read by relation scans and written through SPI
 *	  as the extension's owner, without running anything of the caller's.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CIFLOW_CATALOG_H
#define CIFLOW_CATALOG_H

#include "access/htup.h"
#include "access/tupdesc.h"
#include "executor/spi.h"
#include "nodes/pg_list.h"

/*
 * Elevated rights for a write: the extension's owner, a security-restricted
 * operation, search_path = pg_catalog, pg_temp.  Leave undoes it; an error
 * in between is undone by the (sub)transaction's abort.
 */
typedef struct CiflowCatalogScope
{
	Oid			userid;
	int			sec_context;
	int			guc_nest;
} CiflowCatalogScope;

extern void CiflowCatalogEnter(CiflowCatalogScope *scope);
extern void CiflowCatalogLeave(const CiflowCatalogScope *scope);

/* One statement on ciflow's tables; its plan is prepared once per process. */
typedef struct CiflowCatalogStatement
{
	const char *sql;			/* every name schema-qualified */
	int			nargs;
	Oid			types[16];
	SPIPlanPtr	plan;
} CiflowCatalogStatement;

/*
 * Runs stmt; returns the number of rows processed and, if asked, a copy of
 * the first RETURNING row (NULL when none) in the caller's memory context.
 */
extern uint64 CiflowCatalogExecute(CiflowCatalogStatement *stmt, Datum *values,
								 const char *nulls, HeapTuple *returned,
								 TupleDesc *returned_desc);

/* OID of ciflow.<relname>; 42P01 with a HINT when it is missing. */
extern Oid	CiflowCatalogRelid(const char *relname);

/*
 * Copies of the rows of ciflow.<relname> whose text column equals value,
 * read with the active snapshot, and the table's descriptor.
 */
extern List *CiflowCatalogLookup(const char *relname, const char *column,
								 const char *value, TupleDesc *desc);

/* A column of such a row, by name. */
extern Datum CiflowCatalogDatum(HeapTuple tup, TupleDesc desc, const char *column,
								bool *isnull);
extern char *CiflowCatalogText(HeapTuple tup, TupleDesc desc, const char *column);

#endif							/* CIFLOW_CATALOG_H */
