/*-------------------------------------------------------------------------
 *
 * entitykeys.c
 *	  ciflow.entity_keys: per connection and entity, the key and the Edm
 *	  types of the properties, as the last metadata ciflow read said.
 *
 *	  get_item needs the type of its key to write the key's literal (an
 *	  Edm.Int64 key quoted is a 400), and section 2 of the SQL contract
 *	  makes it one call.  So every metadata read ciflow makes anyway (a
 *	  sync's shape, describe_entity, get_entities on Customer Insights)
 *	  leaves what it learnt here, and get_item reads metadata itself only
 *	  for an entity nothing has told it about.
 *
 *	  A cache, and treated as one: reads are relation scans (catalog.c),
 *	  writes go through catalog.c's statements as the extension's owner,
 *	  but in a subtransaction whose failure is forgotten, never in a
 *	  read-only transaction, and with lock waits cut short, so that no
 *	  action ever fails or waits long because of it.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "storage/proc.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"

#include "catalog.h"
#include "ciflow.h"
#include "entitykeys.h"
#include "odata.h"

#define ENTITY_KEYS_TABLE "entity_keys"

/* A cache write never waits longer than this for a lock (ms). */
#define ENTITY_KEYS_LOCK_TIMEOUT_MS 200

static CiflowCatalogStatement upsert_keys = {
	.sql = "INSERT INTO ciflow.entity_keys AS k (connection, entity, key_names, key_types,"
	" property_types, fetched_at)"
	" VALUES ($1, $2, $3, $4, pg_catalog.jsonb_object($5, $6), pg_catalog.clock_timestamp())"
	" ON CONFLICT (connection, entity) DO UPDATE SET key_names = excluded.key_names,"
	" key_types = excluded.key_types, property_types = excluded.property_types,"
	" fetched_at = excluded.fetched_at",
	.nargs = 6,
	.types = {TEXTOID, TEXTOID, TEXTARRAYOID, TEXTARRAYOID, TEXTARRAYOID, TEXTARRAYOID}
};

static CiflowCatalogStatement delete_keys = {
	.sql = "DELETE FROM ciflow.entity_keys WHERE connection OPERATOR(pg_catalog.=) $1",
	.nargs = 1,
	.types = {TEXTOID}
};

static CiflowEntityKeys *
NewKeys(const char *entity, int nproperties, int nkeys)
{
	CiflowEntityKeys *keys = palloc0(sizeof(CiflowEntityKeys));

	keys->entity = pstrdup(entity);
	keys->nproperties = nproperties;
	keys->property_names = palloc0(sizeof(char *) * Max(nproperties, 1));
	keys->property_types = palloc0(sizeof(char *) * Max(nproperties, 1));
	keys->nkeys = nkeys;
	keys->key_names = palloc0(sizeof(char *) * Max(nkeys, 1));
	keys->key_types = palloc0(sizeof(char *) * Max(nkeys, 1));
	return keys;
}

CiflowEntityKeys *
CiflowEntityKeysFromShape(const char *entity, const CiflowShape *shape)
{
	CiflowEntityKeys *keys = NewKeys(entity, shape->ncolumns, shape->nkeys);
	int			i;

	for (i = 0; i < shape->ncolumns; i++)
	{
		keys->property_names[i] = pstrdup(shape->columns[i].remote_name);
		keys->property_types[i] = pstrdup(shape->columns[i].edm_type);
	}
	for (i = 0; i < shape->nkeys; i++)
	{
		keys->key_names[i] = keys->property_names[shape->keys[i]];
		keys->key_types[i] = keys->property_types[shape->keys[i]];
	}
	return keys;
}

CiflowEntityKeys *
CiflowEntityKeysFromCsdl(const char *entity, const CiflowCsdlEntity *csdl)
{
	CiflowEntityKeys *keys = NewKeys(entity, csdl->nproperties, csdl->nkeys);
	int			i;

	for (i = 0; i < csdl->nproperties; i++)
	{
		keys->property_names[i] = pstrdup(csdl->properties[i].name);
		keys->property_types[i] = pstrdup(csdl->properties[i].edm_type);
	}
	for (i = 0; i < csdl->nkeys; i++)
	{
		keys->key_names[i] = keys->property_names[csdl->keys[i]];
		keys->key_types[i] = keys->property_types[csdl->keys[i]];
	}
	return keys;
}

/*
 * Unlike the sync's reading of E2 (shape.c), this one is lenient: an
 * entity get_entities lists but ciflow cannot make sense of is simply not
 * remembered, and get_entities answers as before.
 */
CiflowEntityKeys *
CiflowEntityKeysFromE2(json_t *entity)
{
	const char *name = CiflowJsonString(entity, "qualifiedEntityName");
	json_t	   *attrs = json_object_get(entity, "attributes");
	json_t	   *keyset = json_object_get(entity, "keys");
	CiflowEntityKeys *keys;
	json_t	   *member;
	size_t		i;

	if (name == NULL)
		name = CiflowJsonString(entity, "name");
	if (name == NULL || !json_is_array(attrs))
		return NULL;
	/* [[key attributes], ...]: the first set is the primary key. */
	if (json_is_array(keyset) && json_array_size(keyset) > 0 &&
		json_is_array(json_array_get(keyset, 0)))
		keyset = json_array_get(keyset, 0);
	if (!json_is_array(keyset))
		keyset = NULL;

	keys = NewKeys(name, (int) json_array_size(attrs),
				   keyset ? (int) json_array_size(keyset) : 0);
	json_array_foreach(attrs, i, member)
	{
		const char *aname = CiflowJsonString(member, "name");
		const char *atype = CiflowJsonString(member, "dataType");

		if (aname == NULL)
			return NULL;
		keys->property_names[i] = pstrdup(aname);
		keys->property_types[i] = pstrdup(atype ? atype : "(none)");
	}
	for (i = 0; keyset != NULL && i < json_array_size(keyset); i++)
	{
		json_t	   *k = json_array_get(keyset, i);
		const char *kname = json_is_string(k) ? json_string_value(k) : CiflowJsonString(k, "name");
		const char *ktype = kname ? CiflowEntityKeysTypeOf(keys, kname) : NULL;

		if (ktype == NULL)
			return NULL;
		keys->key_names[i] = pstrdup(kname);
		keys->key_types[i] = pstrdup(ktype);
	}
	return keys;
}

const char *
CiflowEntityKeysTypeOf(const CiflowEntityKeys *keys, const char *property)
{
	int			i;

	/* Case-sensitive, as OData names are. */
	for (i = 0; i < keys->nproperties; i++)
	{
		if (strcmp(keys->property_names[i], property) == 0)
			return keys->property_types[i];
	}
	return NULL;
}

char *
CiflowEntityKeysList(const CiflowEntityKeys *keys)
{
	StringInfoData out;
	int			i;

	initStringInfo(&out);
	for (i = 0; i < keys->nkeys; i++)
		appendStringInfo(&out, "%s%s", i > 0 ? ", " : "", keys->key_names[i]);
	if (keys->nkeys == 0)
		appendStringInfoString(&out, "not given by its metadata");
	return out.data;
}

/* ciflow.entity_keys, or InvalidOid while the extension is older than 0.2. */
static Oid
EntityKeysRelid(void)
{
	Oid			nspid = get_namespace_oid("ciflow", true);

	return OidIsValid(nspid) ? get_relname_relid(ENTITY_KEYS_TABLE, nspid) : InvalidOid;
}

static char **
TextArray(Datum d, int *n)
{
	Datum	   *elems;
	bool	   *nulls;
	char	  **out;
	int			i;

	deconstruct_array(DatumGetArrayTypeP(d), TEXTOID, -1, false, TYPALIGN_INT,
					  &elems, &nulls, n);
	out = palloc0(sizeof(char *) * Max(*n, 1));
	for (i = 0; i < *n; i++)
		out[i] = nulls[i] ? pstrdup("(none)") : TextDatumGetCString(elems[i]);
	return out;
}

/* property_types, {"name": "Edm type", ...}, into the two arrays. */
static void
ReadPropertyTypes(CiflowEntityKeys *keys, Jsonb *jb)
{
	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken tok;
	int			size = JB_ROOT_IS_OBJECT(jb) ? JB_ROOT_COUNT(jb) : 0;
	int			n = 0;

	keys->property_names = palloc0(sizeof(char *) * Max(size, 1));
	keys->property_types = palloc0(sizeof(char *) * Max(size, 1));
	if (size == 0)
		return;
	it = JsonbIteratorInit(&jb->root);
	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		if (tok == WJB_KEY && n < size)
			keys->property_names[n] = pnstrdup(v.val.string.val, v.val.string.len);
		else if (tok == WJB_VALUE && n < size)
		{
			keys->property_types[n] = v.type == jbvString ?
				pnstrdup(v.val.string.val, v.val.string.len) : pstrdup("(none)");
			n++;
		}
	}
	keys->nproperties = n;
}

CiflowEntityKeys *
CiflowEntityKeysLookup(const char *connection, const char *entity)
{
	Oid			relid = EntityKeysRelid();
	Relation	rel;
	ScanKeyData skey[2];
	SysScanDesc scan;
	HeapTuple	tup;
	CiflowEntityKeys *keys = NULL;

	if (!OidIsValid(relid))
		return NULL;

	/*
	 * A heap scan with keys, as catalog.c reads: no SQL, nothing of the
	 * caller's, no privilege check; texteq is collation-blind.
	 */
	rel = table_open(relid, AccessShareLock);
	ScanKeyInit(&skey[0], get_attnum(relid, "connection"), BTEqualStrategyNumber,
				F_TEXTEQ, CStringGetTextDatum(connection));
	ScanKeyInit(&skey[1], get_attnum(relid, "entity"), BTEqualStrategyNumber,
				F_TEXTEQ, CStringGetTextDatum(entity));
	scan = systable_beginscan(rel, InvalidOid, false,
							  ActiveSnapshotSet() ? GetActiveSnapshot() :
							  GetTransactionSnapshot(), 2, skey);
	tup = systable_getnext(scan);
	if (HeapTupleIsValid(tup))
	{
		TupleDesc	desc = RelationGetDescr(rel);
		bool		isnull;
		Datum		d;
		int			ntypes;

		keys = palloc0(sizeof(CiflowEntityKeys));
		keys->entity = pstrdup(entity);
		d = CiflowCatalogDatum(tup, desc, "key_names", &isnull);
		keys->key_names = TextArray(d, &keys->nkeys);
		d = CiflowCatalogDatum(tup, desc, "key_types", &isnull);
		keys->key_types = TextArray(d, &ntypes);
		d = CiflowCatalogDatum(tup, desc, "property_types", &isnull);
		ReadPropertyTypes(keys, DatumGetJsonbP(d));
		/* The table's CHECK keeps these equal; a row that is not is no help. */
		if (ntypes != keys->nkeys)
			keys = NULL;
	}
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	return keys;
}

static Datum
TextArrayDatum(char **items, int n)
{
	Datum	   *elems = palloc(sizeof(Datum) * Max(n, 1));
	int			i;

	for (i = 0; i < n; i++)
		elems[i] = CStringGetTextDatum(items[i]);
	return PointerGetDatum(construct_array(elems, n, TEXTOID, -1, false, TYPALIGN_INT));
}

static void
WriteKeys(const char *connection, CiflowEntityKeys *const *keys, int n)
{
	int			guc_nest = NewGUCNestLevel();
	int			i;

	/*
	 * Two sessions that miss on the same entity write the same row: the
	 * second waits for the first's transaction, which may be long.  A
	 * cache write is not worth that wait.
	 */
	if (LockTimeout == 0 || LockTimeout > ENTITY_KEYS_LOCK_TIMEOUT_MS)
		(void) set_config_option("lock_timeout", CppAsString2(ENTITY_KEYS_LOCK_TIMEOUT_MS),
								 PGC_USERSET, PGC_S_SESSION, GUC_ACTION_SAVE, true, 0, false);
	for (i = 0; i < n; i++)
	{
		const CiflowEntityKeys *k = keys[i];
		Datum		values[6];

		if (k == NULL)
			continue;
		values[0] = CStringGetTextDatum(connection);
		values[1] = CStringGetTextDatum(k->entity);
		values[2] = TextArrayDatum(k->key_names, k->nkeys);
		values[3] = TextArrayDatum(k->key_types, k->nkeys);
		values[4] = TextArrayDatum(k->property_names, k->nproperties);
		values[5] = TextArrayDatum(k->property_types, k->nproperties);
		(void) CiflowCatalogExecute(&upsert_keys, values, NULL, NULL, NULL);
	}
	AtEOXact_GUC(true, guc_nest);
}

typedef struct WriteKeysArgs
{
	const char *connection;
	CiflowEntityKeys *const *keys;
	int			n;
} WriteKeysArgs;

static void
WriteKeysIn(void *arg)
{
	WriteKeysArgs *a = (WriteKeysArgs *) arg;

	WriteKeys(a->connection, a->keys, a->n);
}

void
CiflowEntityKeysRemember(const char *connection, CiflowEntityKeys *const *keys, int n)
{
	WriteKeysArgs args = {connection, keys, n};
	ErrorData  *edata;

	if (n == 0 || !IsTransactionState() || XactReadOnly || RecoveryInProgress() ||
		IsInParallelMode() || !OidIsValid(EntityKeysRelid()))
		return;

	edata = CiflowTrySubtransaction(WriteKeysIn, &args);
	if (edata == NULL)
		return;
	/* A cancel, a timeout or a shutdown is the user's, not the cache's. */
	if (ERRCODE_TO_CATEGORY(edata->sqlerrcode) == ERRCODE_OPERATOR_INTERVENTION)
		ReThrowError(edata);
	elog(DEBUG1, "ciflow: the metadata of connection \"%s\" was not remembered: %s",
		 connection, edata->message);
	FreeErrorData(edata);
}

void
CiflowEntityKeysForget(const char *connection)
{
	Datum		value = CStringGetTextDatum(connection);

	if (OidIsValid(EntityKeysRelid()))
		(void) CiflowCatalogExecute(&delete_keys, &value, NULL, NULL, NULL);
}
