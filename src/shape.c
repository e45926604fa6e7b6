/*-------------------------------------------------------------------------
 *
 * shape.c
 *	  The entity as a table: snake_case names (unique, < NAMEDATALEN bytes),
 *	  column types from the Edm types of section 3 of the SQL contract (the
 *	  one map of edm.c, for every flavour), the key, the incremental
 *	  attribute and refreshTime, all from the entity's metadata: E2 for
 *	  Customer Insights, the CSDL $metadata of an entity set (csdl.c) for
 *	  OData and Dataverse.
 *
 *	  Pure functions of the metadata: this file never touches a table,
 *	  ciflow's catalog or the network.  target.c turns a shape into DDL.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "lib/stringinfo.h"
#include "utils/builtins.h"

#include "edm.h"
#include "odata.h"
#include "shape.h"

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

/*
 * What an incremental run needs: the column of incrementalAttribute (an
 * attribute the entity does not list is as good as none) and refreshTime,
 * kept verbatim so that comparing two of them needs no parsing.
 */
static void
ShapeIncremental(CiflowShape *shape, json_t *entity)
{
	const char *attr = CiflowJsonString(entity, "incrementalAttribute");
	const char *refreshed = CiflowJsonString(entity, "refreshTime");
	int			c;

	shape->incremental = -1;
	for (c = 0; attr != NULL && c < shape->ncolumns; c++)
	{
		if (strcmp(shape->columns[c].remote_name, attr) == 0)
			shape->incremental = c;
	}
	shape->refresh_time = refreshed ? pstrdup(refreshed) : NULL;
}

/*
 * Appends the column of one attribute: its original name as the remote
 * name, its snake_case as the column's, its type from the Edm map.
 */
static void
AddColumn(CiflowShape *shape, const char *remote_name, const char *edm)
{
	CiflowColumn *col = &shape->columns[shape->ncolumns];
	char	   *base;
	int			suffix = 1;
	int			c;

	col->remote_name = pstrdup(remote_name);
	col->edm_type = pstrdup(edm ? edm : "(none)");
	col->typid = CiflowEdmTypeOid(edm);
	col->selected = true;

	/* Two attributes may fold to one name (Name, name): number them. */
	base = CiflowSnakeCase(remote_name);
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
		const char *aname = CiflowJsonString(attr, "name");

		if (aname == NULL)
			MetadataError(failmsg, psprintf("attribute %zu has no name.", i + 1));
		AddColumn(shape, aname, CiflowJsonString(attr, "dataType"));
	}
	ShapeKeys(shape, json_object_get(entity, "keys"), failmsg);
	ShapeIncremental(shape, entity);
	return shape;
}

/*
 * The shape of an OData or Dataverse entity set from its CSDL entity:
 * properties in document order (base types' first), the key of the
 * metadata.  Such a set may be filtered and ordered like a Customer
 * Insights system entity; it has no incrementalAttribute and no
 * refreshTime (Dataverse's incremental runs use change tracking instead).
 */
CiflowShape *
CiflowShapeFromCsdl(const CiflowCsdlEntity *entity, const char *failmsg)
{
	CiflowShape *shape = palloc0(sizeof(CiflowShape));
	int			i;

	if (entity->nproperties == 0)
		MetadataError(failmsg, "its entity type has no properties.");
	shape->entity = pstrdup(entity->entity_set);
	shape->is_system = true;
	shape->incremental = -1;
	shape->columns = palloc0(sizeof(CiflowColumn) * entity->nproperties);
	for (i = 0; i < entity->nproperties; i++)
		AddColumn(shape, entity->properties[i].name, entity->properties[i].edm_type);
	shape->keys = palloc(sizeof(int) * Max(entity->nkeys, 1));
	for (i = 0; i < entity->nkeys; i++)
	{
		/* Columns are the properties, one for one, in the same order. */
		shape->columns[entity->keys[i]].is_key = true;
		shape->keys[shape->nkeys++] = entity->keys[i];
	}
	return shape;
}

void
CiflowAppendColumns(StringInfo buf, const CiflowShape *shape, bool keys_only,
					const char *prefix)
{
	int			n = keys_only ? shape->nkeys : shape->ncolumns;
	int			i;

	int			written = 0;

	for (i = 0; i < n; i++)
	{
		const CiflowColumn *col = &shape->columns[keys_only ? shape->keys[i] : i];

		if (!col->selected)
			continue;
		appendStringInfo(buf, "%s%s%s", written++ ? ", " : "", prefix,
						 quote_identifier(col->name));
	}
}

void
CiflowShapeSelect(CiflowShape *shape, const char *fields)
{
	StringInfoData padded;
	const char *p;
	int			c;

	if (fields == NULL)
		return;
	/* ",A,B," without blanks: each name is then found as ",name,". */
	initStringInfo(&padded);
	appendStringInfoChar(&padded, ',');
	for (p = fields; *p; p++)
	{
		if (*p != ' ')
			appendStringInfoChar(&padded, *p);
	}
	appendStringInfoChar(&padded, ',');
	for (c = 0; c < shape->ncolumns; c++)
	{
		CiflowColumn *col = &shape->columns[c];

		col->selected = col->is_key ||
			strstr(padded.data, psprintf(",%s,", col->remote_name)) != NULL;
	}
}
