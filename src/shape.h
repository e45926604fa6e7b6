/*-------------------------------------------------------------------------
 *
 * shape.h
 *	  What an entity looks like as a table: column names, types and keys
 *	  from the entity's metadata (E2).  Pure: no catalog access, no I/O.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CIFLOW_SHAPE_H
#define CIFLOW_SHAPE_H

#include "ciflow_json.h"
#include "csdl.h"

#include "lib/stringinfo.h"

/* One column of the target, mapped from one attribute of the entity. */
typedef struct CiflowColumn
{
	char	   *remote_name;	/* attribute name in the service's rows */
	char	   *name;			/* column name (snake_case, unique) */
	char	   *edm_type;		/* the service's dataType */
	Oid			typid;
	bool		is_key;
	bool		selected;		/* asked for (fields => ...): a sync writes it */
} CiflowColumn;

typedef struct CiflowShape
{
	char	   *entity;			/* qualifiedEntityName */
	bool		is_system;		/* no dataSourceName: may be filtered/ordered */
	int			ncolumns;
	CiflowColumn *columns;
	int			nkeys;
	int		   *keys;			/* indexes into columns, key order */
	int			incremental;	/* column of incrementalAttribute, or -1 */
	char	   *refresh_time;	/* E2's refreshTime as sent, or NULL */
} CiflowShape;

/* snake_case of a service name, as a valid identifier of < NAMEDATALEN bytes. */
extern char *CiflowSnakeCase(const char *name);

/* Builds the shape from E2 metadata; failmsg names connection and entity. */
extern CiflowShape *CiflowShapeFromMetadata(json_t *entity, const char *failmsg);

/*
 * Builds the shape of an OData or Dataverse entity set from its CSDL
 * $metadata (csdl.c); failmsg names connection and entity.
 */
extern CiflowShape *CiflowShapeFromCsdl(const CiflowCsdlEntity *entity,
										const char *failmsg);

/*
 * fields => 'A,B': only these attributes (and the key) are written by the
 * sync; the others keep their values in an existing target.
 */
extern void CiflowShapeSelect(CiflowShape *shape, const char *fields);

/*
 * Appends the quoted names of the key columns (keys_only) or of every
 * selected column, comma-separated, each prefixed by prefix ("s." or "").
 */
extern void CiflowAppendColumns(StringInfo buf, const CiflowShape *shape,
								bool keys_only, const char *prefix);

#endif							/* CIFLOW_SHAPE_H */
