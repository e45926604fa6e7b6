/*-------------------------------------------------------------------------
 *
 * actions.c
 *	  The actions: get_entities, get_items and get_item, answered in the
 *	  calling session and in its transaction.  Each is one call to the
 *	  service.  get_item writes its key's literal by the key's Edm type,
 *	  which it takes from what ciflow remembers of the entity's metadata
 *	  (entitykeys.c); only for an entity it knows nothing of does it read
 *	  the metadata first (a second call).  The only writes are to that
 *	  cache, and never fail an action.
 *
 *	  describe_entity shows an entity set's shape as $metadata gives it
 *	  (the columns a sync makes of it), for every flavour.
 *
 *	  Entity lists come from E2 (Customer Insights) or the service
 *	  document (the other flavours); fetching metadata is servicemeta.c's
 *	  job, reading CSDL csdl.c's, the Edm map edm.c's.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "fmgr.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"

#include "ciflow.h"
#include "connection.h"
#include "convert.h"
#include "edm.h"
#include "entitykeys.h"
#include "odata.h"
#include "request.h"
#include "servicemeta.h"

CIFLOW_SQL_FUNCTION(ciflow_get_entities);
CIFLOW_SQL_FUNCTION(ciflow_get_items);
CIFLOW_SQL_FUNCTION(ciflow_get_item);
CIFLOW_SQL_FUNCTION(ciflow_describe_entity);

static void
RequireArg(const char *value, const char *what)
{
	if (value == NULL || value[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null or empty", what)));
}

/*
 * OData's SimpleIdentifier: it goes into $filter as is, so anything else
 * could change the filter's meaning.  Bytes >= 0x80 are taken as letters.
 */
static bool
IsODataIdentifier(const char *s)
{
	const unsigned char *p = (const unsigned char *) s;

	if (!(*p == '_' || (*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') || *p >= 0x80))
		return false;
	for (p++; *p; p++)
	{
		if (!(*p == '_' || (*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') ||
			  (*p >= '0' && *p <= '9') || *p >= 0x80))
			return false;
	}
	return strlen(s) <= 128;
}

static json_t *
CallService(const CiflowConnection *conn, const char *url, const char *failmsg,
			const char *not_found_hint)
{
	CiflowRequest req;

	memset(&req, 0, sizeof(req));
	req.conn = conn;
	req.url = url;
	req.api_call = true;
	req.failmsg = failmsg;
	req.not_found_hint = not_found_hint;
	return CiflowRequestJson(&req);
}

typedef Datum (*ActionBody) (FunctionCallInfo fcinfo, const char *failmsg);

/* Runs an action so that every error it raises is under failmsg. */
static Datum
RunAction(FunctionCallInfo fcinfo, ActionBody body, const char *failmsg)
{
	MemoryContext cxt = CurrentMemoryContext;
	Datum		result = (Datum) 0;

	PG_TRY();
	{
		result = body(fcinfo, failmsg);
	}
	PG_CATCH();
	{
		CiflowRethrowUnder(cxt, failmsg);
	}
	PG_END_TRY();
	return result;
}

static char *
ReadFailMessage(FunctionCallInfo fcinfo)
{
	char	   *name = CiflowTextArg(fcinfo, 0);
	char	   *entity = CiflowTextArg(fcinfo, 1);

	return psprintf("could not read entity \"%s\" from connection \"%s\"",
					entity ? entity : "(null)", name ? name : "(null)");
}

/*
 * OData and Dataverse: the service document's entity sets.  The name is
 * what sync and get_items take, the URL segment goes in qualified_name;
 * the rest is in $metadata, which can be tens of MB: not read here.
 */
static void
PutEntitySets(const CiflowConnection *conn, ReturnSetInfo *rsinfo, const char *failmsg)
{
	int			nsets;
	CiflowEntitySet *sets = CiflowFetchEntitySets(conn, failmsg, &nsets);
	int			i;

	for (i = 0; i < nsets; i++)
	{
		Datum		values[7] = {0};
		bool		nulls[7] = {false, false, true, true, true, true, true};

		values[0] = CStringGetTextDatum(sets[i].name);
		values[1] = CStringGetTextDatum(sets[i].url);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
}

static Datum
GetEntitiesBody(FunctionCallInfo fcinfo, const char *failmsg)
{
	CiflowConnection *conn = CiflowGetConnection(CiflowTextArg(fcinfo, 0));
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	CiflowConverter ts_conv;
	CiflowConverter jsonb_conv;
	json_t	   *root;
	json_t	   *entities;
	json_t	   *entity;
	CiflowEntityKeys **remember;
	size_t		i;

	InitMaterializedSRF(fcinfo, 0);
	if (conn->flavor != CIFLOW_FLAVOR_CUSTOMER_INSIGHTS)
	{
		PutEntitySets(conn, rsinfo, failmsg);
		return (Datum) 0;
	}
	CiflowConverterInit(&ts_conv, TIMESTAMPTZOID, -1, CurrentMemoryContext);
	CiflowConverterInit(&jsonb_conv, JSONBOID, -1, CurrentMemoryContext);

	root = CallService(conn, CiflowEntitiesUrl(conn, NULL), failmsg, NULL);
	/* One object with an "entities" array; a bare array is accepted too. */
	entities = json_is_array(root) ? root : json_object_get(root, "entities");
	if (!json_is_array(entities))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_JSON_TEXT),
				 errmsg("%s", failmsg),
				 errdetail("The answer has no \"entities\" array.")));

	remember = palloc0(sizeof(CiflowEntityKeys *) * Max(json_array_size(entities), 1));
	json_array_foreach(entities, i, entity)
	{
		Datum		values[7];
		bool		nulls[7];
		const char *qualified = CiflowJsonString(entity, "qualifiedEntityName");
		const char *short_name = CiflowJsonString(entity, "name");
		const char *strings[4];
		int			k;

		if (qualified == NULL)
			qualified = short_name;
		strings[0] = short_name ? short_name : qualified;
		strings[1] = qualified;
		strings[2] = CiflowJsonString(entity, "entityType");
		strings[3] = CiflowJsonString(entity, "dataSourceName");
		for (k = 0; k < 4; k++)
		{
			nulls[k] = (strings[k] == NULL);
			values[k] = nulls[k] ? (Datum) 0 : CStringGetTextDatum(strings[k]);
		}
		values[4] = CiflowConvert(&jsonb_conv, json_object_get(entity, "attributes"), &nulls[4]);
		values[5] = CiflowConvert(&jsonb_conv, json_object_get(entity, "keys"), &nulls[5]);
		values[6] = CiflowConvert(&ts_conv, json_object_get(entity, "refreshTime"), &nulls[6]);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
		remember[i] = CiflowEntityKeysFromE2(entity);
	}
	/* Every entity's keys and types came along: get_item needs no call for them. */
	CiflowEntityKeysRemember(conn->name, remember, (int) json_array_size(entities));
	return (Datum) 0;
}

Datum
ciflow_get_entities(PG_FUNCTION_ARGS)
{
	return RunAction(fcinfo, GetEntitiesBody,
					 psprintf("could not list the entities of connection \"%s\"",
							  text_to_cstring(PG_GETARG_TEXT_PP(0))));
}

/* The rows of one page: exactly one call. */
static json_t *
FetchOnePage(const CiflowConnection *conn, const char *entity, const char *query,
			 const char *failmsg)
{
	json_t	   *page = CallService(conn,
								   CiflowUrlWithQuery(CiflowDataUrl(conn, entity), query),
								   failmsg,
								   "Check the entity's name with ciflow.get_entities().");

	return CiflowPageRows(page, failmsg);
}

static Datum
GetItemsBody(FunctionCallInfo fcinfo, const char *failmsg)
{
	char	   *name = CiflowTextArg(fcinfo, 0);
	char	   *entity = CiflowTextArg(fcinfo, 1);
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	static const char *const options[] = {NULL, NULL, "$filter", "$select", "$orderby",
	"$top", "$skip", "$search", "$expand"};
	CiflowConnection *conn;
	StringInfoData query;
	json_t	   *rows;
	json_t	   *row;
	size_t		i;
	int			arg;

	RequireArg(name, "connection");
	RequireArg(entity, "entity");
	conn = CiflowGetConnection(name);

	initStringInfo(&query);
	for (arg = 2; arg < (int) lengthof(options); arg++)
	{
		char	   *value;

		if (PG_ARGISNULL(arg))
			continue;
		if (strcmp(options[arg], "$top") == 0 || strcmp(options[arg], "$skip") == 0)
		{
			int32		n = PG_GETARG_INT32(arg);

			if (n < 0)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("%s must not be negative", options[arg] + 1)));
			value = psprintf("%d", n);
		}
		else
			value = text_to_cstring(PG_GETARG_TEXT_PP(arg));
		CiflowAppendQuery(&query, options[arg], value);
	}

	InitMaterializedSRF(fcinfo, MAT_SRF_USE_EXPECTED_DESC);
	rows = FetchOnePage(conn, entity, query.data, failmsg);
	json_array_foreach(rows, i, row)
	{
		Datum		value = JsonbPGetDatum(CiflowJsonToJsonb(row));
		bool		isnull = false;

		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, &value, &isnull);
	}
	return (Datum) 0;
}

Datum
ciflow_get_items(PG_FUNCTION_ARGS)
{
	return RunAction(fcinfo, GetItemsBody, ReadFailMessage(fcinfo));
}

/*
 * The entity's metadata, read from the service (one call: E2 for Customer
 * Insights, $metadata for the others) and remembered.
 */
static CiflowEntityKeys *
FetchEntityKeys(const CiflowConnection *conn, const char *entity, const char *failmsg)
{
	CiflowEntityKeys *keys;

	if (conn->flavor == CIFLOW_FLAVOR_CUSTOMER_INSIGHTS)
		keys = CiflowEntityKeysFromShape(entity, CiflowFetchE2Shape(conn, entity, failmsg, NULL));
	else
		keys = CiflowEntityKeysFromCsdl(entity, CiflowFetchCsdlEntity(conn, entity, failmsg, NULL));
	CiflowEntityKeysRemember(conn->name, &keys, 1);
	return keys;
}

/*
 * The Edm type of key_name: what ciflow remembers of the entity, else
 * (nothing remembered, or nothing of that property: the metadata may have
 * changed since) what the service's metadata says now, which costs a call
 * and is remembered.  key_name need not be the key: any property's type
 * is known.  One the metadata does not have is 42703, before the call
 * the service would refuse.
 */
static const char *
KeyType(const CiflowConnection *conn, const char *entity, const char *key_name,
		const char *failmsg, bool *remembered)
{
	CiflowEntityKeys *keys = CiflowEntityKeysLookup(conn->name, entity);
	const char *edm = keys ? CiflowEntityKeysTypeOf(keys, key_name) : NULL;

	*remembered = (edm != NULL);
	if (edm != NULL)
		return edm;
	keys = FetchEntityKeys(conn, entity, failmsg);
	edm = CiflowEntityKeysTypeOf(keys, key_name);
	if (edm == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_COLUMN),
				 errmsg("%s", failmsg),
				 errdetail("The metadata of entity \"%s\" has no property \"%s\".", entity, key_name),
				 errhint("Its key is %s; pass it as key_name.", CiflowEntityKeysList(keys))));
	return edm;
}

/* The request of one row: $filter=<key_name> eq <literal>&$top=1. */
static void
ItemRequest(CiflowRequest *req, const CiflowConnection *conn, const char *entity,
			const char *key_name, const char *literal, const char *failmsg)
{
	StringInfoData query;

	initStringInfo(&query);
	CiflowAppendQuery(&query, "$filter", psprintf("%s eq %s", key_name, literal));
	CiflowAppendQuery(&query, "$top", "1");
	memset(req, 0, sizeof(*req));
	req->conn = conn;
	req->url = CiflowUrlWithQuery(CiflowDataUrl(conn, entity), query.data);
	req->api_call = true;
	req->failmsg = failmsg;
	req->not_found_hint = "Check the entity's name with ciflow.get_entities().";
}

/*
 * get_item: one call when the key's type is remembered (the normal case:
 * any sync, describe_entity or get_entities of the entity, or an earlier
 * get_item, told ciflow), two for an entity ciflow knows nothing of.  The
 * literal is written by type (edm.c) and checked before any call.
 *
 * A remembered type may be out of date.  A 400 to a literal written by
 * one is followed by a fresh read of the metadata; if that gives the key
 * another type the row is asked again with the new literal, else the 400
 * stands.
 */
static Datum
GetItemBody(FunctionCallInfo fcinfo, const char *failmsg)
{
	char	   *name = CiflowTextArg(fcinfo, 0);
	char	   *entity = CiflowTextArg(fcinfo, 1);
	char	   *key_value = CiflowTextArg(fcinfo, 2);
	char	   *key_name = CiflowTextArg(fcinfo, 3);
	CiflowConnection *conn;
	CiflowRequest req;
	CiflowResponse resp;
	const char *edm;
	bool		remembered;
	json_t	   *rows;

	/* Its default is CustomerId; an explicit NULL is a mistake, not "any". */
	RequireArg(key_name, "key_name");
	RequireArg(name, "connection");
	RequireArg(entity, "entity");
	if (!IsODataIdentifier(key_name))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid key_name \"%s\"", key_name),
				 errdetail("key_name is an attribute name: a letter or _, then letters, digits and _, at most 128 characters."),
				 errhint("Use ciflow.get_items with filter => ... for anything else.")));
	conn = CiflowGetConnection(name);

	edm = KeyType(conn, entity, key_name, failmsg, &remembered);
	ItemRequest(&req, conn, entity, key_name, CiflowEdmLiteral(edm, key_value), failmsg);
	req.return_refusal = remembered;
	resp = CiflowRequestPerform(&req);
	if (resp.status >= 400)
	{
		if (resp.status == 400)
		{
			CiflowEntityKeys *fresh = FetchEntityKeys(conn, entity, failmsg);
			const char *now = CiflowEntityKeysTypeOf(fresh, key_name);

			if (now != NULL && pg_strcasecmp(now, edm) != 0)
			{
				ItemRequest(&req, conn, entity, key_name, CiflowEdmLiteral(now, key_value),
							failmsg);
				resp = CiflowRequestPerform(&req);
			}
		}
		if (resp.status >= 400)
			CiflowRaiseRefusal(&req, &resp);
	}
	rows = CiflowPageRows(CiflowParseJson(resp.body, resp.len, failmsg), failmsg);
	pfree(resp.body);
	if (json_array_size(rows) == 0)
	{
		fcinfo->isnull = true;
		return (Datum) 0;
	}
	return JsonbPGetDatum(CiflowJsonToJsonb(json_array_get(rows, 0)));
}

Datum
ciflow_get_item(PG_FUNCTION_ARGS)
{
	/*
	 * No key, no row, and no call; but a NULL key_name is an error even
	 * then (GetItemBody raises it).
	 */
	if (PG_ARGISNULL(2) && !PG_ARGISNULL(3))
		PG_RETURN_NULL();
	return RunAction(fcinfo, GetItemBody, ReadFailMessage(fcinfo));
}

/*
 * describe_entity(connection, entity): one row per property of the entity
 * set's type in $metadata, base types' first: name, Edm type (aliases
 * resolved), the column type a sync gives it, nullability, and its
 * position in the key (NULL when not a key property).  One call; what it
 * read is remembered for get_item.
 */
static Datum
DescribeEntityBody(FunctionCallInfo fcinfo, const char *failmsg)
{
	char	   *name = CiflowTextArg(fcinfo, 0);
	char	   *entity = CiflowTextArg(fcinfo, 1);
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	CiflowConnection *conn;
	CiflowCsdlEntity *shape;
	CiflowEntityKeys *keys;
	int			i;

	RequireArg(name, "connection");
	RequireArg(entity, "entity");
	conn = CiflowGetConnection(name);
	InitMaterializedSRF(fcinfo, MAT_SRF_USE_EXPECTED_DESC);
	shape = CiflowFetchCsdlEntity(conn, entity, failmsg, NULL);
	keys = CiflowEntityKeysFromCsdl(entity, shape);
	CiflowEntityKeysRemember(conn->name, &keys, 1);
	for (i = 0; i < shape->nproperties; i++)
	{
		const CiflowCsdlProperty *p = &shape->properties[i];
		Datum		values[5];
		bool		nulls[5] = {false, false, false, false, true};
		int			k;

		values[0] = CStringGetTextDatum(p->name);
		values[1] = CStringGetTextDatum(p->edm_type);
		values[2] = ObjectIdGetDatum(CiflowEdmTypeOid(p->edm_type));
		values[3] = BoolGetDatum(p->nullable);
		for (k = 0; k < shape->nkeys; k++)
		{
			if (shape->keys[k] == i)
			{
				values[4] = Int32GetDatum(k + 1);
				nulls[4] = false;
			}
		}
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

Datum
ciflow_describe_entity(PG_FUNCTION_ARGS)
{
	return RunAction(fcinfo, DescribeEntityBody, ReadFailMessage(fcinfo));
}
