/*-------------------------------------------------------------------------
 *
 * target.c
 *	  The table a sync fills.  Its shape comes from the entity's metadata
 *	  (snake_case names, types from the Edm types, the key as primary key,
 *	  the original names as column comments); pages go into a staging heap;
 *	  publishing makes the staged contents the target's in one short
 *	  transaction, so readers see the old contents or the new, never a mix.
 *
 *	  An existing target keeps its OID (views, grants, comments and
 *	  policies on it survive): the staging heap is made by make_new_heap
 *	  with the target's own descriptor and swapped in by finish_heap_swap,
 *	  the way CLUSTER ends.  A new target is created only at publish, by
 *	  renaming the complete staging table, so it never exists half-full.
 *
 *	  This file changes tables; it never talks to the service and never
 *	  touches ciflow's catalog.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/table.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "catalog/pg_type.h"
#include "commands/cluster.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "storage/lmgr.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/regproc.h"
#include "utils/syscache.h"

#include "ciflow.h"
#include "odata.h"
#include "target.h"

/* Distinguishes ciflow's name locks from user advisory locks (1 and 2). */
#define CIFLOW_LOCK_FIELD4 0x4369

static const struct
{
	const char *edm;
	Oid			typid;
}			edm_types[] =
{
	{"Edm.String", TEXTOID},
	{"Edm.Int32", INT4OID},
	{"Edm.Int64", INT8OID},
	{"Edm.Double", FLOAT8OID},
	{"Edm.Decimal", NUMERICOID},
	{"Edm.Boolean", BOOLOID},
	{"Edm.DateTimeOffset", TIMESTAMPTZOID},
	{"Edm.Date", DATEOID},
	{"Edm.Guid", UUIDOID},
};

/* The SQL contract's mapping; every other type is kept as jsonb. */
static Oid
EdmTypeOid(const char *edm)
{
	int			i;

	for (i = 0; edm != NULL && i < (int) lengthof(edm_types); i++)
	{
		if (pg_strcasecmp(edm, edm_types[i].edm) == 0)
			return edm_types[i].typid;
	}
	return JSONBOID;
}

/* Cuts a name to fit NAMEDATALEN, with a hash suffix so cuts stay distinct. */
static char *
FitName(const char *name)
{
	size_t		len = strlen(name);

	if (len < NAMEDATALEN)
		return pstrdup(name);
	return psprintf("%.*s_%08x", NAMEDATALEN - 10, name,
					hash_bytes((const unsigned char *) name, (int) len));
}

/*
 * FullName -> full_name, CustomerId -> customer_id, HTTPStatus ->
 * http_status, RetailPos_Transactions -> retail_pos_transactions.  Other
 * punctuation becomes one underscore; non-ASCII letters are kept.
 */
char *
CiflowSnakeCase(const char *name)
{
	StringInfoData out;
	const unsigned char *s = (const unsigned char *) name;
	size_t		len = strlen(name);
	size_t		i;

	initStringInfo(&out);
	for (i = 0; i < len; i++)
	{
		unsigned char c = s[i];
		bool		last_is_sep = out.len == 0 || out.data[out.len - 1] == '_';

		if (c >= 'A' && c <= 'Z')
		{
			bool		prev_lower = i > 0 && ((s[i - 1] >= 'a' && s[i - 1] <= 'z') ||
											   (s[i - 1] >= '0' && s[i - 1] <= '9'));
			bool		acronym_end = i > 0 && s[i - 1] >= 'A' && s[i - 1] <= 'Z' &&
				i + 1 < len && s[i + 1] >= 'a' && s[i + 1] <= 'z';

			if (!last_is_sep && (prev_lower || acronym_end))
				appendStringInfoChar(&out, '_');
			appendStringInfoChar(&out, (char) (c - 'A' + 'a'));
		}
		else if ((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c >= 0x80)
			appendStringInfoChar(&out, (char) c);
		else if (!last_is_sep)
			appendStringInfoChar(&out, '_');
	}
	while (out.len > 0 && out.data[out.len - 1] == '_')
		out.data[--out.len] = '\0';
	if (out.len == 0)
		appendStringInfoString(&out, "column");
	if (out.data[0] >= '0' && out.data[0] <= '9')
		return FitName(psprintf("_%s", out.data));
	return FitName(out.data);
}

static void
MetadataError(const char *failmsg, const char *detail)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_JSON_TEXT),
			 errmsg("%s", failmsg),
			 errdetail("The entity's metadata is unusable: %s", detail)));
}

/* A key member is {"name": "..."} or just the name. */
static const char *
KeyAttributeName(json_t *member)
{
	if (json_is_string(member))
		return json_string_value(member);
	return CiflowJsonString(member, "name");
}

static void
ShapeKeys(CiflowShape *shape, json_t *keys, const char *failmsg)
{
	json_t	   *first;
	json_t	   *member;
	size_t		i;

	if (!json_is_array(keys) || json_array_size(keys) == 0)
		return;
	/* [[key attributes], ...]: the first set is the primary key. */
	first = json_array_get(keys, 0);
	if (!json_is_array(first))
		first = keys;

	shape->keys = palloc(sizeof(int) * json_array_size(first));
	json_array_foreach(first, i, member)
	{
		const char *name = KeyAttributeName(member);
		int			c;

		for (c = 0; name != NULL && c < shape->ncolumns; c++)
		{
			if (strcmp(shape->columns[c].remote_name, name) == 0)
				break;
		}
		if (name == NULL || c == shape->ncolumns)
			MetadataError(failmsg, psprintf("key attribute \"%s\" is not among its attributes.",
										   name ? name : "(unnamed)"));
		shape->columns[c].is_key = true;
		shape->keys[shape->nkeys++] = c;
	}
}

CiflowShape *
CiflowShapeFromMetadata(json_t *entity, const char *failmsg)
{
	CiflowShape *shape = palloc0(sizeof(CiflowShape));
	json_t	   *attrs = json_object_get(entity, "attributes");
	json_t	   *attr;
	const char *name;
	size_t		i;

	name = CiflowJsonString(entity, "qualifiedEntityName");
	if (name == NULL)
		name = CiflowJsonString(entity, "name");
	if (name == NULL)
		MetadataError(failmsg, "it has no qualifiedEntityName.");
	shape->entity = pstrdup(name);
	shape->is_system = CiflowJsonString(entity, "dataSourceName") == NULL;

	if (!json_is_array(attrs) || json_array_size(attrs) == 0)
		MetadataError(failmsg, "it has no attributes.");
	shape->columns = palloc0(sizeof(CiflowColumn) * json_array_size(attrs));
	json_array_foreach(attrs, i, attr)
	{
		CiflowColumn *col = &shape->columns[shape->ncolumns];
		const char *aname = CiflowJsonString(attr, "name");
		const char *edm = CiflowJsonString(attr, "dataType");
		char	   *base;
		int			suffix = 1;
		int			c;

		if (aname == NULL)
			MetadataError(failmsg, psprintf("attribute %zu has no name.", i + 1));
		col->remote_name = pstrdup(aname);
		col->edm_type = pstrdup(edm ? edm : "(none)");
		col->typid = EdmTypeOid(edm);

		/* Two attributes may fold to one name (Name, name): number them. */
		base = CiflowSnakeCase(aname);
		col->name = base;
		for (c = 0; c < shape->ncolumns; c++)
		{
			if (strcmp(shape->columns[c].name, col->name) == 0)
			{
				col->name = FitName(psprintf("%s_%d", base, ++suffix));
				c = -1;
			}
		}
		shape->ncolumns++;
	}
	ShapeKeys(shape, json_object_get(entity, "keys"), failmsg);
	return shape;
}

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

/*
 * The lock is on the qualified name, before any relation exists: a 64-bit
 * hash of it (two distinct targets colliding is a 2^-64 chance).
 */
static void
NameLockTag(const CiflowTarget *t, LOCKTAG *tag)
{
	char	   *qualified = psprintf("%s.%s", t->schema, t->table);
	uint64		h = hash_bytes_extended((const unsigned char *) qualified,
										(int) strlen(qualified), 0);

	SET_LOCKTAG_ADVISORY(*tag, MyDatabaseId, (uint32) (h >> 32), (uint32) h,
						 CIFLOW_LOCK_FIELD4);
	pfree(qualified);
}

bool
CiflowLockTargetName(CiflowTarget *t)
{
	LOCKTAG		tag;

	NameLockTag(t, &tag);
	t->name_locked = LockAcquire(&tag, ExclusiveLock, true, true) != LOCKACQUIRE_NOT_AVAIL;
	return t->name_locked;
}

void
CiflowUnlockTarget(CiflowTarget *t)
{
	if (t->rel_locked)
	{
		UnlockRelationIdForSession(&t->lockrelid, ShareUpdateExclusiveLock);
		t->rel_locked = false;
	}
	if (t->name_locked)
	{
		LOCKTAG		tag;

		NameLockTag(t, &tag);
		LockRelease(&tag, ExclusiveLock, true);
		t->name_locked = false;
	}
}

static void
ExecSql(const char *sql)
{
	int			rc = SPI_execute(sql, false, 0);

	if (rc < 0)
		elog(ERROR, "SPI_execute failed (%s): %s", SPI_result_code_string(rc), sql);
}

/* Name of the staging table of a target that does not exist yet. */
static char *
NewStagingName(const char *table)
{
	return psprintf("ciflow_new_%08x",
					hash_bytes((const unsigned char *) table, (int) strlen(table)));
}

static void
DropTableIfExists(const char *schema, const char *table)
{
	/* Quietly: the caller sees the worker's NOTICEs, and this is not news. */
	Oid			nspid = get_namespace_oid(schema, true);

	if (!OidIsValid(nspid) || !OidIsValid(get_relname_relid(table, nspid)))
		return;
	ExecSql(psprintf("DROP TABLE IF EXISTS %s",
					 quote_qualified_identifier(schema, table)));
}

static void
CommentColumn(const char *qualified, const CiflowColumn *col)
{
	ExecSql(psprintf("COMMENT ON COLUMN %s.%s IS %s", qualified,
					 quote_identifier(col->name), quote_literal_cstr(col->remote_name)));
}

static char *
ColumnDefinition(const CiflowColumn *col)
{
	return psprintf("%s %s", quote_identifier(col->name),
					format_type_be_qualified(col->typid));
}

static void
CreateStagingTable(CiflowTarget *t, const CiflowShape *shape, Oid nspid)
{
	char	   *staging = NewStagingName(t->table);
	char	   *qualified = quote_qualified_identifier(t->schema, staging);
	StringInfoData sql;
	int			i;

	initStringInfo(&sql);
	appendStringInfo(&sql, "CREATE TABLE %s (", qualified);
	for (i = 0; i < shape->ncolumns; i++)
		appendStringInfo(&sql, "%s%s", i ? ", " : "", ColumnDefinition(&shape->columns[i]));
	appendStringInfoChar(&sql, ')');
	ExecSql(sql.data);
	for (i = 0; i < shape->ncolumns; i++)
		CommentColumn(qualified, &shape->columns[i]);
	t->staging_relid = get_relname_relid(staging, nspid);
	t->is_new = true;
}

/*
 * The target must still be able to hold the entity: matching columns must
 * have the mapped type; attributes the service added become new columns.
 * Columns the service dropped, and the user's own columns, stay (NULL).
 */
static void
ReconcileColumns(CiflowTarget *t, const CiflowShape *shape, Relation rel)
{
	TupleDesc	desc = RelationGetDescr(rel);
	char	   *qualified = CiflowTargetName(t->schema, t->table);
	int			i;

	for (i = 0; i < shape->ncolumns; i++)
	{
		const CiflowColumn *col = &shape->columns[i];
		int			a;

		for (a = 0; a < desc->natts; a++)
		{
			Form_pg_attribute att = TupleDescAttr(desc, a);

			if (!att->attisdropped && strcmp(NameStr(att->attname), col->name) == 0)
				break;
		}
		if (a == desc->natts)
		{
			ExecSql(psprintf("ALTER TABLE %s ADD COLUMN %s", qualified,
							 ColumnDefinition(col)));
			CommentColumn(qualified, col);
		}
		else if (TupleDescAttr(desc, a)->atttypid != col->typid)
			ereport(ERROR,
					(errcode(ERRCODE_DATATYPE_MISMATCH),
					 errmsg("column \"%s\" of %s has type %s, but attribute \"%s\" of entity \"%s\" is %s",
							col->name, qualified,
							format_type_be(TupleDescAttr(desc, a)->atttypid),
							col->remote_name, shape->entity,
							format_type_be(col->typid)),
					 errhint("Drop the table, or sync into another target.")));
	}
}

void
CiflowPrepareTarget(CiflowTarget *t, const CiflowShape *shape)
{
	Oid			nspid;
	Relation	rel;

	SPI_connect();
	nspid = get_namespace_oid(t->schema, true);
	if (!OidIsValid(nspid))
	{
		ExecSql(psprintf("CREATE SCHEMA IF NOT EXISTS %s", quote_identifier(t->schema)));
		nspid = get_namespace_oid(t->schema, false);
	}

	/*
	 * The name lock is ours, so anything staged under this name is a dead
	 * run's.
	 */
	DropTableIfExists(t->schema, NewStagingName(t->table));
	t->relid = get_relname_relid(t->table, nspid);
	if (!OidIsValid(t->relid))
	{
		CreateStagingTable(t, shape, nspid);
		SPI_finish();
		return;
	}

	DropTableIfExists(t->schema, psprintf("pg_temp_%u", t->relid));
	rel = table_open(t->relid, AccessShareLock);
	if (rel->rd_rel->relkind != RELKIND_RELATION)
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("target %s is not a table", CiflowTargetName(t->schema, t->table))));
	if (!pg_class_ownercheck(t->relid, GetUserId()))
		aclcheck_error(ACLCHECK_NOT_OWNER, OBJECT_TABLE, t->table);

	/*
	 * Until publish, nothing may change the target's columns: the staging
	 * heap's layout is the target's.  Readers and writers are not blocked.
	 */
	t->lockrelid = rel->rd_lockInfo.lockRelId;
	LockRelationIdForSession(&t->lockrelid, ShareUpdateExclusiveLock);
	t->rel_locked = true;

	ReconcileColumns(t, shape, rel);
	t->staging_relid = make_new_heap(t->relid, rel->rd_rel->reltablespace,
									 rel->rd_rel->relam,
									 rel->rd_rel->relpersistence, ExclusiveLock);
	t->is_new = false;
	table_close(rel, NoLock);
	SPI_finish();
}

static char *
KeyList(const CiflowShape *shape)
{
	StringInfoData s;
	int			k;

	initStringInfo(&s);
	for (k = 0; k < shape->nkeys; k++)
		appendStringInfo(&s, "%s%s", k ? ", " : "",
						 quote_identifier(shape->columns[shape->keys[k]].name));
	return s.data;
}

/*
 * Offset paging over changing data can deliver a row twice; the version
 * received last wins.  Only run when the key index found duplicates.
 */
static void
DedupeStaging(const CiflowTarget *t, const CiflowShape *shape)
{
	char	   *staging = quote_qualified_identifier(t->schema, get_rel_name(t->staging_relid));
	char	   *keys = KeyList(shape);

	SPI_connect();
	ExecSql(psprintf("DELETE FROM %s AS a WHERE EXISTS (SELECT 1 FROM %s AS b"
					 " WHERE (b.%s) IS NOT DISTINCT FROM (a.%s) AND b.ctid > a.ctid)",
					 staging, staging, keys, keys));
	ereport(WARNING,
			(errmsg("entity \"%s\" delivered " UINT64_FORMAT " duplicate rows; the last version of each was kept",
					shape->entity, SPI_processed),
			 errhint("The data changed while it was paged through with $skip.")));
	SPI_finish();
}

static void
PublishOnce(CiflowTarget *t, const CiflowShape *shape)
{
	if (t->is_new)
	{
		Oid			nspid = get_namespace_oid(t->schema, false);
		char	   *qualified = CiflowTargetName(t->schema, t->table);

		if (OidIsValid(get_relname_relid(t->table, nspid)))
			ereport(ERROR,
					(errcode(ERRCODE_DUPLICATE_TABLE),
					 errmsg("relation %s was created while the sync ran", qualified)));
		SPI_connect();
		ExecSql(psprintf("ALTER TABLE %s RENAME TO %s",
						 quote_qualified_identifier(t->schema, get_rel_name(t->staging_relid)),
						 quote_identifier(t->table)));
		if (shape->nkeys > 0)
			ExecSql(psprintf("ALTER TABLE %s ADD PRIMARY KEY (%s)", qualified, KeyList(shape)));
		SPI_finish();
		t->relid = t->staging_relid;
	}
	else
	{
		HeapTuple	tup;
		Form_pg_class staging;
		TransactionId frozen_xid;
		MultiXactId min_multi;
		char		persistence;

		LockRelationOid(t->relid, AccessExclusiveLock);
		tup = SearchSysCache1(RELOID, ObjectIdGetDatum(t->staging_relid));
		if (!HeapTupleIsValid(tup))
			elog(ERROR, "cache lookup failed for relation %u", t->staging_relid);
		staging = (Form_pg_class) GETSTRUCT(tup);

		/*
		 * The staged rows were inserted by this run's transactions, all
		 * younger than the staging heap's own relfrozenxid: that is the
		 * horizon the swapped-in contents need.
		 */
		frozen_xid = staging->relfrozenxid;
		min_multi = staging->relminmxid;
		ReleaseSysCache(tup);
		persistence = get_rel_persistence(t->relid);
		finish_heap_swap(t->relid, t->staging_relid, false, false, true, true,
						 frozen_xid, min_multi, persistence);
	}
	t->staging_relid = InvalidOid;
}

void
CiflowPublishTarget(CiflowTarget *t, const CiflowShape *shape)
{
	MemoryContext cxt = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;
	CiflowTarget saved = *t;

	if (shape->nkeys == 0)
	{
		PublishOnce(t, shape);
		return;
	}

	/* Building the key index finds duplicates for free; only then dedupe. */
	BeginInternalSubTransaction(NULL);
	PG_TRY();
	{
		PublishOnce(t, shape);
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(cxt);
		CurrentResourceOwner = owner;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		if (edata->sqlerrcode != ERRCODE_UNIQUE_VIOLATION)
			PG_RE_THROW();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(cxt);
		CurrentResourceOwner = owner;

		*t = saved;
		DedupeStaging(t, shape);
		PublishOnce(t, shape);
	}
	PG_END_TRY();
}

void
CiflowAnalyzeTarget(const CiflowTarget *t)
{
	SPI_connect();
	ExecSql(psprintf("ANALYZE %s", CiflowTargetName(t->schema, t->table)));
	SPI_finish();
}

void
CiflowDropStaging(CiflowTarget *t)
{
	char	   *name;

	if (!OidIsValid(t->staging_relid))
		return;
	name = get_rel_name(t->staging_relid);
	if (name != NULL)
	{
		SPI_connect();
		DropTableIfExists(t->schema, name);
		SPI_finish();
	}
	t->staging_relid = InvalidOid;
}
