/*-------------------------------------------------------------------------
 *
 * odata.h
 *	  The service's addresses and answers: endpoint URLs per flavour, query
 *	  strings, and reading collection pages and metadata.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CIFLOW_ODATA_H
#define CIFLOW_ODATA_H

#include "ciflow_json.h"

#include "lib/stringinfo.h"
#include "connection.h"

/* The rows of an entity: E4, or the dataverse/odata entity set. */
/*
 * base_url/instances/<instance_id>/<path> of a customer_insights connection;
 * path is ciflow's own (names in it already encoded segments).
 */
extern char *CiflowInstanceUrl(const CiflowConnection *conn, const char *path);

extern char *CiflowDataUrl(const CiflowConnection *conn, const char *entity);

/* E2: all entities (entity NULL) or one entity's metadata. */
extern char *CiflowEntitiesUrl(const CiflowConnection *conn, const char *entity);

/*
 * The OData service document (entity sets) and the CSDL $metadata of a
 * connection: the OData root of its flavour, for every flavour.
 */
extern char *CiflowServiceDocumentUrl(const CiflowConnection *conn);
extern char *CiflowMetadataUrl(const CiflowConnection *conn);

/* Appends "name=value" (value percent-encoded) to a query, with '&' as needed. */
extern void CiflowAppendQuery(StringInfo query, const char *name, const char *value);

/* Joins a URL and a query string with '?' or '&'. */
extern char *CiflowUrlWithQuery(const char *url, const char *query);

/* The Prefer header a page request sends, or NULL. */
extern const char *CiflowPreferHeader(const CiflowConnection *conn, int page_size);

/* A collection page's "value" array; raises 22032 under failmsg when absent. */
extern json_t *CiflowPageRows(json_t *page, const char *failmsg);

/* An OData string literal: in single quotes, quotes doubled. */
extern char *CiflowODataString(const char *value);

/* $filter of an incremental pull: the user's filter and "<attr> ge <value>". */
extern char *CiflowIncrementalFilter(const char *filter, const char *attribute,
									 const char *edm, const char *value);

/* A string member, or NULL when absent, null or not a string. */
extern const char *CiflowJsonString(json_t *obj, const char *key);

#endif							/* CIFLOW_ODATA_H */
