/*-------------------------------------------------------------------------
 *
 * target.h
 *	  The table a sync writes: where it is and whether the caller may fill
 *	  it, its columns, the staging heap that receives the pages (or, for a
 *	  new target, the heap that becomes it), and the storage swap of
 *	  publish => 'swap'.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CIFLOW_TARGET_H
#define CIFLOW_TARGET_H

#include "nodes/pg_list.h"
#include "shape.h"

/*
 * The staging heap's extra column: the order in which rows arrived.  A
 * new target filled in place has neither extra column.
 */
#define CIFLOW_STAGE_SEQ "ciflow.seq"

/*
 * And whether the row is a deletion reported by a delta link (true; NULL
 * otherwise): only its key is filled.
 */
#define CIFLOW_STAGE_DELETED "ciflow.deleted"

typedef struct CiflowTarget
{
	char	   *schema;
	char	   *table;
	char	   *qualified;		/* "schema.table", quoted as needed */
	Oid			relid;			/* the target, once it exists */
	bool		is_new;			/* created by this run */
	bool		in_place;		/* new, and the staging heap becomes it */
	Oid			staging_relid;	/* heap receiving the pages */
	char	   *staging;		/* its qualified, quoted name */
	bool		name_locked;	/* holds the run's lock on the name */
} CiflowTarget;

/*
 * Resolves the target the way CREATE TABLE would (NULL target: the
 * connection's schema and the entity's snake_case name).
 */
extern void CiflowResolveTarget(const char *connection, const char *entity,
								const char *target, char **schema, char **table);

/* "schema.table", quoted as needed. */
extern char *CiflowTargetName(const char *schema, const char *table);

/*
 * The run's session lock on the target's name (held across the run's
 * transactions, released by CiflowUnlockTarget whatever happened); false
 * if another sync holds it.
 */
extern bool CiflowLockTargetName(CiflowTarget *target);
extern void CiflowUnlockTarget(CiflowTarget *target);

/*
 * In a transaction, before anything is fetched: the target's rules (no
 * system or ciflow schema), the caller's privileges (42501 with the GRANT
 * to run), and adoption of a non-empty table that no run has filled.
 * filled_before says whether a run into this target has succeeded.
 */
extern void CiflowCheckTarget(CiflowTarget *target, bool adopt, bool filled_before);

/* In a transaction: drops staging heaps that dead runs recorded. */
extern void CiflowSweepStaging(List *staging_relids);

/*
 * In a transaction, before any page: creates the schema if needed, adds
 * columns for attributes the service added, refuses changed types (but
 * keeps loading a jsonb column of an earlier sync as jsonb, changing the
 * shape to say so), and creates the staging heap: for an existing target
 * an unlogged one with the extra columns above; for a new target the
 * table that publish renames to the target (logged, the target's columns
 * and comments, autovacuum off while it is loaded), unless a publication
 * would see every table of the schema (in_place false: then an unlogged
 * heap as for an existing target, and publish creates the target).
 */
extern void CiflowPrepareTarget(CiflowTarget *target, CiflowShape *shape);

/*
 * Whether the target can still take the shape's rows: every column there
 * with its mapped type, and no column of the user's own that an inserted
 * row could not fill.  Raises the error otherwise.
 */
extern void CiflowCheckColumns(const CiflowTarget *target, const CiflowShape *shape);

/*
 * Columns of attributes the service no longer sends: not in the shape,
 * commented by ciflow with their attribute's name, nullable.  A re-sync
 * keeps them and fills them with NULL.
 */
extern List *CiflowRetiredColumns(const CiflowTarget *target, const CiflowShape *shape);

/*
 * In the publishing transaction: creates the new target (no key yet), or
 * makes the heap filled in place the target (renamed, autovacuum reset);
 * both refuse (42P07) a name taken while the sync ran.
 */
extern void CiflowCreateTarget(CiflowTarget *target, const CiflowShape *shape);
extern void CiflowPublishInPlace(CiflowTarget *target);

/*
 * ... and, once it is filled, its primary key.  The Try form builds it in
 * a subtransaction and returns false, having rolled it back, when the
 * rows hold a key twice (23505).
 */
extern void CiflowAddPrimaryKey(const CiflowTarget *target, const CiflowShape *shape);
extern bool CiflowTryAddPrimaryKey(const CiflowTarget *target, const CiflowShape *shape);

/*
 * publish => 'swap': refuses (with a HINT) a target whose storage cannot
 * be replaced without breaking something; then, under an exclusive lock,
 * a new heap to fill (its quoted name) and the swap itself.
 */
extern void CiflowCheckSwap(const CiflowTarget *target);
extern char *CiflowSwapBegin(CiflowTarget *target, Oid *new_heap);
extern void CiflowSwapFinish(CiflowTarget *target, Oid new_heap);

/* In a transaction of its own: fresh statistics for the planner. */
extern void CiflowAnalyzeTarget(const CiflowTarget *target);

/*
 * In a transaction: drops the run's staging heap, if any (by name: a heap
 * that publish renamed to the target is never dropped).
 */
extern void CiflowDropStaging(CiflowTarget *target);

/* Runs one statement of ciflow's own through SPI (connected by the caller). */
extern uint64 CiflowExecSql(const char *sql);

/* What Citus makes of a table (if Citus is installed at all). */
typedef enum CiflowCitusKind
{
	CIFLOW_CITUS_NONE,
	CIFLOW_CITUS_DISTRIBUTED,	/* hash- or range-distributed */
	CIFLOW_CITUS_REFERENCE,		/* replicated to every node */
	CIFLOW_CITUS_LOCAL			/* a Citus local table on the coordinator */
} CiflowCitusKind;

extern CiflowCitusKind CiflowCitusTableKind(Oid relid);

#endif							/* CIFLOW_TARGET_H */
