/*-------------------------------------------------------------------------
 *
 * events.c
 *	  The event log, ciflow.events: each event is inserted at most once
 *	  (a deterministic dedupe_key with a unique index, ON CONFLICT DO
 *	  NOTHING), and only an inserted row is announced with pg_notify on
 *	  ciflow_events and ciflow_<kind>, so that the announcement is sent at
 *	  commit and never for a row another pass or session already recorded.
 *	  The notification is a compact JSON object that always fits the
 *	  8000-byte limit of NOTIFY; the table keeps the whole payload.  Also:
 *	  the end of a sync as an event, and the retention trim.
 *
 *	  Every statement goes through catalog.c.  This file neither calls the
 *	  service nor starts or ends transactions; it does not decide when a
 *	  remote change is an event (monitor.c does).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/timestamp.h"

#include "catalog.h"
#include "ciflow.h"
#include "delivery.h"
#include "events.h"
#include "launcher.h"

CIFLOW_SQL_FUNCTION(ciflow_trim_events);

/*
 * NOTIFY refuses payloads of 8000 bytes or more; B.1 asks for at most
 * 7,900, which leaves room for the channel name in the queue entry.
 */
#define NOTIFY_PAYLOAD_LIMIT 7900

/* Rows deleted per statement by ciflow.trim_events. */
#define TRIM_BATCH 10000

static CiflowCatalogStatement insert_event = {
	.sql = "INSERT INTO ciflow.events (connection, kind, subject, payload, dedupe_key)"
	" VALUES ($1, $2, $3, $4::pg_catalog.jsonb, $5)"
	" ON CONFLICT (dedupe_key) DO NOTHING RETURNING *",
	.nargs = 5,
	.types = {TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID}
};

static CiflowCatalogStatement notify_event = {
	.sql = "SELECT pg_catalog.pg_notify($1, $2)",
	.nargs = 2,
	.types = {TEXTOID, TEXTOID}
};

static CiflowCatalogStatement read_run = {
	.sql = "SELECT connection, entity, target, mode, status, error, run_by::pg_catalog.text,"
	" rows::pg_catalog.text, inserted::pg_catalog.text, updated::pg_catalog.text,"
	" deleted::pg_catalog.text,"
	" pg_catalog.to_json(started_at)::pg_catalog.text,"
	" pg_catalog.to_json(finished_at)::pg_catalog.text"
	" FROM ciflow.sync_runs WHERE id OPERATOR(pg_catalog.=) $1"
	" AND status OPERATOR(pg_catalog.<>) 'running'",
	.nargs = 1,
	.types = {INT8OID}
};

/* One batch: the oldest expired events, found by the created_at index. */
static CiflowCatalogStatement trim_batch = {
	.sql = "DELETE FROM ciflow.events WHERE id OPERATOR(pg_catalog.=) ANY (ARRAY("
	" SELECT id FROM ciflow.events"
	" WHERE created_at OPERATOR(pg_catalog.<) (pg_catalog.clock_timestamp()"
	" OPERATOR(pg_catalog.-) pg_catalog.make_interval(secs => $1))"
	" ORDER BY created_at LIMIT $2))",
	.nargs = 2,
	.types = {FLOAT8OID, INT4OID}
};

/*
 * B.2: reported job ids expire after 30 days.  A job state is refreshed by
 * every pass that still lists the job, so only jobs gone from the listing
 * for that long go.
 */
static CiflowCatalogStatement trim_jobs = {
	.sql = "DELETE FROM ciflow.refresh_states WHERE kind OPERATOR(pg_catalog.=) 'job'"
	" AND observed_at OPERATOR(pg_catalog.<) (pg_catalog.clock_timestamp()"
	" OPERATOR(pg_catalog.-) '30 days'::pg_catalog.interval)",
	.nargs = 0
};

void
CiflowEventInit(CiflowEvent *ev, const char *connection, const char *kind,
				const char *subject, const char *dedupe_key)
{
	memset(ev, 0, sizeof(*ev));
	ev->connection = connection;
	ev->kind = kind;
	ev->subject = subject;
	ev->dedupe_key = dedupe_key;
}

void
CiflowEventAdd(CiflowEvent *ev, const char *key, CiflowEventFieldType type,
			   const char *value)
{
	if (ev->nfields >= CIFLOW_EVENT_MAX_FIELDS)
		elog(ERROR, "too many fields in a ciflow event");
	ev->fields[ev->nfields].key = key;
	ev->fields[ev->nfields].type = type;
	ev->fields[ev->nfields].value = value;
	ev->fields[ev->nfields].private = false;
	ev->nfields++;
}

/*
 * Cuts a UTF-8 string to at most max_bytes without splitting a character
 * (names from the service are UTF-8 whatever the database encoding).
 */
static char *
ClipUtf8(const char *s, int max_bytes, bool *clipped)
{
	int			len = strlen(s);

	if (max_bytes < 0 || len <= max_bytes)
		return (char *) s;
	len = max_bytes;
	while (len > 0 && (((unsigned char) s[len]) & 0xC0) == 0x80)
		len--;
	*clipped = true;
	return pnstrdup(s, len);
}

bool
CiflowAppendJsonString(StringInfo buf, const char *s, int max_bytes)
{
	bool		clipped = false;

	if (s == NULL)
		appendStringInfoString(buf, "null");
	else
		escape_json(buf, ClipUtf8(s, max_bytes, &clipped));
	return clipped;
}

/*
 * The members of the payload as JSON text, each string cut to max_bytes
 * (-1: whole).  Private fields are left out of notifications.  Returns
 * whether anything was cut.
 */
static bool
AppendFields(StringInfo buf, const CiflowEvent *ev, int max_bytes, bool notification)
{
	bool		clipped = false;
	int			i;

	for (i = 0; i < ev->nfields; i++)
	{
		const CiflowEventField *f = &ev->fields[i];

		if (notification && f->private)
			continue;
		if (buf->len > 1)
			appendStringInfoChar(buf, ',');
		escape_json(buf, f->key);
		appendStringInfoChar(buf, ':');
		if (f->type == CIFLOW_FIELD_STRING)
			clipped |= CiflowAppendJsonString(buf, f->value, max_bytes);
		else
			appendStringInfoString(buf, f->value ? f->value : "null");
	}
	return clipped;
}

/*
 * The notification: id, kind, connection, subject and the public fields.
 * Whatever the length of the names the service sent, it fits: strings are
 * cut ever shorter until it does (and "truncated" says so); ciflow.events
 * keeps them whole.  JSON escapes make a string up to six times longer
 * than its bytes, so the last cap is small enough for any payload of at
 * most CIFLOW_EVENT_MAX_FIELDS fields.
 */
static char *
NotificationPayload(const CiflowEvent *ev, int64 id)
{
	static const int caps[] = {-1, 2048, 512, 64};
	StringInfoData buf;
	int			i;

	initStringInfo(&buf);
	for (i = 0; i < (int) lengthof(caps); i++)
	{
		bool		clipped;

		resetStringInfo(&buf);
		appendStringInfo(&buf, "{\"id\":" INT64_FORMAT ",\"kind\":", id);
		escape_json(&buf, ev->kind);
		appendStringInfoString(&buf, ",\"connection\":");
		escape_json(&buf, ev->connection);
		appendStringInfoString(&buf, ",\"subject\":");
		clipped = CiflowAppendJsonString(&buf, ev->subject, caps[i]);
		clipped |= AppendFields(&buf, ev, caps[i], true);
		if (clipped)
			appendStringInfoString(&buf, ",\"truncated\":true");
		appendStringInfoChar(&buf, '}');
		if (buf.len <= NOTIFY_PAYLOAD_LIMIT)
			return buf.data;
	}
	elog(ERROR, "ciflow event notification does not fit NOTIFY's limit");
	pg_unreachable();
}

static void
Notify(const char *channel, const char *payload)
{
	Datum		values[2];

	values[0] = CStringGetTextDatum(channel);
	values[1] = CStringGetTextDatum(payload);
	(void) CiflowCatalogExecute(&notify_event, values, NULL, NULL, NULL);
}

HeapTuple
CiflowEventInsert(const CiflowEvent *ev, TupleDesc *desc)
{
	Datum		values[5];
	StringInfoData payload;
	HeapTuple	tup;
	bool		isnull;
	int64		id;
	char	   *note;

	initStringInfo(&payload);
	appendStringInfoChar(&payload, '{');
	(void) AppendFields(&payload, ev, -1, false);
	appendStringInfoChar(&payload, '}');

	values[0] = CStringGetTextDatum(ev->connection);
	values[1] = CStringGetTextDatum(ev->kind);
	values[2] = CStringGetTextDatum(ev->subject);
	values[3] = CStringGetTextDatum(payload.data);
	values[4] = CStringGetTextDatum(ev->dedupe_key);
	if (CiflowCatalogExecute(&insert_event, values, NULL, &tup, desc) == 0)
		return NULL;			/* recorded before: no second announcement */

	id = DatumGetInt64(heap_getattr(tup, 1, *desc, &isnull));
	CiflowDeliveryEnqueue(id);	/* the outbox: commits with the event */
	note = NotificationPayload(ev, id);
	Notify("ciflow_events", note);
	Notify(psprintf("ciflow_%s", ev->kind), note);
	CiflowLauncherWakeAtCommit();	/* on_event jobs */
	return tup;
}

/* Column n of a returned row as a C string, or NULL. */
static char *
ColumnText(HeapTuple tup, TupleDesc desc, int n)
{
	bool		isnull;
	Datum		d = heap_getattr(tup, n, desc, &isnull);

	return isnull ? NULL : TextDatumGetCString(d);
}

/*
 * The subject of a sync event is its target table: that is what a
 * subscriber joins to, and one entity may be synced into several tables.
 * The error and who ran it stay in the table, whose policy shows them
 * only to the run's role and the connection's owner; a NOTIFY reaches
 * every listener of the database.
 */
void
CiflowEventRecordSyncEnd(int64 run_id)
{
	Datum		values[1];
	HeapTuple	tup;
	TupleDesc	desc;
	CiflowEvent ev;
	char	   *status;
	char	   *target;
	TupleDesc	event_desc;

	values[0] = Int64GetDatum(run_id);
	if (CiflowCatalogExecute(&read_run, values, NULL, &tup, &desc) == 0 || tup == NULL)
		return;
	status = ColumnText(tup, desc, 5);
	target = ColumnText(tup, desc, 3);
	CiflowEventInit(&ev, ColumnText(tup, desc, 1),
					strcmp(status, "succeeded") == 0 ? "sync_succeeded" : "sync_failed",
					target, psprintf("sync:" INT64_FORMAT, run_id));
	CiflowEventAdd(&ev, "run_id", CIFLOW_FIELD_NUMBER, psprintf(INT64_FORMAT, run_id));
	CiflowEventAdd(&ev, "entity", CIFLOW_FIELD_STRING, ColumnText(tup, desc, 2));
	CiflowEventAdd(&ev, "target", CIFLOW_FIELD_STRING, target);
	CiflowEventAdd(&ev, "mode", CIFLOW_FIELD_STRING, ColumnText(tup, desc, 4));
	CiflowEventAdd(&ev, "status", CIFLOW_FIELD_STRING, status);
	CiflowEventAdd(&ev, "rows", CIFLOW_FIELD_NUMBER, ColumnText(tup, desc, 8));
	CiflowEventAdd(&ev, "inserted", CIFLOW_FIELD_NUMBER, ColumnText(tup, desc, 9));
	CiflowEventAdd(&ev, "updated", CIFLOW_FIELD_NUMBER, ColumnText(tup, desc, 10));
	CiflowEventAdd(&ev, "deleted", CIFLOW_FIELD_NUMBER, ColumnText(tup, desc, 11));
	CiflowEventAdd(&ev, "started", CIFLOW_FIELD_JSON, ColumnText(tup, desc, 12));
	CiflowEventAdd(&ev, "finished", CIFLOW_FIELD_JSON, ColumnText(tup, desc, 13));
	CiflowEventAdd(&ev, "error", CIFLOW_FIELD_STRING, ColumnText(tup, desc, 6));
	ev.fields[ev.nfields - 1].private = true;
	CiflowEventAdd(&ev, "run_by", CIFLOW_FIELD_STRING, ColumnText(tup, desc, 7));
	ev.fields[ev.nfields - 1].private = true;
	(void) CiflowEventInsert(&ev, &event_desc);
}

/*
 * ciflow.trim_events(): deletes expired events in batches, each found
 * through the created_at index, so that no statement sorts or locks the
 * whole log; returns how many went.
 */
Datum
ciflow_trim_events(PG_FUNCTION_ARGS)
{
	Datum		values[2];
	int64		total = 0;
	uint64		n;

	CiflowRefuseRestricted();
	values[0] = Float8GetDatum((double) ciflow_settings.event_retention_s);
	values[1] = Int32GetDatum(TRIM_BATCH);
	do
	{
		CHECK_FOR_INTERRUPTS();
		n = CiflowCatalogExecute(&trim_batch, values, NULL, NULL, NULL);
		total += n;
	} while (n == TRIM_BATCH);
	(void) CiflowCatalogExecute(&trim_jobs, NULL, NULL, NULL, NULL);
	PG_RETURN_INT64(total);
}
