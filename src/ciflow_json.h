/*-------------------------------------------------------------------------
 *
 * ciflow_json.h
 *	  jansson, made to coexist with PostgreSQL's headers: both declare a
 *	  json_object (jansson's constructor, PostgreSQL's SQL function).  ciflow
 *	  never builds JSON with jansson, so jansson's is hidden.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CIFLOW_JSON_H
#define CIFLOW_JSON_H

#define json_object ciflow_jansson_json_object_unused
#include <jansson.h>
#undef json_object

#endif							/* CIFLOW_JSON_H */
