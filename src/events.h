/*-------------------------------------------------------------------------
 *
 * events.h
 *	  ciflow.events: inserting an event exactly once, its NOTIFY, the end
 *	  of a sync as an event, and the retention trim.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CIFLOW_EVENTS_H
#define CIFLOW_EVENTS_H

#include "access/htup.h"
#include "access/tupdesc.h"
#include "lib/stringinfo.h"

#define CIFLOW_EVENT_MAX_FIELDS 16

typedef enum CiflowEventFieldType
{
	CIFLOW_FIELD_STRING,		/* a JSON string (NULL value: null) */
	CIFLOW_FIELD_NUMBER,		/* a JSON number, already valid JSON */
	CIFLOW_FIELD_JSON			/* any JSON text, written as is */
} CiflowEventFieldType;

/* One member of an event's payload. */
typedef struct CiflowEventField
{
	const char *key;
	CiflowEventFieldType type;
	const char *value;			/* NULL = JSON null */
	bool		private;		/* kept in ciflow.events, not in the NOTIFY */
} CiflowEventField;

/* An event about to be recorded. */
typedef struct CiflowEvent
{
	const char *connection;
	const char *kind;
	const char *subject;
	const char *dedupe_key;
	int			nfields;
	CiflowEventField fields[CIFLOW_EVENT_MAX_FIELDS];
} CiflowEvent;

extern void CiflowEventInit(CiflowEvent *ev, const char *connection,
							const char *kind, const char *subject,
							const char *dedupe_key);
extern void CiflowEventAdd(CiflowEvent *ev, const char *key,
						   CiflowEventFieldType type, const char *value);

/*
 * Inserts the event unless its dedupe_key is already there; for a new row,
 * queues its NOTIFY (sent at commit) and returns a copy of the row of
 * ciflow.events (and its descriptor); returns NULL for a duplicate.  Needs
 * a transaction; acts as the catalog's owner (catalog.c).
 */
extern HeapTuple CiflowEventInsert(const CiflowEvent *ev, TupleDesc *desc);

/*
 * The event of a finished sync run (sync_succeeded or sync_failed), in the
 * caller's transaction, from the run's row in ciflow.sync_runs.
 */
extern void CiflowEventRecordSyncEnd(int64 run_id);

/* Appends s to buf as a JSON string, cut to at most max_bytes (-1: whole). */
extern bool CiflowAppendJsonString(StringInfo buf, const char *s, int max_bytes);

#endif							/* CIFLOW_EVENTS_H */
