/*-------------------------------------------------------------------------
 *
 * servicemeta.h
 *	  What an OData service says about itself: the entity sets of its
 *	  service document and, from its CSDL $metadata, one entity set's shape.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CIFLOW_SERVICEMETA_H
#define CIFLOW_SERVICEMETA_H

#include "ciflow_json.h"

#include "connection.h"
#include "csdl.h"
#include "request.h"
#include "shape.h"

/* One entity set of the service document. */
typedef struct CiflowEntitySet
{
	const char *name;			/* what sync and get_items take */
	const char *url;			/* the path segment to request */
} CiflowEntitySet;

/*
 * The service document's entity sets (entries whose kind is absent or
 * "EntitySet"; singletons and function imports are not), in its order.
 * One call; two when the service document is not JSON (Atom XML, as SAP
 * servers send): then the entity sets of $metadata's container.
 */
extern CiflowEntitySet *CiflowFetchEntitySets(const CiflowConnection *conn,
											  const char *failmsg, int *nsets);

/*
 * The shape of one entity set, read from $metadata: one call, the
 * document held once (as the response body) and freed before returning.
 */
extern CiflowCsdlEntity *CiflowFetchCsdlEntity(const CiflowConnection *conn,
											   const char *entity_set,
											   const char *failmsg,
											   CiflowCallStats *stats);

/*
 * The shape of one Customer Insights entity, read from its E2 metadata:
 * one call.  42704 when the answer is a list without the entity.
 */
extern CiflowShape *CiflowFetchE2Shape(const CiflowConnection *conn,
									   const char *entity, const char *failmsg,
									   CiflowCallStats *stats);

#endif							/* CIFLOW_SERVICEMETA_H */
