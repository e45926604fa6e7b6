/*-------------------------------------------------------------------------
 *
 * target.c
 *	  The table a sync fills, and everything done to it that is not a row
 *	  change: where it may be and who may fill it, its columns (created
 *	  from the shape, extended when the service adds attributes, checked
 *	  for changed types), the staging heap that receives the pages, the
 *	  publish of a new target, its primary key, and the storage swap of
 *	  publish => 'swap'.
 *
 *	  Everything here runs as the calling role (the sync worker acts as
 *	  it), through SPI with every identifier quoted; nothing is elevated.
 *	  The row changes of a publish are apply.c's.  This file never talks
 *	  to the service and never touches ciflow's catalog.
 *
 *	  The staging heap lives beside the target, named from a 64-bit hash
 *	  of the target's qualified name.  For an existing target it is
 *	  UNLOGGED (a logged one would write the whole pull to WAL even when
 *	  nothing changed).  For a new target it is the target itself, filled
 *	  in place: a logged table with the target's columns and comments
 *	  under the staging name, which publish renames to the target before
 *	  building the primary key once (as COPY into an empty table, then
 *	  CREATE INDEX would): every row is written once.  Only when a
 *	  publication covers every table of the schema (FOR ALL TABLES, TABLES
 *	  IN SCHEMA) is a new target staged unlogged and created at publish,
 *	  so that logical replication never sees rows of the hidden name.
 *	  Either way the heap's OID is recorded with the run, so that a run
 *	  that died (a crash leaves the heap behind, an unlogged one reset to
 *	  empty) is swept by the next one.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/table.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "catalog/pg_namespace.h"
#include "catalog/pg_publication.h"
#include "catalog/pg_type.h"
#include "commands/cluster.h"
#include "commands/comment.h"
#include "commands/dbcommands.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "storage/lmgr.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/regproc.h"
#include "utils/syscache.h"

#include "ciflow.h"
#include "target.h"

/*
 * Distinguish ciflow's advisory locks from user ones (field4 1 and 2): the
 * run's lock on a target's name, and the lock that serializes creating a
 * schema.
 */
#define CIFLOW_LOCK_TARGET 0x4369
#define CIFLOW_LOCK_SCHEMA 0x436A

#define STAGING_PREFIX "ciflow_stage_"

char *
CiflowTargetName(const char *schema, const char *table)
{
	return quote_qualified_identifier(schema, table);
}

void
CiflowResolveTarget(const char *connection, const char *entity,
					const char *target, char **schema, char **table)
{
	List	   *names;

	if (target == NULL)
	{
		*schema = pstrdup(connection);
		*table = CiflowSnakeCase(entity);
		return;
	}
	names = stringToQualifiedNameList(target);
	if (list_length(names) == 1)
	{
		/* Unqualified: wherever CREATE TABLE would put it. */
		Oid			nspid;

		*table = pstrdup(strVal(linitial(names)));
		nspid = RangeVarGetCreationNamespace(makeRangeVar(NULL, *table, -1));
		*schema = get_namespace_name(nspid);
	}
	else if (list_length(names) == 2)
	{
		*schema = pstrdup(strVal(linitial(names)));
		*table = pstrdup(strVal(lsecond(names)));
	}
	else
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_NAME),
				 errmsg("invalid target \"%s\"", target),
				 errhint("Give a table name, optionally qualified by a schema name.")));
}

/* A 64-bit hash of a name, in an advisory lock tag of ciflow's. */
static void
NameLockTag(const char *name, uint16 kind, LOCKTAG *tag)
{
	uint64		h = hash_bytes_extended((const unsigned char *) name,
										(int) strlen(name), 0);

	SET_LOCKTAG_ADVISORY(*tag, MyDatabaseId, (uint32) (h >> 32), (uint32) h, kind);
}

bool
CiflowLockTargetName(CiflowTarget *t)
{
	LOCKTAG		tag;

	NameLockTag(t->qualified, CIFLOW_LOCK_TARGET, &tag);
	t->name_locked = LockAcquire(&tag, ExclusiveLock, true, true) != LOCKACQUIRE_NOT_AVAIL;
	return t->name_locked;
}

void
CiflowUnlockTarget(CiflowTarget *t)
{
	LOCKTAG		tag;

	/* Cleared first: a release that failed is never tried twice. */
	if (!t->name_locked)
		return;
	t->name_locked = false;
	NameLockTag(t->qualified, CIFLOW_LOCK_TARGET, &tag);
	LockRelease(&tag, ExclusiveLock, true);
}

uint64
CiflowExecSql(const char *sql)
{
	int			rc = SPI_execute(sql, false, 0);

	if (rc < 0)
		elog(ERROR, "SPI_execute failed: %s", SPI_result_code_string(rc));
	return SPI_processed;
}

/* 42501 naming the missing privilege, with the GRANT that gives it. */
static void
PrivilegeError(const char *privilege, const char *kind, const char *object,
			   const char *why)
{
	const char *role = quote_identifier(GetUserNameFromId(GetUserId(), false));

	ereport(ERROR,
			(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
			 errmsg("permission denied: role %s lacks %s on %s %s", role, privilege,
					kind, object),
			 errdetail("%s", why),
			 errhint("GRANT %s ON %s %s TO %s;", privilege, kind, object, role)));
}

static bool
IsReservedSchema(const char *schema)
{
	return strcmp(schema, "ciflow") == 0 ||
		strcmp(schema, "information_schema") == 0 ||
		strncmp(schema, "pg_", 3) == 0;
}

static void
CheckTablePrivileges(const CiflowTarget *t, Oid relid)
{
	static const struct
	{
		AclMode		mode;
		const char *name;
	}			needed[] =
	{
		{ACL_SELECT, "SELECT"},
		{ACL_INSERT, "INSERT"},
		{ACL_UPDATE, "UPDATE"},
		{ACL_DELETE, "DELETE"},
	};
	int			i;

	for (i = 0; i < (int) lengthof(needed); i++)
	{
		if (pg_class_aclcheck(relid, GetUserId(), needed[i].mode) != ACLCHECK_OK)
			PrivilegeError(needed[i].name, "TABLE", t->qualified,
						   "A sync reads the target and inserts, updates and deletes its rows.");
	}
}

void
CiflowCheckTarget(CiflowTarget *t, bool adopt, bool filled_before)
{
	Oid			nspid;
	Oid			relid;
	char		relkind;

	if (IsReservedSchema(t->schema))
		ereport(ERROR,
				(errcode(ERRCODE_RESERVED_NAME),
				 errmsg("target %s is in a schema a sync may not write", t->qualified),
				 errdetail("Targets are never in ciflow, pg_catalog, information_schema or a pg_ schema."),
				 errhint("Choose another target, with target => 'schema.table'.")));

	nspid = get_namespace_oid(t->schema, true);
	if (!OidIsValid(nspid))
	{
		char	   *db = get_database_name(MyDatabaseId);

		if (pg_database_aclcheck(MyDatabaseId, GetUserId(), ACL_CREATE) != ACLCHECK_OK)
			PrivilegeError("CREATE", "DATABASE", quote_identifier(db),
						   psprintf("Schema %s does not exist, and the sync would create it.",
									quote_identifier(t->schema)));
		t->relid = InvalidOid;
		return;
	}
	if (pg_namespace_aclcheck(nspid, GetUserId(), ACL_USAGE) != ACLCHECK_OK)
		PrivilegeError("USAGE", "SCHEMA", quote_identifier(t->schema),
					   "The target is in this schema.");
	if (pg_namespace_aclcheck(nspid, GetUserId(), ACL_CREATE) != ACLCHECK_OK)
		PrivilegeError("CREATE", "SCHEMA", quote_identifier(t->schema),
					   "The sync stages the pulled rows in a table of the target's schema.");

	relid = get_relname_relid(t->table, nspid);
	t->relid = relid;
	if (!OidIsValid(relid))
		return;
	relkind = get_rel_relkind(relid);
	if (relkind != RELKIND_RELATION && relkind != RELKIND_PARTITIONED_TABLE)
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("target %s is not a table", t->qualified),
				 errhint("Sync into a plain or partitioned table, or into a new one.")));
	CheckTablePrivileges(t, relid);

	/* A table no run has filled may be an unrelated one: adopt it knowingly. */
	if (!filled_before && !adopt)
	{
		SPI_connect();
		if (CiflowExecSql(psprintf("SELECT 1 FROM %s LIMIT 1", t->qualified)) > 0)
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("target %s already holds rows that no ciflow sync put there",
							t->qualified),
					 errdetail("A sync makes the target's rows those of the entity: it would delete the others."),
					 errhint("Sync into another target, or pass adopt => true to let the sync take the table over.")));
		SPI_finish();
	}
}

void
CiflowSweepStaging(List *staging_relids)
{
	ListCell   *lc;

	SPI_connect();
	foreach(lc, staging_relids)
	{
		Oid			relid = lfirst_oid(lc);
		HeapTuple	tup = SearchSysCache1(RELOID, ObjectIdGetDatum(relid));
		Form_pg_class form;
		char	   *name;

		if (!HeapTupleIsValid(tup))
			continue;
		form = (Form_pg_class) GETSTRUCT(tup);

		/*
		 * The OID may have been reused since: only ever drop a staging heap
		 * (unlogged, or a new target filled in place, which is logged).
		 */
		if (strncmp(NameStr(form->relname), STAGING_PREFIX, strlen(STAGING_PREFIX)) != 0 ||
			form->relpersistence == RELPERSISTENCE_TEMP)
		{
			ReleaseSysCache(tup);
			continue;
		}
		name = quote_qualified_identifier(get_namespace_name(form->relnamespace),
										  NameStr(form->relname));
		ReleaseSysCache(tup);
		if (!pg_class_ownercheck(relid, GetUserId()))
			ereport(WARNING,
					(errmsg("staging table %s of an interrupted sync belongs to another role; it is left in place",
							name),
					 errhint("Its owner's next sync of the same target drops it, or DROP TABLE it.")));
		else
			CiflowExecSql(psprintf("DROP TABLE IF EXISTS %s", name));
	}
	SPI_finish();
}

/*
 * The schema of a first sync.  Concurrent first syncs into one new schema
 * each run CREATE SCHEMA IF NOT EXISTS, which races (23505 on
 * pg_namespace): one creates it under a lock held to its commit, the
 * others wait, then see the committed schema.
 */
static Oid
EnsureSchema(const char *schema)
{
	Oid			nspid = get_namespace_oid(schema, true);
	LOCKTAG		tag;

	if (OidIsValid(nspid))
		return nspid;
	NameLockTag(schema, CIFLOW_LOCK_SCHEMA, &tag);
	(void) LockAcquire(&tag, ExclusiveLock, false, false);
	AcceptInvalidationMessages();
	nspid = get_namespace_oid(schema, true);
	if (OidIsValid(nspid))
		return nspid;
	CiflowExecSql(psprintf("CREATE SCHEMA IF NOT EXISTS %s", quote_identifier(schema)));
	return get_namespace_oid(schema, false);
}

static char *
ColumnDefinition(const CiflowColumn *col)
{
	return psprintf("%s %s", quote_identifier(col->name),
					format_type_be_qualified(col->typid));
}

static void
CommentColumn(const char *qualified, const CiflowColumn *col)
{
	CiflowExecSql(psprintf("COMMENT ON COLUMN %s.%s IS %s", qualified,
						   quote_identifier(col->name),
						   quote_literal_cstr(col->remote_name)));
}

static const CiflowColumn *
ShapeColumn(const CiflowShape *shape, const char *name)
{
	int			c;

	for (c = 0; c < shape->ncolumns; c++)
	{
		if (strcmp(shape->columns[c].name, name) == 0)
			return &shape->columns[c];
	}
	return NULL;
}

/* The target's live column of that name, or NULL. */
static Form_pg_attribute
TargetAttribute(TupleDesc desc, const char *name)
{
	int			a;

	for (a = 0; a < desc->natts; a++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, a);

		if (!att->attisdropped && strcmp(NameStr(att->attname), name) == 0)
			return att;
	}
	return NULL;
}

/*
 * Targets created before the Edm map was widened hold jsonb columns for
 * Int16, Single, Binary, TimeOfDay and the like.  Such a column keeps
 * being loaded as jsonb (the shape, hence the staging heap, says so)
 * rather than failing the sync: converting it is the user's choice, with
 * ALTER TABLE ... ALTER COLUMN ... TYPE.
 */
static void
KeepJsonbColumns(CiflowShape *shape, TupleDesc desc)
{
	int			c;

	for (c = 0; c < shape->ncolumns; c++)
	{
		CiflowColumn *col = &shape->columns[c];
		Form_pg_attribute att = TargetAttribute(desc, col->name);

		if (att != NULL && att->atttypid == JSONBOID)
			col->typid = JSONBOID;
	}
}

/*
 * Matches the target's columns with the shape's; returns the shape's
 * columns the target lacks.  A column whose type changed, an entity column
 * the target generates, and a column of the user's own that no inserted
 * row could fill (NOT NULL, no default) are errors: found here, before
 * any page is fetched, not halfway through a publish.
 */
static List *
MatchColumns(const CiflowTarget *t, const CiflowShape *shape, Relation rel)
{
	TupleDesc	desc = RelationGetDescr(rel);
	List	   *missing = NIL;
	int			c;
	int			a;

	for (c = 0; c < shape->ncolumns; c++)
	{
		const CiflowColumn *col = &shape->columns[c];
		Form_pg_attribute att = TargetAttribute(desc, col->name);

		if (att == NULL)
			missing = lappend(missing, (void *) col);
		else if (att->atttypid != col->typid)
			ereport(ERROR,
					(errcode(ERRCODE_DATATYPE_MISMATCH),
					 errmsg("column \"%s\" of %s has type %s, but attribute \"%s\" of entity \"%s\" is %s (%s)",
							col->name, t->qualified, format_type_be(att->atttypid),
							col->remote_name, shape->entity, col->edm_type,
							format_type_be(col->typid)),
					 errhint("The attribute's type changed, or the table was made for something else: "
							 "convert the column with ALTER TABLE ... ALTER COLUMN ... TYPE %s, or sync into another target.",
							 format_type_be(col->typid))));
		else if (att->attgenerated != '\0')
			ereport(ERROR,
					(errcode(ERRCODE_WRONG_OBJECT_TYPE),
					 errmsg("column \"%s\" of %s is generated, but attribute \"%s\" of entity \"%s\" fills it",
							col->name, t->qualified, col->remote_name, shape->entity),
					 errhint("Rename the generated column.")));
	}
	for (a = 0; a < desc->natts; a++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, a);

		if (!att->attisdropped && att->attnotnull && !att->atthasdef &&
			att->attidentity == '\0' && att->attgenerated == '\0' &&
			ShapeColumn(shape, NameStr(att->attname)) == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_NOT_NULL_VIOLATION),
					 errmsg("column \"%s\" of %s is NOT NULL without a default, and entity \"%s\" has no attribute for it",
							NameStr(att->attname), t->qualified, shape->entity),
					 errhint("Give the column a DEFAULT, or drop its NOT NULL constraint.")));
	}
	return missing;
}

void
CiflowCheckColumns(const CiflowTarget *t, const CiflowShape *shape)
{
	Relation	rel = table_open(t->relid, AccessShareLock);
	List	   *missing = MatchColumns(t, shape, rel);

	table_close(rel, NoLock);
	if (missing != NIL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_COLUMN),
				 errmsg("column \"%s\" of %s was dropped while the sync ran",
						((CiflowColumn *) linitial(missing))->name, t->qualified)));
}

List *
CiflowRetiredColumns(const CiflowTarget *t, const CiflowShape *shape)
{
	Relation	rel = table_open(t->relid, AccessShareLock);
	TupleDesc	desc = RelationGetDescr(rel);
	List	   *retired = NIL;
	int			a;

	for (a = 0; a < desc->natts; a++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, a);
		char	   *comment;

		if (att->attisdropped || att->attnotnull || att->attgenerated != '\0' ||
			ShapeColumn(shape, NameStr(att->attname)) != NULL)
			continue;
		/* ciflow comments its columns with the attribute's name. */
		comment = GetComment(t->relid, RelationRelationId, att->attnum);
		if (comment != NULL && strcmp(CiflowSnakeCase(comment), NameStr(att->attname)) == 0)
			retired = lappend(retired, pstrdup(NameStr(att->attname)));
	}
	table_close(rel, NoLock);
	return retired;
}

static char *
StagingName(const CiflowTarget *t)
{
	char	   *qualified = psprintf("%s.%s", t->schema, t->table);

	return psprintf(STAGING_PREFIX "%016" INT64_MODIFIER "x",
					(uint64) hash_bytes_extended((const unsigned char *) qualified,
												 (int) strlen(qualified), 0));
}

/*
 * CREATE TABLE of the shape's columns, as a new target has them, then
 * extra columns and options.
 */
static void
CreateShapeTable(const char *persistence, const char *qualified, const CiflowShape *shape,
				 const char *extra, const char *options)
{
	StringInfoData sql;
	int			i;

	initStringInfo(&sql);
	appendStringInfo(&sql, "CREATE %sTABLE %s (", persistence, qualified);
	for (i = 0; i < shape->ncolumns; i++)
		appendStringInfo(&sql, "%s%s", i ? ", " : "", ColumnDefinition(&shape->columns[i]));
	if (extra != NULL)
		appendStringInfo(&sql, "%s%s", shape->ncolumns ? ", " : "", extra);
	appendStringInfo(&sql, ")%s", options);
	CiflowExecSql(sql.data);
}

/*
 * The one definition of a new target: the shape's columns, each commented
 * with its attribute's name (CiflowRetiredColumns reads the comments).
 */
static void
CreateTargetTable(const char *qualified, const CiflowShape *shape, const char *options)
{
	int			i;

	CreateShapeTable("", qualified, shape, NULL, options);
	for (i = 0; i < shape->ncolumns; i++)
		CommentColumn(qualified, &shape->columns[i]);
}

/* autovacuum would only get in the way of a table being loaded. */
#define STAGING_OPTIONS " WITH (autovacuum_enabled = false)"

/*
 * A new target is filled in place (it becomes the target at publish);
 * otherwise the heap's columns are the shape's, plus the order of arrival
 * (for duplicates) and the mark of a deletion (delta pulls).
 */
static void
CreateStaging(CiflowTarget *t, const CiflowShape *shape, Oid nspid)
{
	char	   *name = StagingName(t);

	/* In the run's memory, not SPI's: the name outlives this transaction. */
	t->staging = MemoryContextStrdup(GetMemoryChunkContext(t),
									 quote_qualified_identifier(t->schema, name));
	/*
	 * The name lock is ours: anything staged under this name is a dead
	 * run's.  Dropped only if there (the caller sees the worker's NOTICEs).
	 */
	if (OidIsValid(get_relname_relid(name, get_namespace_oid(t->schema, false))))
		CiflowExecSql(psprintf("DROP TABLE %s", t->staging));

	if (t->in_place)
		CreateTargetTable(t->staging, shape, STAGING_OPTIONS);
	else
		CreateShapeTable("UNLOGGED ", t->staging, shape,
						 psprintf("%s pg_catalog.int8, %s pg_catalog.bool",
								  quote_identifier(CIFLOW_STAGE_SEQ),
								  quote_identifier(CIFLOW_STAGE_DELETED)),
						 STAGING_OPTIONS);
	t->staging_relid = get_relname_relid(name, nspid);
}

/*
 * Whether logical replication would see the rows of a new table of this
 * schema as soon as they are inserted, under the name they are inserted
 * with.  A table in no publication is published only once a user adds it
 * (by then it is the target); these publications take every table.
 */
static bool
SchemaPublishesEveryTable(Oid nspid)
{
	return GetAllTablesPublications() != NIL || GetSchemaPublications(nspid) != NIL;
}

void
CiflowPrepareTarget(CiflowTarget *t, CiflowShape *shape)
{
	Oid			nspid;
	ListCell   *lc;

	SPI_connect();
	nspid = EnsureSchema(t->schema);
	t->relid = get_relname_relid(t->table, nspid);
	t->is_new = !OidIsValid(t->relid);
	t->in_place = t->is_new && !SchemaPublishesEveryTable(nspid);
	if (!t->is_new)
	{
		Relation	rel = table_open(t->relid, AccessShareLock);
		List	   *missing;

		KeepJsonbColumns(shape, RelationGetDescr(rel));
		missing = MatchColumns(t, shape, rel);

		/*
		 * Closed (the lock kept) before the ALTER: an ALTER of a relation
		 * this session still has open fails with 55006.
		 */
		table_close(rel, NoLock);
		foreach(lc, missing)
		{
			const CiflowColumn *col = lfirst(lc);

			CiflowExecSql(psprintf("ALTER TABLE %s ADD COLUMN %s", t->qualified,
								   ColumnDefinition(col)));
			CommentColumn(t->qualified, col);
		}
	}
	CreateStaging(t, shape, nspid);
	SPI_finish();
}

/* A first sync's name, taken while it ran: refused, not overwritten. */
static void
RefuseTakenName(const CiflowTarget *t)
{
	if (OidIsValid(get_relname_relid(t->table, get_namespace_oid(t->schema, false))))
		ereport(ERROR,
				(errcode(ERRCODE_DUPLICATE_TABLE),
				 errmsg("relation %s was created while the sync ran", t->qualified),
				 errhint("Sync again: the next run fills the table that now exists.")));
}

void
CiflowCreateTarget(CiflowTarget *t, const CiflowShape *shape)
{
	SPI_connect();
	RefuseTakenName(t);
	CreateTargetTable(t->qualified, shape, "");
	t->relid = get_relname_relid(t->table, get_namespace_oid(t->schema, false));
	SPI_finish();
}

/*
 * The heap keeps its OID, its columns' comments and the privileges it was
 * created with: it is renamed (before the key, so that the key's index is
 * named after the target) and autovacuum goes back to its defaults.
 */
void
CiflowPublishInPlace(CiflowTarget *t)
{
	SPI_connect();
	RefuseTakenName(t);
	CiflowExecSql(psprintf("ALTER TABLE %s RENAME TO %s", t->staging,
						   quote_identifier(t->table)));
	CiflowExecSql(psprintf("ALTER TABLE %s RESET (autovacuum_enabled)", t->qualified));
	t->relid = t->staging_relid;
	SPI_finish();
}

/*
 * The key's sort keeps at most this much in memory (less if
 * maintenance_work_mem says so) and spills the rest to disk, as CREATE
 * INDEX does: the worker's memory must not grow with the entity.
 */
#define KEY_BUILD_MEMORY_KB 32768

void
CiflowAddPrimaryKey(const CiflowTarget *t, const CiflowShape *shape)
{
	StringInfoData keys;

	if (shape->nkeys == 0)
		return;
	initStringInfo(&keys);
	CiflowAppendColumns(&keys, shape, true, "");
	if (maintenance_work_mem > KEY_BUILD_MEMORY_KB)
		(void) set_config_option("maintenance_work_mem", psprintf("%d", KEY_BUILD_MEMORY_KB),
								 PGC_USERSET, PGC_S_SESSION, GUC_ACTION_LOCAL, true, 0, false);
	SPI_connect();
	CiflowExecSql(psprintf("ALTER TABLE %s ADD PRIMARY KEY (%s)", t->qualified, keys.data));
	SPI_finish();
}

typedef struct AddKeyArgs
{
	const CiflowTarget *t;
	const CiflowShape *shape;
} AddKeyArgs;

static void
AddKeyIn(void *arg)
{
	AddKeyArgs *a = (AddKeyArgs *) arg;

	CiflowAddPrimaryKey(a->t, a->shape);
}

/* False when the key's values are not unique (23505); any other error goes on. */
bool
CiflowTryAddPrimaryKey(const CiflowTarget *t, const CiflowShape *shape)
{
	AddKeyArgs	args = {t, shape};
	ErrorData  *edata = CiflowTrySubtransaction(AddKeyIn, &args);

	if (edata == NULL)
		return true;
	if (edata->sqlerrcode != ERRCODE_UNIQUE_VIOLATION)
		ReThrowError(edata);
	FreeErrorData(edata);
	return false;
}

/*
 * Citus keeps its tables' rows in shards that only its executor writes:
 * from its own catalog (when Citus is installed), the kind of a Citus
 * table, or CIFLOW_CITUS_NONE.
 */
CiflowCitusKind
CiflowCitusTableKind(Oid relid)
{
	CiflowCitusKind kind = CIFLOW_CITUS_NONE;
	Datum		arg = ObjectIdGetDatum(relid);
	Oid			argtype = OIDOID;

	if (!OidIsValid(get_relname_relid("pg_dist_partition", PG_CATALOG_NAMESPACE)))
		return CIFLOW_CITUS_NONE;
	SPI_connect();
	if (SPI_execute_with_args("SELECT p.partmethod::pg_catalog.text, p.repmodel::pg_catalog.text"
							  " FROM pg_catalog.pg_dist_partition p"
							  " WHERE p.logicalrelid OPERATOR(pg_catalog.=) $1::pg_catalog.regclass",
							  1, &argtype, &arg, NULL, true, 1) == SPI_OK_SELECT &&
		SPI_processed == 1)
	{
		char	   *method = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
		char	   *model = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2);

		if (method[0] != 'n')
			kind = CIFLOW_CITUS_DISTRIBUTED;
		else if (model[0] == 't')
			kind = CIFLOW_CITUS_REFERENCE;
		else
			kind = CIFLOW_CITUS_LOCAL;
	}
	SPI_finish();
	return kind;
}

static void
RefuseSwap(const CiflowTarget *t, const char *why)
{
	ereport(ERROR,
			(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
			 errmsg("publish => 'swap' cannot replace the storage of %s", t->qualified),
			 errdetail("%s", why),
			 errhint("Use publish => 'diff' (the default): it applies ordinary row changes that everything sees.")));
}

/* Any constraint of another table that references this one. */
static bool
IsReferenced(Oid relid)
{
	bool		found;

	SPI_connect();
	found = CiflowExecSql(psprintf("SELECT 1 FROM pg_catalog.pg_constraint"
								   " WHERE confrelid OPERATOR(pg_catalog.=) %u"
								   " AND contype OPERATOR(pg_catalog.=) 'f' LIMIT 1",
								   relid)) > 0;
	SPI_finish();
	return found;
}

void
CiflowCheckSwap(const CiflowTarget *t)
{
	Relation	rel;
	TupleDesc	desc;
	int			i;

	if (!OidIsValid(t->relid))
		return;					/* a first sync creates the table */
	if (CiflowCitusTableKind(t->relid) != CIFLOW_CITUS_NONE)
		RefuseSwap(t, "It is a Citus table: its rows live in shards that only Citus's executor writes, and a swap would write the coordinator's local relation, which no query reads.");
	rel = table_open(t->relid, AccessShareLock);
	desc = RelationGetDescr(rel);
	if (rel->rd_rel->relkind == RELKIND_PARTITIONED_TABLE || rel->rd_rel->relispartition)
		RefuseSwap(t, "It is a partitioned table or a partition: swapped-in rows would not be routed to their partitions.");
	if (IsReferenced(t->relid))
		RefuseSwap(t, "A foreign key references it: the swap would leave the referencing rows pointing at deleted ones.");
	if (rel->trigdesc != NULL)
	{
		for (i = 0; i < rel->trigdesc->numtriggers; i++)
		{
			if (!rel->trigdesc->triggers[i].tgisinternal)
				RefuseSwap(t, psprintf("It has trigger \"%s\", which a swap does not fire.",
									   rel->trigdesc->triggers[i].tgname));
		}
	}
	if (desc->constr && (desc->constr->has_generated_stored || desc->constr->num_check > 0))
		RefuseSwap(t, "It has generated columns or CHECK constraints, which a swap neither computes nor checks.");
	if (RelationGetFKeyList(rel) != NIL)
		RefuseSwap(t, "It has foreign keys, which a swap does not check.");
	for (i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);

		if (!att->attisdropped && (att->atthasdef || att->attidentity != '\0'))
			RefuseSwap(t, psprintf("Column \"%s\" has a default, which a swap does not apply.",
								   NameStr(att->attname)));
	}
	if (GetRelationPublications(t->relid) != NIL || GetAllTablesPublications() != NIL ||
		GetSchemaPublications(RelationGetNamespace(rel)) != NIL)
		RefuseSwap(t, "It is published for logical replication, which does not see a swap.");
	table_close(rel, AccessShareLock);
}

char *
CiflowSwapBegin(CiflowTarget *t, Oid *new_heap)
{
	Relation	rel;

	/* Readers wait from here to the commit: that is what a swap costs. */
	LockRelationOid(t->relid, AccessExclusiveLock);
	rel = table_open(t->relid, NoLock);
	*new_heap = make_new_heap(t->relid, rel->rd_rel->reltablespace, rel->rd_rel->relam,
							  rel->rd_rel->relpersistence, ExclusiveLock);
	table_close(rel, NoLock);
	return quote_qualified_identifier(t->schema, get_rel_name(*new_heap));
}

void
CiflowSwapFinish(CiflowTarget *t, Oid new_heap)
{
	HeapTuple	tup;
	Form_pg_class form;
	TransactionId frozen_xid;
	MultiXactId min_multi;

	tup = SearchSysCache1(RELOID, ObjectIdGetDatum(new_heap));
	if (!HeapTupleIsValid(tup))
		elog(ERROR, "cache lookup failed for relation %u", new_heap);
	form = (Form_pg_class) GETSTRUCT(tup);

	/*
	 * The new heap's rows were inserted by this transaction, younger than
	 * the heap's own relfrozenxid: that is the horizon the swapped-in
	 * contents need.
	 */
	frozen_xid = form->relfrozenxid;
	min_multi = form->relminmxid;
	ReleaseSysCache(tup);
	finish_heap_swap(t->relid, new_heap, false, false, true, true,
					 frozen_xid, min_multi, get_rel_persistence(t->relid));
}

void
CiflowAnalyzeTarget(const CiflowTarget *t)
{
	SPI_connect();
	CiflowExecSql(psprintf("ANALYZE %s", t->qualified));
	SPI_finish();
}

void
CiflowDropStaging(CiflowTarget *t)
{
	if (!OidIsValid(t->staging_relid))
		return;
	SPI_connect();
	if (get_rel_name(t->staging_relid) != NULL)
		CiflowExecSql(psprintf("DROP TABLE IF EXISTS %s", t->staging));
	SPI_finish();
	t->staging_relid = InvalidOid;
}
