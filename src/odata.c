/*-------------------------------------------------------------------------
 *
 * odata.c
 *	  Where things are and what answers look like: endpoint URLs for each
 *	  flavour, query strings (the incremental $filter included), and the
 *	  parts of OData pages ciflow reads.
 *
 *	  Pure functions: no I/O, no catalog access.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "ciflow.h"
#include "http.h"
#include "odata.h"

static void
RequireInstance(const CiflowConnection *conn)
{
	if (conn->instance_id == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("connection \"%s\" has no instance_id", conn->name),
				 errhint("Set it with ciflow.alter_connection('%s', instance_id => '...').",
						 conn->name)));
}

/*
 * The OData root: Customer Insights serves OData under .../data/, the
 * other flavours at base_url itself.
 */
static char *
ODataRoot(const CiflowConnection *conn)
{
	if (conn->flavor == CIFLOW_FLAVOR_CUSTOMER_INSIGHTS)
		return CiflowInstanceUrl(conn, "data");
	return pstrdup(conn->base_url);
}

char *
CiflowInstanceUrl(const CiflowConnection *conn, const char *path)
{
	RequireInstance(conn);
	return psprintf("%s/instances/%s/%s", conn->base_url,
					CiflowPathSegment(conn->instance_id, "instance_id"), path);
}

/* Every name in a path is one percent-encoded segment, never "..". */
char *
CiflowDataUrl(const CiflowConnection *conn, const char *entity)
{
	return psprintf("%s/%s", ODataRoot(conn), CiflowPathSegment(entity, "entity"));
}

char *
CiflowEntitiesUrl(const CiflowConnection *conn, const char *entity)
{
	if (conn->flavor != CIFLOW_FLAVOR_CUSTOMER_INSIGHTS)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("connection \"%s\" has no entity metadata", conn->name),
				 errdetail("Entity metadata is read from Customer Insights; flavor \"%s\" has none ciflow can read yet.",
						   conn->flavor == CIFLOW_FLAVOR_DATAVERSE ? "dataverse" : "odata")));
	if (entity == NULL)
		return CiflowInstanceUrl(conn, "manage/entities");
	return CiflowInstanceUrl(conn, psprintf("manage/entities/%s",
											CiflowPathSegment(entity, "entity")));
}

/* The service document is the root itself, with its trailing slash. */
char *
CiflowServiceDocumentUrl(const CiflowConnection *conn)
{
	return psprintf("%s/", ODataRoot(conn));
}

/* "$metadata" is OData's own fixed segment, not a name: it is not encoded. */
char *
CiflowMetadataUrl(const CiflowConnection *conn)
{
	return psprintf("%s/$metadata", ODataRoot(conn));
}

/* Option names go out literally ($top); values are percent-encoded. */
void
CiflowAppendQuery(StringInfo query, const char *name, const char *value)
{
	char	   *encoded = CiflowUrlEncode(value);

	if (query->len > 0)
		appendStringInfoChar(query, '&');
	appendStringInfo(query, "%s=%s", name, encoded);
	pfree(encoded);
}

char *
CiflowUrlWithQuery(const char *url, const char *query)
{
	if (query == NULL || query[0] == '\0')
		return pstrdup(url);
	return psprintf("%s%c%s", url, strchr(url, '?') ? '&' : '?', query);
}

const char *
CiflowPreferHeader(const CiflowConnection *conn, int page_size)
{
	/* Dataverse pages by preference, not by $top/$skip. */
	if (conn->flavor == CIFLOW_FLAVOR_DATAVERSE)
		return psprintf("odata.maxpagesize=%d", page_size);
	return NULL;
}

json_t *
CiflowPageRows(json_t *page, const char *failmsg)
{
	json_t	   *rows = json_is_object(page) ? json_object_get(page, "value") : NULL;

	if (!json_is_array(rows))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_JSON_TEXT),
				 errmsg("%s", failmsg),
				 errdetail("The response has no \"value\" array.")));
	return rows;
}

const char *
CiflowJsonString(json_t *obj, const char *key)
{
	json_t	   *v = json_is_object(obj) ? json_object_get(obj, key) : NULL;

	return json_is_string(v) ? json_string_value(v) : NULL;
}

/* An OData string literal: in single quotes, quotes doubled. */
char *
CiflowODataString(const char *value)
{
	StringInfoData lit;
	const char *p;

	initStringInfo(&lit);
	appendStringInfoChar(&lit, '\'');
	for (p = value; *p; p++)
	{
		if (*p == '\'')
			appendStringInfoChar(&lit, '\'');
		appendStringInfoChar(&lit, *p);
	}
	appendStringInfoChar(&lit, '\'');
	return lit.data;
}

/*
 * $filter of an incremental pull: the user's filter, if any, and
 * "<attr> ge <value>": ge, not gt, so that rows sharing the watermark's
 * instant are read again (and upserted), never missed.  Strings are
 * quoted literals; timestamps, dates and numbers are bare, as OData has
 * them.
 */
char *
CiflowIncrementalFilter(const char *filter, const char *attribute, const char *edm,
						const char *value)
{
	const char *lit = (edm != NULL && pg_strcasecmp(edm, "Edm.String") == 0) ?
		CiflowODataString(value) : value;

	if (filter != NULL && filter[0] != '\0')
		return psprintf("(%s) and %s ge %s", filter, attribute, lit);
	return psprintf("%s ge %s", attribute, lit);
}
