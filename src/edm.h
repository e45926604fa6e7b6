/*-------------------------------------------------------------------------
 *
 * edm.h
 *	  The Edm type map of the SQL contract (sql-api.md section 3), one table
 *	  for every flavour: which PostgreSQL type an Edm type becomes, and how
 *	  a value of it is written as a literal in a $filter.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CIFLOW_EDM_H
#define CIFLOW_EDM_H

#include "postgres.h"

/*
 * The column type of an Edm type name ("Edm.Int32", case-insensitive).
 * Anything outside the map (complex types, Collection(...), enum types,
 * geography, NULL) is jsonb.
 */
extern Oid	CiflowEdmTypeOid(const char *edm);

/* Whether a value of this Edm type is written as a quoted string literal. */
extern bool CiflowEdmLiteralIsQuoted(const char *edm);

/*
 * The OData literal for value as a value of type edm (a key in $filter):
 * numbers, booleans, GUIDs, dates and times unquoted and checked, so that
 * the value cannot change the filter's meaning; everything else as a
 * string literal with quotes doubled.  22P02 when value is not of the type.
 */
extern char *CiflowEdmLiteral(const char *edm, const char *value);

#endif							/* CIFLOW_EDM_H */
