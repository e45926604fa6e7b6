/*-------------------------------------------------------------------------
 *
 * csdl.c
 *	  The CSDL $metadata reader: the shape (properties, types, nullability,
 *	  key) of one entity set of an OData v4 or Dataverse service.
 *
 *	  The document is hostile input and can be tens of MB (a Dataverse
 *	  org's).  It is read with libxml2's SAX2 push parser, which the server
 *	  already links: a well-kept parser, streaming, and no DOM of the whole
 *	  document is ever built.  The reader keeps only what it needs: the
 *	  schemas' namespaces and aliases, one (name, BaseType) pair per entity
 *	  type, and the properties of the types of the one entity set asked for.
 *	  Since an EntityContainer usually comes after the types it names, the
 *	  document is read twice (it is in memory once, as the response body):
 *	  the first pass finds the entity set's type and every type's BaseType,
 *	  the second collects the properties of that type's BaseType chain.
 *
 *	  Hostile input: no DTD (an internal subset, which is where entity
 *	  declarations, billion laughs and external entities live, is refused
 *	  as soon as the parser reports it), no entity but the five predefined
 *	  ones, no network (XML_PARSE_NONET, and neither XML_PARSE_NOENT nor
 *	  XML_PARSE_DTDLOAD), nesting, names and counts bounded by the limits
 *	  below, and the document's size by ciflow.max_response_size.  libxml2
 *	  allocates with malloc: the parser context is freed on every path,
 *	  errors and cancels included (PG_TRY), and no ereport is raised from
 *	  inside a libxml2 callback: a callback records the problem and stops
 *	  the parser, and the error is raised once libxml2 has returned.
 *
 *	  This file only reads CSDL; it does not fetch it (request.c), decide
 *	  column types (edm.c) or build tables (the sync's shape code).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <libxml/parser.h>
#include <libxml/parserInternals.h>

#include "lib/stringinfo.h"
#include "miscadmin.h"

#include "csdl.h"

#define CSDL_EDM_NS "http://docs.oasis-open.org/odata/ns/edm"

/* Limits: far above any real service, far below what would hurt. */
#define CSDL_MAX_DEPTH 64		/* element nesting */
#define CSDL_MAX_NAME 1024		/* bytes of a name or type attribute */
#define CSDL_MAX_SCHEMAS 1000
#define CSDL_MAX_TYPES 100000	/* entity types in the document */
#define CSDL_MAX_PROPERTIES 1600	/* columns of one table
									 * (MaxHeapAttributeNumber) */
#define CSDL_MAX_CHAIN 32		/* BaseType levels */
#define CSDL_CHUNK (1024 * 1024)	/* bytes fed to the parser at a time */

/* The elements the reader looks at; everything else is skipped. */
typedef enum CsdlElement
{
	EL_OTHER,
	EL_SCHEMA,
	EL_ENTITY_TYPE,
	EL_KEY,
	EL_PROPERTY_REF,
	EL_PROPERTY,
	EL_CONTAINER,
	EL_ENTITY_SET
} CsdlElement;

typedef struct CsdlSchema
{
	char	   *namespace;
	char	   *alias;			/* or NULL */
} CsdlSchema;

/* One entity type as the first pass indexes it. */
typedef struct CsdlTypeIndex
{
	char	   *name;			/* qualified by its schema's namespace */
	char	   *base_type;		/* as written (may use an alias), or NULL */
} CsdlTypeIndex;

/* One entity type of the chain as the second pass collects it. */
typedef struct CsdlTypeShape
{
	bool		found;
	int			nproperties;
	CiflowCsdlProperty *properties;
	int			nkeys;
	char	  **keys;			/* key property names */
} CsdlTypeShape;

typedef struct CsdlState
{
	int			pass;			/* 1: index, 2: collect */
	const char *entity_set;		/* the set asked for */
	xmlParserCtxtPtr ctxt;

	/* the element path */
	int			depth;
	CsdlElement stack[CSDL_MAX_DEPTH + 1];
	int			schema;			/* index of the current Schema, or -1 */
	int			shape;			/* pass 2: chain index of the current type,
								 * or -1 */

	/* pass 1 */
	CsdlSchema *schemas;
	int			nschemas;
	CsdlTypeIndex *types;
	int			ntypes;
	int			maxtypes;
	char	   *set_type;		/* EntitySet/@EntityType as written */
	char	  **sets;			/* every EntitySet/@Name, when listing */
	int			nsets;
	int			maxsets;

	/* pass 2 */
	char	   *chain[CSDL_MAX_CHAIN];	/* qualified; [0] is the set's type */
	int			nchain;
	CsdlTypeShape shapes[CSDL_MAX_CHAIN];

	/* the first problem, raised once libxml2 has returned */
	int			sqlstate;
	char	   *problem;
	char	   *xml_error;		/* libxml2's own message, if any */
} CsdlState;

static void
Stop(CsdlState *st, int sqlstate, const char *problem)
{
	if (st->problem == NULL)
	{
		st->sqlstate = sqlstate;
		st->problem = pstrdup(problem);
	}
	xmlStopParser(st->ctxt);
}

/* An unprefixed attribute's value, copied; NULL when absent or too long. */
static char *
Attribute(CsdlState *st, const xmlChar **attrs, int nattrs, const char *name)
{
	int			i;

	for (i = 0; i < nattrs; i++)
	{
		const xmlChar **a = attrs + i * 5;	/* localname, prefix, URI, value,
											 * end */

		if (a[1] == NULL && strcmp((const char *) a[0], name) == 0)
		{
			size_t		len = a[4] - a[3];

			if (len > CSDL_MAX_NAME)
			{
				Stop(st, ERRCODE_PROGRAM_LIMIT_EXCEEDED,
					 psprintf("An attribute %s is longer than %d bytes.", name, CSDL_MAX_NAME));
				return NULL;
			}
			return pnstrdup((const char *) a[3], len);
		}
	}
	return NULL;
}

static char *
RequiredAttribute(CsdlState *st, const xmlChar **attrs, int nattrs,
				  const char *element, const char *name)
{
	char	   *value = Attribute(st, attrs, nattrs, name);

	if (value == NULL || value[0] == '\0')
		Stop(st, ERRCODE_INVALID_XML_DOCUMENT,
			 psprintf("A %s element has no %s attribute.", element, name));
	return value;
}

/*
 * A qualified name with its schema alias replaced by the namespace
 * ("mscrm.contact" -> "Microsoft.Dynamics.CRM.contact"), inside
 * Collection(...) too.  Valid only once every Schema has been seen, that
 * is after the first pass.
 */
static char *
ResolveName(const CsdlState *st, const char *name)
{
	const char *dot;
	int			i;

	if (strncmp(name, "Collection(", 11) == 0 && name[strlen(name) - 1] == ')')
	{
		char	   *inner = pnstrdup(name + 11, strlen(name) - 12);

		return psprintf("Collection(%s)", ResolveName(st, inner));
	}
	dot = strrchr(name, '.');
	if (dot == NULL)
		return pstrdup(name);
	for (i = 0; i < st->nschemas; i++)
	{
		const char *alias = st->schemas[i].alias;

		if (alias != NULL && strlen(alias) == (size_t) (dot - name) &&
			strncmp(name, alias, dot - name) == 0)
			return psprintf("%s%s", st->schemas[i].namespace, dot);
	}
	return pstrdup(name);
}

static CsdlElement
ParentElement(const CsdlState *st)
{
	return st->depth >= 2 ? st->stack[st->depth - 1] : EL_OTHER;
}

static CsdlElement
ClassifyElement(const CsdlState *st, const char *localname, const char *uri)
{
	CsdlElement parent = ParentElement(st);

	if (uri == NULL || strcmp(uri, CSDL_EDM_NS) != 0)
		return EL_OTHER;
	if (strcmp(localname, "Schema") == 0)
		return EL_SCHEMA;
	if (parent == EL_SCHEMA && strcmp(localname, "EntityType") == 0)
		return EL_ENTITY_TYPE;
	if (parent == EL_SCHEMA && strcmp(localname, "EntityContainer") == 0)
		return EL_CONTAINER;
	if (parent == EL_ENTITY_TYPE && strcmp(localname, "Key") == 0)
		return EL_KEY;
	if (parent == EL_ENTITY_TYPE && strcmp(localname, "Property") == 0)
		return EL_PROPERTY;
	if (parent == EL_KEY && strcmp(localname, "PropertyRef") == 0)
		return EL_PROPERTY_REF;
	if (parent == EL_CONTAINER && strcmp(localname, "EntitySet") == 0)
		return EL_ENTITY_SET;
	return EL_OTHER;
}

static void
StartSchema(CsdlState *st, const xmlChar **attrs, int nattrs)
{
	char	   *ns = RequiredAttribute(st, attrs, nattrs, "Schema", "Namespace");

	if (ns == NULL)
		return;
	if (st->pass == 1)
	{
		if (st->nschemas >= CSDL_MAX_SCHEMAS)
		{
			Stop(st, ERRCODE_PROGRAM_LIMIT_EXCEEDED,
				 psprintf("The document has more than %d schemas.", CSDL_MAX_SCHEMAS));
			return;
		}
		st->schemas[st->nschemas].namespace = ns;
		st->schemas[st->nschemas].alias = Attribute(st, attrs, nattrs, "Alias");
		st->nschemas++;
	}
	st->schema = st->schema + 1;
}

static void
StartEntityType(CsdlState *st, const xmlChar **attrs, int nattrs)
{
	char	   *name = RequiredAttribute(st, attrs, nattrs, "EntityType", "Name");
	char	   *qualified;
	int			i;

	if (name == NULL || st->schema < 0 || st->schema >= st->nschemas)
		return;
	qualified = psprintf("%s.%s", st->schemas[st->schema].namespace, name);
	if (st->pass == 1)
	{
		if (st->ntypes >= CSDL_MAX_TYPES)
		{
			Stop(st, ERRCODE_PROGRAM_LIMIT_EXCEEDED,
				 psprintf("The document has more than %d entity types.", CSDL_MAX_TYPES));
			return;
		}
		if (st->ntypes >= st->maxtypes)
		{
			st->maxtypes *= 2;
			st->types = repalloc(st->types, st->maxtypes * sizeof(CsdlTypeIndex));
		}
		st->types[st->ntypes].name = qualified;
		st->types[st->ntypes].base_type = Attribute(st, attrs, nattrs, "BaseType");
		st->ntypes++;
		return;
	}
	for (i = 0; i < st->nchain; i++)
	{
		if (strcmp(st->chain[i], qualified) == 0 && !st->shapes[i].found)
		{
			st->shape = i;
			st->shapes[i].found = true;
			st->shapes[i].properties = palloc(sizeof(CiflowCsdlProperty) * 16);
			st->shapes[i].keys = palloc(sizeof(char *) * 4);
			return;
		}
	}
}

/* Appends to a palloc'd array that doubles at powers of two from min. */
static void *
Grow(void *array, int n, int min, Size elem)
{
	if (n >= min && (n & (n - 1)) == 0)
		return repalloc(array, elem * n * 2);
	return array;
}

static void
StartProperty(CsdlState *st, const xmlChar **attrs, int nattrs)
{
	CsdlTypeShape *shape = &st->shapes[st->shape];
	char	   *name = RequiredAttribute(st, attrs, nattrs, "Property", "Name");
	char	   *type = RequiredAttribute(st, attrs, nattrs, "Property", "Type");
	char	   *nullable = Attribute(st, attrs, nattrs, "Nullable");
	CiflowCsdlProperty *p;

	if (name == NULL || type == NULL)
		return;
	if (shape->nproperties >= CSDL_MAX_PROPERTIES)
	{
		Stop(st, ERRCODE_TOO_MANY_COLUMNS,
			 psprintf("Entity type %s has more than %d properties.",
					  st->chain[st->shape], CSDL_MAX_PROPERTIES));
		return;
	}
	shape->properties = Grow(shape->properties, shape->nproperties, 16,
							 sizeof(CiflowCsdlProperty));
	p = &shape->properties[shape->nproperties++];
	p->name = name;
	p->edm_type = ResolveName(st, type);
	/* CSDL's default is nullable; only "false" says otherwise. */
	p->nullable = nullable == NULL || strcmp(nullable, "false") != 0;
}

static void
StartPropertyRef(CsdlState *st, const xmlChar **attrs, int nattrs)
{
	CsdlTypeShape *shape = &st->shapes[st->shape];
	char	   *name = RequiredAttribute(st, attrs, nattrs, "PropertyRef", "Name");

	if (name == NULL)
		return;
	if (shape->nkeys >= CSDL_MAX_PROPERTIES)
	{
		Stop(st, ERRCODE_PROGRAM_LIMIT_EXCEEDED, "A key has too many properties.");
		return;
	}
	shape->keys = Grow(shape->keys, shape->nkeys, 4, sizeof(char *));
	shape->keys[shape->nkeys++] = name;
}

static void
StartEntitySet(CsdlState *st, const xmlChar **attrs, int nattrs)
{
	char	   *name = RequiredAttribute(st, attrs, nattrs, "EntitySet", "Name");

	if (name == NULL)
		return;
	if (st->entity_set == NULL)
	{
		if (st->nsets >= CSDL_MAX_TYPES)
		{
			Stop(st, ERRCODE_PROGRAM_LIMIT_EXCEEDED,
				 psprintf("The document has more than %d entity sets.", CSDL_MAX_TYPES));
			return;
		}
		st->sets = Grow(st->sets, st->nsets, 64, sizeof(char *));
		st->sets[st->nsets++] = name;
	}
	else if (strcmp(name, st->entity_set) == 0 && st->set_type == NULL)
		st->set_type = RequiredAttribute(st, attrs, nattrs, "EntitySet", "EntityType");
}

static void
OnStartElement(void *ctx, const xmlChar *localname,
			   const xmlChar *prefix pg_attribute_unused(), const xmlChar *uri,
			   int nb_namespaces pg_attribute_unused(),
			   const xmlChar **namespaces pg_attribute_unused(),
			   int nb_attributes, int nb_defaulted pg_attribute_unused(),
			   const xmlChar **attributes)
{
	CsdlState  *st = (CsdlState *) ctx;
	CsdlElement el;

	if (st->problem != NULL)
		return;
	if (st->depth >= CSDL_MAX_DEPTH)
	{
		Stop(st, ERRCODE_PROGRAM_LIMIT_EXCEEDED,
			 psprintf("Elements are nested more than %d deep.", CSDL_MAX_DEPTH));
		return;
	}
	st->depth++;
	el = ClassifyElement(st, (const char *) localname, (const char *) uri);
	st->stack[st->depth] = el;

	switch (el)
	{
		case EL_SCHEMA:
			StartSchema(st, attributes, nb_attributes);
			break;
		case EL_ENTITY_TYPE:
			StartEntityType(st, attributes, nb_attributes);
			break;
		case EL_PROPERTY:
			if (st->shape >= 0)
				StartProperty(st, attributes, nb_attributes);
			break;
		case EL_PROPERTY_REF:
			if (st->shape >= 0)
				StartPropertyRef(st, attributes, nb_attributes);
			break;
		case EL_ENTITY_SET:
			if (st->pass == 1)
				StartEntitySet(st, attributes, nb_attributes);
			break;
		default:
			break;
	}
}

static void
OnEndElement(void *ctx, const xmlChar *localname pg_attribute_unused(),
			 const xmlChar *prefix pg_attribute_unused(),
			 const xmlChar *uri pg_attribute_unused())
{
	CsdlState  *st = (CsdlState *) ctx;

	if (st->problem != NULL || st->depth <= 0)
		return;
	if (st->stack[st->depth] == EL_ENTITY_TYPE)
		st->shape = -1;
	st->depth--;
}

/* A DOCTYPE: refused before its internal subset is read. */
static void
OnInternalSubset(void *ctx, const xmlChar *name pg_attribute_unused(),
				 const xmlChar *external_id pg_attribute_unused(),
				 const xmlChar *system_id pg_attribute_unused())
{
	Stop((CsdlState *) ctx, ERRCODE_INVALID_XML_DOCUMENT,
		 "The document has a DTD (<!DOCTYPE>); CSDL never needs one, and ciflow refuses them.");
}

static void
OnEntityDecl(void *ctx, const xmlChar *name pg_attribute_unused(),
			 int type pg_attribute_unused(),
			 const xmlChar *public_id pg_attribute_unused(),
			 const xmlChar *system_id pg_attribute_unused(),
			 xmlChar *content pg_attribute_unused())
{
	Stop((CsdlState *) ctx, ERRCODE_INVALID_XML_DOCUMENT,
		 "The document declares entities; ciflow refuses them.");
}

/* Only the predefined entities exist (the parser resolves those itself). */
static xmlEntityPtr
OnGetEntity(void *ctx, const xmlChar *name)
{
	Stop((CsdlState *) ctx, ERRCODE_INVALID_XML_DOCUMENT,
		 psprintf("The document refers to entity &%s;, which CSDL does not define.",
				  (const char *) name));
	return NULL;
}

/* Nothing is ever fetched: no external subset, no external entity. */
static xmlParserInputPtr
OnResolveEntity(void *ctx, const xmlChar *public_id pg_attribute_unused(),
				const xmlChar *system_id pg_attribute_unused())
{
	Stop((CsdlState *) ctx, ERRCODE_INVALID_XML_DOCUMENT,
		 "The document refers to an external resource; ciflow never fetches one.");
	return NULL;
}

/* libxml2's own words for the first error, kept for the DETAIL. */
static void
OnStructuredError(void *ctx, xmlErrorPtr error)
{
	CsdlState  *st = (CsdlState *) ctx;

	if (st->xml_error == NULL && error != NULL && error->message != NULL &&
		error->level >= XML_ERR_ERROR)
	{
		st->xml_error = psprintf("line %d: %.*s", error->line,
								 (int) strcspn(error->message, "\n"),
								 error->message);
	}
}

static void
InitSax(xmlSAXHandler *sax)
{
	memset(sax, 0, sizeof(*sax));
	sax->initialized = XML_SAX2_MAGIC;
	sax->startElementNs = OnStartElement;
	sax->endElementNs = OnEndElement;
	sax->internalSubset = OnInternalSubset;
	sax->externalSubset = OnInternalSubset;
	sax->entityDecl = OnEntityDecl;
	sax->getEntity = OnGetEntity;
	sax->getParameterEntity = OnGetEntity;
	sax->resolveEntity = OnResolveEntity;
	sax->serror = OnStructuredError;
}

/*
 * Feeds the whole document through a fresh push parser, a chunk at a
 * time so that a cancel is seen between chunks.  The parser context is
 * malloc'd by libxml2 and freed here on every path.
 */
static void
RunPass(CsdlState *st, const char *doc, size_t len, const char *failmsg)
{
	xmlSAXHandler sax;
	xmlParserCtxtPtr volatile ctxt = NULL;
	bool		well_formed = false;

	xmlInitParser();
	InitSax(&sax);
	st->depth = 0;
	st->schema = -1;
	st->shape = -1;

	PG_TRY();
	{
		size_t		off = 0;
		int			rc = 0;

		ctxt = xmlCreatePushParserCtxt(&sax, st, NULL, 0, NULL);
		if (ctxt == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY),
					 errmsg("%s", failmsg),
					 errdetail("Could not create an XML parser.")));
		st->ctxt = ctxt;
		/* No network, no entity substitution, no DTD loading, no HUGE. */
		(void) xmlCtxtUseOptions(ctxt, XML_PARSE_NONET);

		while (st->problem == NULL && rc == 0)
		{
			size_t		n = Min(len - off, (size_t) CSDL_CHUNK);
			bool		last = (off + n == len);

			CHECK_FOR_INTERRUPTS();
			rc = xmlParseChunk(ctxt, doc + off, (int) n, last ? 1 : 0);
			off += n;
			if (last)
				break;
		}
		well_formed = (rc == 0 && ctxt->wellFormed);
	}
	PG_CATCH();
	{
		if (ctxt != NULL)
			xmlFreeParserCtxt(ctxt);
		st->ctxt = NULL;
		PG_RE_THROW();
	}
	PG_END_TRY();
	xmlFreeParserCtxt(ctxt);
	st->ctxt = NULL;

	if (st->problem != NULL)
		ereport(ERROR,
				(errcode(st->sqlstate),
				 errmsg("%s", failmsg),
				 errdetail("$metadata: %s", st->problem),
				 errhint("The service's $metadata must be a CSDL XML document (OData 4.0).")));
	if (!well_formed)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_XML_DOCUMENT),
				 errmsg("%s", failmsg),
				 errdetail("$metadata is not well-formed XML: %s",
						   st->xml_error ? st->xml_error : "the document ends early"),
				 errhint("Check that base_url points at the service's OData root.")));
}

static int
FindType(const CsdlState *st, const char *qualified)
{
	int			i;

	for (i = 0; i < st->ntypes; i++)
	{
		if (strcmp(st->types[i].name, qualified) == 0)
			return i;
	}
	return -1;
}

static void
NotInDocument(const char *failmsg, const char *what, const char *hint)
{
	ereport(ERROR,
			(errcode(ERRCODE_UNDEFINED_OBJECT),
			 errmsg("%s", failmsg),
			 errdetail("$metadata has no %s.", what),
			 hint ? errhint("%s", hint) : 0));
}

/* After the first pass: the set's type and its BaseType chain. */
static void
BuildChain(CsdlState *st, const char *failmsg)
{
	char	   *name;

	if (st->nschemas == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_XML_DOCUMENT),
				 errmsg("%s", failmsg),
				 errdetail("$metadata has no OData 4.0 Schema element (namespace %s).", CSDL_EDM_NS),
				 errhint("ciflow reads OData version 4 services; OData 2 and 3 metadata is not supported.")));
	if (st->set_type == NULL)
		NotInDocument(failmsg, psprintf("entity set \"%s\"", st->entity_set),
					  "Entity set names are case-sensitive; ciflow.get_entities() lists them.");

	name = ResolveName(st, st->set_type);
	while (name != NULL)
	{
		int			t = FindType(st, name);
		int			i;

		if (t < 0)
			NotInDocument(failmsg, psprintf("entity type \"%s\"", name),
						  "Types in documents that $metadata only references are not read.");
		for (i = 0; i < st->nchain; i++)
		{
			if (strcmp(st->chain[i], name) == 0)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_XML_DOCUMENT),
						 errmsg("%s", failmsg),
						 errdetail("$metadata: the BaseType chain of %s loops at %s.",
								   st->chain[0], name)));
		}
		if (st->nchain >= CSDL_MAX_CHAIN)
			ereport(ERROR,
					(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
					 errmsg("%s", failmsg),
					 errdetail("$metadata: the BaseType chain of %s is longer than %d.",
							   st->chain[0], CSDL_MAX_CHAIN)));
		st->chain[st->nchain++] = name;
		name = st->types[t].base_type ? ResolveName(st, st->types[t].base_type) : NULL;
	}
}

/* After the second pass: base types' properties first, and the key. */
static CiflowCsdlEntity *
Assemble(CsdlState *st, const char *failmsg)
{
	CiflowCsdlEntity *e = palloc0(sizeof(CiflowCsdlEntity));
	const CsdlTypeShape *keyed = NULL;
	int			total = 0;
	int			i;
	int			k;

	for (i = 0; i < st->nchain; i++)
		total += st->shapes[i].nproperties;
	if (total > CSDL_MAX_PROPERTIES)
		ereport(ERROR,
				(errcode(ERRCODE_TOO_MANY_COLUMNS),
				 errmsg("%s", failmsg),
				 errdetail("Entity type %s has %d properties; a table has at most %d columns.",
						   st->chain[0], total, CSDL_MAX_PROPERTIES)));

	e->entity_set = pstrdup(st->entity_set);
	e->entity_type = st->chain[0];
	e->properties = palloc(sizeof(CiflowCsdlProperty) * Max(total, 1));
	for (i = st->nchain - 1; i >= 0; i--)
	{
		const CsdlTypeShape *s = &st->shapes[i];

		for (k = 0; k < s->nproperties; k++)
		{
			if (CiflowCsdlFindProperty(e, s->properties[k].name) >= 0)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_XML_DOCUMENT),
						 errmsg("%s", failmsg),
						 errdetail("$metadata: property %s of %s is declared twice in its BaseType chain.",
								   s->properties[k].name, st->chain[0])));
			e->properties[e->nproperties++] = s->properties[k];
		}
		/* The key is declared once, on the root-most type that has one. */
		if (keyed == NULL && s->nkeys > 0)
			keyed = s;
	}
	if (keyed == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_XML_DOCUMENT),
				 errmsg("%s", failmsg),
				 errdetail("$metadata: entity type %s has no key in its BaseType chain.",
						   st->chain[0])));
	e->nkeys = keyed->nkeys;
	e->keys = palloc(sizeof(int) * keyed->nkeys);
	for (k = 0; k < keyed->nkeys; k++)
	{
		int			p = CiflowCsdlFindProperty(e, keyed->keys[k]);

		if (p < 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_XML_DOCUMENT),
					 errmsg("%s", failmsg),
					 errdetail("$metadata: key property %s of %s is not one of its properties.",
							   keyed->keys[k], st->chain[0]),
					 errhint("Keys on members of complex properties are not supported.")));
		/* A key is never null, whatever Nullable says. */
		e->properties[p].nullable = false;
		e->keys[k] = p;
	}
	return e;
}

/* State for a first pass over doc: the index, and entity_set's type. */
static CsdlState *
IndexDocument(const char *doc, size_t len, const char *entity_set, const char *failmsg)
{
	CsdlState  *st = palloc0(sizeof(CsdlState));

	if (len > (size_t) PG_INT32_MAX)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("%s", failmsg),
				 errdetail("$metadata is larger than 2 GB.")));
	st->entity_set = entity_set;
	st->schemas = palloc(sizeof(CsdlSchema) * CSDL_MAX_SCHEMAS);
	st->maxtypes = 64;
	st->types = palloc(sizeof(CsdlTypeIndex) * st->maxtypes);
	st->sets = palloc(sizeof(char *) * 64);

	st->pass = 1;
	RunPass(st, doc, len, failmsg);
	return st;
}

char	  **
CiflowCsdlEntitySets(const char *doc, size_t len, const char *failmsg, int *nsets)
{
	CsdlState  *st = IndexDocument(doc, len, NULL, failmsg);

	*nsets = st->nsets;
	return st->sets;
}

CiflowCsdlEntity *
CiflowCsdlReadEntity(const char *doc, size_t len, const char *entity_set,
					 const char *failmsg)
{
	CsdlState  *st = IndexDocument(doc, len, entity_set, failmsg);
	int			i;

	BuildChain(st, failmsg);

	st->pass = 2;
	RunPass(st, doc, len, failmsg);
	for (i = 0; i < st->nchain; i++)
	{
		if (!st->shapes[i].found)
			NotInDocument(failmsg, psprintf("entity type \"%s\"", st->chain[i]), NULL);
	}
	return Assemble(st, failmsg);
}

int
CiflowCsdlFindProperty(const CiflowCsdlEntity *entity, const char *name)
{
	int			i;

	for (i = 0; i < entity->nproperties; i++)
	{
		if (strcmp(entity->properties[i].name, name) == 0)
			return i;
	}
	return -1;
}
