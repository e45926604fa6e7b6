/*-------------------------------------------------------------------------
 *
 * entitykeys.h
 *	  What ciflow remembers of an entity's metadata between calls: its key
 *	  and the Edm types of its properties (ciflow.entity_keys), so that
 *	  get_item can write its key's literal by type in one call.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CIFLOW_ENTITYKEYS_H
#define CIFLOW_ENTITYKEYS_H

#include "ciflow_json.h"
#include "csdl.h"
#include "shape.h"

typedef struct CiflowEntityKeys
{
	char	   *entity;			/* the name get_item and sync take */
	int			nkeys;
	char	  **key_names;		/* the primary key, in key order */
	char	  **key_types;
	int			nproperties;
	char	  **property_names; /* every property, keys included */
	char	  **property_types;
} CiflowEntityKeys;

/* From the metadata a sync reads (E2 or CSDL, as a shape). */
extern CiflowEntityKeys *CiflowEntityKeysFromShape(const char *entity,
												   const CiflowShape *shape);

/* From one entity set of $metadata. */
extern CiflowEntityKeys *CiflowEntityKeysFromCsdl(const char *entity,
												  const CiflowCsdlEntity *csdl);

/*
 * From one entity of an E2 answer, or NULL when it lacks a name, its
 * attributes or a key ciflow can place among them.
 */
extern CiflowEntityKeys *CiflowEntityKeysFromE2(json_t *entity);

/* The Edm type of a property, or NULL when the metadata has no such property. */
extern const char *CiflowEntityKeysTypeOf(const CiflowEntityKeys *keys,
										  const char *property);

/* "A, B": the key's property names, for messages. */
extern char *CiflowEntityKeysList(const CiflowEntityKeys *keys);

/*
 * The remembered metadata of an entity of a connection, or NULL when there
 * is none (or ciflow.entity_keys does not exist yet: a library newer than
 * the database's extension).  A relation scan: nothing of the caller's runs.
 */
extern CiflowEntityKeys *CiflowEntityKeysLookup(const char *connection,
												const char *entity);

/*
 * Remembers what n entities' metadata said, replacing what was known.  A
 * cache: it never fails its caller.  Nothing is written in a read-only
 * transaction or during recovery; any other error (a lock wait longer
 * than a moment, a connection dropped meanwhile) is rolled back in a
 * subtransaction of its own and forgotten, except a cancel or shutdown.
 */
extern void CiflowEntityKeysRemember(const char *connection,
									 CiflowEntityKeys *const *keys, int n);

/*
 * Forgets everything remembered for a connection (its settings changed:
 * it may now point at another service).  Runs in the caller's transaction
 * and raises errors like any write of ciflow's.
 */
extern void CiflowEntityKeysForget(const char *connection);

#endif							/* CIFLOW_ENTITYKEYS_H */
