/*-------------------------------------------------------------------------
 *
 * target.h
 *	  The table a sync writes: its shape from the entity's metadata, the
 *	  staging heap that receives the pages, and the swap that publishes it.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CIFLOW_TARGET_H
#define CIFLOW_TARGET_H

#include "ciflow_json.h"

#include "storage/lockdefs.h"
#include "utils/rel.h"

/* One column of the target, mapped from one attribute of the entity. */
typedef struct CiflowColumn
{
	char	   *remote_name;	/* attribute name in the service's rows */
	char	   *name;			/* column name (snake_case, unique) */
	char	   *edm_type;		/* the service's dataType */
	Oid			typid;
	bool		is_key;
} CiflowColumn;

typedef struct CiflowShape
{
	char	   *entity;			/* qualifiedEntityName */
	bool		is_system;		/* no dataSourceName: may be filtered/ordered */
	int			ncolumns;
	CiflowColumn *columns;
	int			nkeys;
	int		   *keys;			/* indexes into columns, key order */
} CiflowShape;

typedef struct CiflowTarget
{
	char	   *schema;
	char	   *table;
	Oid			relid;			/* the target, once it exists */
	Oid			staging_relid;	/* heap receiving the pages */
	bool		is_new;			/* staging becomes the target at publish */
	bool		name_locked;	/* holds the run's lock on the name */
	bool		rel_locked;		/* holds a session lock on relid */
	LockRelId	lockrelid;
} CiflowTarget;

/* snake_case of a service name, as a valid identifier of < NAMEDATALEN bytes. */
extern char *CiflowSnakeCase(const char *name);

/* Builds the shape from E2 metadata; failmsg names connection and entity. */
extern CiflowShape *CiflowShapeFromMetadata(json_t *entity, const char *failmsg);

/*
 * Resolves the target the way CREATE TABLE would (NULL target: the
 * connection's schema and the entity's snake_case name).
 */
extern void CiflowResolveTarget(const char *connection, const char *entity,
								const char *target, char **schema, char **table);

/*
 * The run's session lock on the target's name; false if another sync holds
 * it.  CiflowUnlockTarget releases it and any session lock on the table.
 */
extern bool CiflowLockTargetName(CiflowTarget *target);
extern void CiflowUnlockTarget(CiflowTarget *target);

/*
 * In a transaction: creates the schema if needed, drops what a crashed run
 * left, checks (and extends) an existing target, and creates the staging heap.
 */
extern void CiflowPrepareTarget(CiflowTarget *target, const CiflowShape *shape);

/* In a transaction: makes the staged contents the target's, atomically. */
extern void CiflowPublishTarget(CiflowTarget *target, const CiflowShape *shape);

/* In a transaction of its own: fresh statistics for the planner. */
extern void CiflowAnalyzeTarget(const CiflowTarget *target);

/* In a transaction: drops the staging heap of a failed run, if any. */
extern void CiflowDropStaging(CiflowTarget *target);

/* "schema.table", quoted as needed. */
extern char *CiflowTargetName(const char *schema, const char *table);

#endif							/* CIFLOW_TARGET_H */
