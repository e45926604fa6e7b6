/*-------------------------------------------------------------------------
 *
 * csdl.h
 *	  The CSDL $metadata reader (OData 4.0 part 3): the shape of one entity
 *	  set of an OData or Dataverse service, read from hostile XML.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CIFLOW_CSDL_H
#define CIFLOW_CSDL_H

#include "postgres.h"

typedef struct CiflowCsdlProperty
{
	char	   *name;
	/*
	 * The type as the document names it, with aliases replaced by their
	 * namespaces: "Edm.Int32", "Microsoft.Dynamics.CRM.Address",
	 * "Collection(Edm.String)".  CiflowEdmTypeOid maps it.
	 */
	char	   *edm_type;
	bool		nullable;
} CiflowCsdlProperty;

typedef struct CiflowCsdlEntity
{
	char	   *entity_set;		/* EntitySet/@Name */
	char	   *entity_type;	/* its EntityType, namespace-qualified */
	int			nproperties;
	CiflowCsdlProperty *properties; /* base types' first, document order */
	int			nkeys;
	int		   *keys;			/* indexes into properties, in Key order */
} CiflowCsdlEntity;

/*
 * Reads the shape of entity_set from a CSDL XML document of len bytes.
 * Errors: 2200M for a document that is not CSDL or not well-formed, or
 * that has a DTD or entity declarations; 54000 for a document that
 * exceeds the reader's limits (nesting, names, counts); 42704 when the
 * entity set or one of its types is not in the document.  Every message
 * is under failmsg.
 */
extern CiflowCsdlEntity *CiflowCsdlReadEntity(const char *doc, size_t len,
											  const char *entity_set,
											  const char *failmsg);

/*
 * Every EntitySet/@Name of the document's entity containers, in document
 * order (for services whose service document is not JSON).  Same errors.
 */
extern char **CiflowCsdlEntitySets(const char *doc, size_t len,
								   const char *failmsg, int *nsets);

/* The index of a property by name (case-sensitive, as OData is), or -1. */
extern int	CiflowCsdlFindProperty(const CiflowCsdlEntity *entity, const char *name);

#endif							/* CIFLOW_CSDL_H */
