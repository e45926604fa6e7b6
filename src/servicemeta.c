/*-------------------------------------------------------------------------
 *
 * servicemeta.c
 *	  Fetching what an OData service says about itself (A.7): its service
 *	  document (the entity sets, for get_entities) and its CSDL $metadata
 *	  (one entity set's properties, types and key, for get_item and sync),
 *	  for every flavour, since Customer Insights serves both as well; and
 *	  Customer Insights' own entity metadata (E2).
 *
 *	  The calls go through request.c like every other; the XML is read by
 *	  csdl.c.  Nothing here writes anything.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "ciflow.h"
#include "odata.h"
#include "servicemeta.h"

static CiflowResponse
FetchMetadata(const CiflowConnection *conn, const char *failmsg, CiflowCallStats *stats)
{
	CiflowRequest req;

	memset(&req, 0, sizeof(req));
	req.conn = conn;
	req.url = CiflowMetadataUrl(conn);
	req.api_call = true;
	req.accept = "application/xml";
	req.failmsg = failmsg;
	req.not_found_hint = "base_url must be the service's OData root, where its $metadata is.";
	req.stats = stats;
	return CiflowRequestPerform(&req);
}

/*
 * Some servers (SAP's among them) answer the service document in Atom XML
 * whatever Accept says; their entity sets are then those of $metadata's
 * entity container.
 */
static CiflowEntitySet *
EntitySetsFromMetadata(const CiflowConnection *conn, const char *failmsg, int *nsets)
{
	CiflowResponse resp = FetchMetadata(conn, failmsg, NULL);
	char	  **names = CiflowCsdlEntitySets(resp.body, resp.len, failmsg, nsets);
	CiflowEntitySet *sets = palloc0(sizeof(CiflowEntitySet) * Max(*nsets, 1));
	int			i;

	pfree(resp.body);
	for (i = 0; i < *nsets; i++)
	{
		sets[i].name = names[i];
		sets[i].url = names[i];
	}
	return sets;
}

CiflowEntitySet *
CiflowFetchEntitySets(const CiflowConnection *conn, const char *failmsg, int *nsets)
{
	CiflowRequest req;
	CiflowResponse resp;
	json_t	   *root;
	json_t	   *entries;
	json_t	   *entry;
	CiflowEntitySet *sets;
	size_t		i;
	size_t		lead;
	int			n = 0;

	memset(&req, 0, sizeof(req));
	req.conn = conn;
	req.url = CiflowServiceDocumentUrl(conn);
	req.api_call = true;
	req.failmsg = failmsg;
	req.not_found_hint = "base_url must be the service's OData root, where its service document is.";
	resp = CiflowRequestPerform(&req);
	lead = strspn(resp.body, " \t\r\n");
	if (lead < resp.len && resp.body[lead] == '<')
	{
		pfree(resp.body);
		return EntitySetsFromMetadata(conn, failmsg, nsets);
	}
	root = CiflowParseJson(resp.body, resp.len, failmsg);
	entries = CiflowPageRows(root, failmsg);

	sets = palloc0(sizeof(CiflowEntitySet) * Max(json_array_size(entries), 1));
	json_array_foreach(entries, i, entry)
	{
		const char *kind = CiflowJsonString(entry, "kind");
		const char *name = CiflowJsonString(entry, "name");
		const char *url = CiflowJsonString(entry, "url");

		if (kind != NULL && strcmp(kind, "EntitySet") != 0)
			continue;
		if (name == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_JSON_TEXT),
					 errmsg("%s", failmsg),
					 errdetail("Entry %zu of the service document has no \"name\".", i)));
		sets[n].name = name;
		sets[n].url = url ? url : name;
		n++;
	}
	*nsets = n;
	return sets;
}

CiflowCsdlEntity *
CiflowFetchCsdlEntity(const CiflowConnection *conn, const char *entity_set,
					  const char *failmsg, CiflowCallStats *stats)
{
	CiflowResponse resp = FetchMetadata(conn, failmsg, stats);
	CiflowCsdlEntity *entity;

	entity = CiflowCsdlReadEntity(resp.body, resp.len, entity_set, failmsg);
	pfree(resp.body);
	return entity;
}

/* E2 for one entity; the answer may also be a list. */
CiflowShape *
CiflowFetchE2Shape(const CiflowConnection *conn, const char *entity, const char *failmsg,
				   CiflowCallStats *stats)
{
	CiflowRequest req;
	json_t	   *meta;
	json_t	   *list;

	memset(&req, 0, sizeof(req));
	req.conn = conn;
	req.url = CiflowEntitiesUrl(conn, entity);
	req.api_call = true;
	req.failmsg = failmsg;
	req.not_found_hint = "Check the entity's name with ciflow.get_entities().";
	req.stats = stats;
	meta = CiflowRequestJson(&req);

	list = json_object_get(meta, "entities");
	if (json_is_array(list))
	{
		json_t	   *e;
		size_t		i;

		json_array_foreach(list, i, e)
		{
			const char *name = CiflowJsonString(e, "qualifiedEntityName");

			if (name && strcmp(name, entity) == 0)
				return CiflowShapeFromMetadata(e, failmsg);
		}
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("%s", failmsg),
				 errdetail("The service's metadata does not list entity \"%s\".", entity)));
	}
	return CiflowShapeFromMetadata(meta, failmsg);
}
