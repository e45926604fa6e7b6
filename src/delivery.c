/*-------------------------------------------------------------------------
 *
 * delivery.c
 *	  Event deliveries (issue 13): the sinks' SQL API (ciflow.add_sink,
 *	  drop_sink, retry_delivery), the outbox (one ciflow.deliveries row per
 *	  event and matching sink, written in the event's transaction), the four
 *	  formats (json signed with HMAC-SHA256, teams, slack, mail) and the
 *	  delivery pass that sends them over HTTP(S) or SMTP(S) through
 *	  libcurl's multi interface and records every attempt.
 *
 *	  A pass claims the due head delivery of each sink in a short
 *	  transaction (counting the attempt and leasing the row past its
 *	  timeouts, so that a pass that dies mid-send leaves it to be sent again:
 *	  at least once, the event id as idempotency key), commits, sends them
 *	  all at once, each bounded by ciflow.connect_timeout and
 *	  ciflow.request_timeout, and records each outcome in another short
 *	  transaction as soon as its transfer ends, claiming that sink's next
 *	  head with it.  A sink that hangs holds one transfer slot until its
 *	  timeout, never the others.  Every statement goes through catalog.c.
 *
 *	  Deliveries are not calls to the service: no connection, no call
 *	  limit, nothing of request.c but its retry delays.  This file does not
 *	  decide what an event is (monitor.c, events.c), does not schedule
 *	  passes (the launcher will, issue 9) and does not touch http.c's
 *	  handle.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <curl/curl.h>
#include <time.h>
#include <unistd.h>

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "common/base64.h"
#include "common/hmac.h"
#include "common/sha2.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"

#include "ciflow_json.h"

#include "catalog.h"
#include "ciflow.h"
#include "delivery.h"
#include "http.h"
#include "request.h"

CIFLOW_SQL_FUNCTION(ciflow_add_sink);
CIFLOW_SQL_FUNCTION(ciflow_drop_sink);
CIFLOW_SQL_FUNCTION(ciflow_retry_delivery);
CIFLOW_SQL_FUNCTION(ciflow_deliver);

/* Transfers in flight at once in one pass. */
#define MAX_CONCURRENT 16

/* Deliveries one pass attempts at most (each at most once). */
#define PASS_LIMIT 1000

/* Bytes of a sink's answer kept in last_error. */
#define ANSWER_KEEP 200

static const char *const sink_schemes[] = {"http", "https", "smtp", "smtps", NULL};

/* Section 5's kinds, as ciflow.events' CHECK lists them. */
static const char *const event_kinds[] = {
	"datasource_refresh_failed", "datasource_refresh_succeeded",
	"segment_threshold_exceeded", "measure_threshold_exceeded",
	"full_refresh_completed", "unification_refresh_completed",
	"sync_succeeded", "sync_failed", NULL
};

/*
 * The outbox.  The sink's owner must be able to see the event as
 * ciflow.events' policy would show it: deliveries carry its rights.
 */
static CiflowCatalogStatement enqueue = {
	.sql = "INSERT INTO ciflow.deliveries (event_id, sink)"
	" SELECT e.id, s.name FROM ciflow.events e, ciflow.sink_settings s"
	" WHERE e.id OPERATOR(pg_catalog.=) $1"
	" AND (s.kinds IS NULL OR e.kind OPERATOR(pg_catalog.=) ANY (s.kinds))"
	" AND (s.connection IS NULL OR s.connection OPERATOR(pg_catalog.=) e.connection)"
	" AND ciflow.connection_usable_by(e.connection,"
	" pg_catalog.pg_get_userbyid(s.owner::pg_catalog.oid))"
	" AND (e.kind OPERATOR(pg_catalog.<>) ALL"
	" (ARRAY['sync_succeeded', 'sync_failed']::pg_catalog.text[])"
	" OR (e.payload OPERATOR(pg_catalog.->>) 'run_by') OPERATOR(pg_catalog.=)"
	" pg_catalog.pg_get_userbyid(s.owner::pg_catalog.oid)::pg_catalog.text"
	" OR ciflow.connection_owned_by(e.connection,"
	" pg_catalog.pg_get_userbyid(s.owner::pg_catalog.oid)))"
	" ORDER BY s.name",
	.nargs = 1,
	.types = {INT8OID}
};

/*
 * Claims the due head of one sink: the pending row of the lowest event id
 * of its sink, due, not attempted yet in this pass ($2), not claimed by a
 * concurrent pass (SKIP LOCKED; a claimed head is leased into the future,
 * so its sink is skipped until the outcome is recorded).
 */
static CiflowCatalogStatement claim = {
	.sql = "WITH c AS (UPDATE ciflow.deliveries d"
	" SET attempts = d.attempts OPERATOR(pg_catalog.+) 1,"
	" next_attempt_at = pg_catalog.clock_timestamp() OPERATOR(pg_catalog.+)"
	" pg_catalog.make_interval(secs => $1)"
	" WHERE d.id OPERATOR(pg_catalog.=) (SELECT h.id FROM ciflow.deliveries h"
	" WHERE h.status OPERATOR(pg_catalog.=) 'pending'"
	" AND h.next_attempt_at OPERATOR(pg_catalog.<=) pg_catalog.clock_timestamp()"
	" AND h.id OPERATOR(pg_catalog.<>) ALL ($2)"
	" AND NOT EXISTS (SELECT 1 FROM ciflow.deliveries p"
	" WHERE p.sink OPERATOR(pg_catalog.=) h.sink"
	" AND p.status OPERATOR(pg_catalog.=) 'pending'"
	" AND p.event_id OPERATOR(pg_catalog.<) h.event_id)"
	" ORDER BY h.next_attempt_at, h.id LIMIT 1 FOR UPDATE OF h SKIP LOCKED)"
	" RETURNING d.id, d.event_id, d.attempts, d.sink)"
	" SELECT c.id, c.event_id, c.attempts, c.sink, s.url, s.format, s.mail_from,"
	" pg_catalog.array_to_string(s.mail_to, E'\\n') AS mail_to, s.username,"
	" s.require_tls, s.ca_file, e.kind, e.connection, e.subject,"
	" pg_catalog.to_char(e.created_at AT TIME ZONE 'UTC',"
	" 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS created_at,"
	" e.payload::pg_catalog.text AS payload"
	" FROM c JOIN ciflow.sink_settings s ON s.name OPERATOR(pg_catalog.=) c.sink"
	" JOIN ciflow.events e ON e.id OPERATOR(pg_catalog.=) c.event_id",
	.nargs = 2,
	.types = {FLOAT8OID, INT8ARRAYOID}
};

/* An attempt's outcome; a row that went meanwhile (drop_sink) is left be. */
static CiflowCatalogStatement record = {
	.sql = "UPDATE ciflow.deliveries SET status = $2, last_status = $3, last_error = $4,"
	" next_attempt_at = CASE WHEN $2 OPERATOR(pg_catalog.=) 'pending'"
	" THEN pg_catalog.clock_timestamp() OPERATOR(pg_catalog.+)"
	" pg_catalog.make_interval(secs => $5) ELSE next_attempt_at END,"
	" delivered_at = CASE WHEN $2 OPERATOR(pg_catalog.=) 'delivered'"
	" THEN pg_catalog.clock_timestamp() END"
	" WHERE id OPERATOR(pg_catalog.=) $1 AND status OPERATOR(pg_catalog.=) 'pending'",
	.nargs = 5,
	.types = {INT8OID, TEXTOID, INT4OID, TEXTOID, FLOAT8OID}
};

static CiflowCatalogStatement insert_sink = {
	.sql = "INSERT INTO ciflow.sink_settings (name, url, format, kinds, connection,"
	" mail_from, mail_to, username, require_tls, ca_file, owner)"
	" VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,"
	" $11::pg_catalog.oid::pg_catalog.regrole)",
	.nargs = 11,
	.types = {TEXTOID, TEXTOID, TEXTOID, TEXTARRAYOID, TEXTOID, TEXTOID, TEXTARRAYOID,
	TEXTOID, BOOLOID, TEXTOID, OIDOID}
};

static CiflowCatalogStatement insert_secrets = {
	.sql = "INSERT INTO ciflow.sink_secrets (sink, secret, password) VALUES ($1, $2, $3)",
	.nargs = 3,
	.types = {TEXTOID, TEXTOID, TEXTOID}
};

static CiflowCatalogStatement delete_sink = {
	.sql = "DELETE FROM ciflow.sink_settings WHERE name OPERATOR(pg_catalog.=) $1",
	.nargs = 1,
	.types = {TEXTOID}
};

static CiflowCatalogStatement read_delivery = {
	.sql = "SELECT d.status, s.owner::pg_catalog.oid FROM ciflow.deliveries d"
	" JOIN ciflow.sink_settings s ON s.name OPERATOR(pg_catalog.=) d.sink"
	" WHERE d.id OPERATOR(pg_catalog.=) $1 FOR UPDATE OF d",
	.nargs = 1,
	.types = {INT8OID}
};

static CiflowCatalogStatement requeue = {
	.sql = "UPDATE ciflow.deliveries SET status = 'pending', attempts = 0,"
	" next_attempt_at = pg_catalog.clock_timestamp(), delivered_at = NULL"
	" WHERE id OPERATOR(pg_catalog.=) $1",
	.nargs = 1,
	.types = {INT8OID}
};

/* One claimed delivery and its transfer. */
typedef struct Delivery
{
	int64		id;
	int64		event_id;
	int			attempts;		/* this one included */
	char	   *sink;
	char	   *url;
	char	   *format;
	char	   *mail_from;
	char	   *mail_to;		/* addresses, one a line */
	char	   *username;
	bool		require_tls;
	char	   *ca_file;
	char	   *secret;			/* wiped when done */
	char	   *password;		/* wiped when done */
	char	   *kind;
	char	   *connection;
	char	   *subject;
	char	   *created_at;		/* ISO 8601, UTC */
	char	   *payload;		/* JSON object */

	/* the transfer; libcurl's objects are freed on every path */
	CURL	   *easy;
	struct curl_slist *headers;
	struct curl_slist *rcpt;
	char	   *body;
	size_t		body_len;
	size_t		body_pos;		/* mail upload position */
	char		errbuf[CURL_ERROR_SIZE];
	char		answer[ANSWER_KEEP + 1];
	size_t		answer_len;
	CURLcode	rc;
	bool		done;
} Delivery;

/* The deliveries of the running pass, for the wipe on any exit. */
typedef struct Pass
{
	MemoryContext cxt;
	Delivery   *slots[MAX_CONCURRENT];
	int			nrunning;
	int64	   *tried;			/* ids attempted in this pass */
	int			ntried;
	CURLM	   *multi;
} Pass;

static void
ErrorInvalid(const char *msg, const char *detail, const char *hint)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("%s", msg),
			 detail ? errdetail("%s", detail) : 0,
			 hint ? errhint("%s", hint) : 0));
}

/* ---------------------------------------------------------------------
 * The outbox
 * ---------------------------------------------------------------------
 */

void
CiflowDeliveryEnqueue(int64 event_id)
{
	Datum		values[1];

	values[0] = Int64GetDatum(event_id);
	(void) CiflowCatalogExecute(&enqueue, values, NULL, NULL, NULL);
}

/* ---------------------------------------------------------------------
 * ciflow.add_sink, drop_sink, retry_delivery
 * ---------------------------------------------------------------------
 */

static bool
IsSinkName(const char *name)
{
	const char *p;

	if (name == NULL || name[0] == '\0' || strlen(name) >= NAMEDATALEN)
		return false;
	for (p = name; *p; p++)
	{
		if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') ||
			  *p == '_' || *p == '-'))
			return false;
	}
	return true;
}

static void
CheckSinkName(const char *name)
{
	if (!IsSinkName(name))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_NAME),
				 errmsg("invalid sink name \"%s\"", name ? name : ""),
				 errdetail("A sink name is lowercase letters, digits, \"_\" and \"-\", at most 63 bytes.")));
}

/* A mail address that cannot break out of a header or an SMTP command. */
static void
CheckMailAddress(const char *addr, const char *what)
{
	const char *at = addr ? strchr(addr, '@') : NULL;
	const char *p;

	if (at == NULL || at == addr || at[1] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s \"%s\" is not a mail address", what, addr ? addr : ""),
				 errhint("Give a bare address such as ops@example.com.")));
	for (p = addr; *p; p++)
	{
		if ((unsigned char) *p <= ' ' || strchr("<>,;\"()\\", *p) != NULL)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("%s \"%s\" is not a mail address", what, addr),
					 errdetail("Spaces, control characters and <>,;\"()\\ are not accepted."),
					 errhint("Give a bare address such as ops@example.com.")));
	}
}

/* The elements of a text[] argument; NULL elements and empty arrays refused. */
static int
TextArrayElements(FunctionCallInfo fcinfo, int n, const char *what, Datum **elems)
{
	ArrayType  *arr = PG_GETARG_ARRAYTYPE_P(n);
	bool	   *nulls;
	int			nelems;
	int			i;

	deconstruct_array(arr, TEXTOID, -1, false, TYPALIGN_INT, elems, &nulls, &nelems);
	if (nelems == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must not be empty", what),
				 errhint("Pass NULL for every kind.")));
	for (i = 0; i < nelems; i++)
	{
		if (nulls[i])
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("%s must not contain NULL", what)));
	}
	return nelems;
}

static bool
IsEventKind(const char *kind)
{
	const char *const *k;

	for (k = event_kinds; *k; k++)
	{
		if (strcmp(*k, kind) == 0)
			return true;
	}
	return false;
}

/* Argument arg of the call as parameter i of a statement, NULL kept. */
static void
ArgParam(FunctionCallInfo fcinfo, int arg, Datum *values, char *nulls, int i)
{
	nulls[i] = PG_ARGISNULL(arg) ? 'n' : ' ';
	values[i] = PG_ARGISNULL(arg) ? (Datum) 0 : PG_GETARG_DATUM(arg);
}

/*
 * ciflow.add_sink(name, url, format, kinds, connection, secret, mail_from,
 * mail_to, username, password, require_tls, ca_file)
 */
Datum
ciflow_add_sink(PG_FUNCTION_ARGS)
{
	char	   *name = CiflowTextArg(fcinfo, 0);
	char	   *url = CiflowTextArg(fcinfo, 1);
	char	   *format = PG_ARGISNULL(2) ? pstrdup("json") : CiflowTextArg(fcinfo, 2);
	char	   *connection = CiflowTextArg(fcinfo, 4);
	char	   *secret = CiflowTextArg(fcinfo, 5);
	char	   *mail_from = CiflowTextArg(fcinfo, 6);
	char	   *username = CiflowTextArg(fcinfo, 8);
	char	   *password = CiflowTextArg(fcinfo, 9);
	bool		require_tls = PG_ARGISNULL(10) ? false : PG_GETARG_BOOL(10);
	char	   *ca_file = CiflowTextArg(fcinfo, 11);
	bool		mail = format != NULL && strcmp(format, "mail") == 0;
	bool		smtp;
	TupleDesc	desc;
	Datum		values[11];
	char		nulls[11];
	Datum	   *elems;
	int			n;
	int			i;

	CiflowRefuseRestricted();
	CheckSinkName(name);
	if (strcmp(format, "json") != 0 && strcmp(format, "teams") != 0 &&
		strcmp(format, "slack") != 0 && !mail)
		ErrorInvalid(psprintf("unknown sink format \"%s\"", format), NULL,
					 "The formats are json, teams, slack and mail.");
	if (!CiflowParseUrlSchemes(url, sink_schemes, NULL))
		ErrorInvalid(psprintf("sink \"%s\": url must be an http, https, smtp or smtps URL", name),
					 "A user name or password in the URL is not accepted.",
					 mail ? "Pass username and password instead." : NULL);
	smtp = pg_strncasecmp(url, "smtp", 4) == 0;
	if (smtp != mail)
		ErrorInvalid(psprintf("sink \"%s\": format %s needs %s URL", name, format,
							  mail ? "an smtp or smtps" : "an http or https"),
					 NULL, NULL);
	if (!mail && (mail_from || !PG_ARGISNULL(7) || username || password))
		ErrorInvalid(psprintf("sink \"%s\": mail_from, mail_to, username and password are for format mail", name),
					 NULL, NULL);
	if (secret != NULL && strcmp(format, "json") != 0)
		ErrorInvalid(psprintf("sink \"%s\": a secret signs json deliveries only", name),
					 "Teams, Slack and mail do not check a signature.", NULL);
	if (mail && (mail_from == NULL || PG_ARGISNULL(7)))
		ErrorInvalid(psprintf("sink \"%s\": format mail needs mail_from and mail_to", name),
					 NULL, NULL);
	if (password != NULL && username == NULL)
		ErrorInvalid(psprintf("sink \"%s\": a password needs a username", name), NULL, NULL);
	if (ca_file != NULL && (ca_file[0] != '/' || access(ca_file, R_OK) != 0))
		ErrorInvalid(psprintf("sink \"%s\": ca_file must be an absolute path the server can read", name),
					 NULL, NULL);
	if (mail)
	{
		CheckMailAddress(mail_from, "mail_from");
		n = TextArrayElements(fcinfo, 7, "mail_to", &elems);
		for (i = 0; i < n; i++)
			CheckMailAddress(TextDatumGetCString(elems[i]), "mail_to");
	}
	if (!PG_ARGISNULL(3))
	{
		n = TextArrayElements(fcinfo, 3, "kinds", &elems);
		for (i = 0; i < n; i++)
		{
			char	   *kind = TextDatumGetCString(elems[i]);

			if (!IsEventKind(kind))
				ErrorInvalid(psprintf("unknown event kind \"%s\"", kind), NULL,
							 "The kinds are those of ciflow.events (section 5).");
		}
	}
	if (connection != NULL &&
		CiflowCatalogLookup("connection_settings", "name", connection, &desc) == NIL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("connection \"%s\" does not exist", connection)));
	if (CiflowCatalogLookup("sink_settings", "name", name, &desc) != NIL)
		ereport(ERROR,
				(errcode(ERRCODE_DUPLICATE_OBJECT),
				 errmsg("sink \"%s\" already exists", name),
				 errhint("Drop it first with ciflow.drop_sink.")));

	memset(nulls, ' ', sizeof(nulls));
	values[0] = CStringGetTextDatum(name);
	values[1] = CStringGetTextDatum(url);
	values[2] = CStringGetTextDatum(format);
	ArgParam(fcinfo, 3, values, nulls, 3);	/* kinds */
	ArgParam(fcinfo, 4, values, nulls, 4);	/* connection */
	ArgParam(fcinfo, 6, values, nulls, 5);	/* mail_from */
	ArgParam(fcinfo, 7, values, nulls, 6);	/* mail_to */
	ArgParam(fcinfo, 8, values, nulls, 7);	/* username */
	values[8] = BoolGetDatum(require_tls);
	ArgParam(fcinfo, 11, values, nulls, 9); /* ca_file */
	values[10] = ObjectIdGetDatum(GetUserId());
	(void) CiflowCatalogExecute(&insert_sink, values, nulls, NULL, NULL);

	if (secret != NULL || password != NULL)
	{
		values[0] = CStringGetTextDatum(name);
		values[1] = secret ? CStringGetTextDatum(secret) : (Datum) 0;
		values[2] = password ? CStringGetTextDatum(password) : (Datum) 0;
		memset(nulls, ' ', 3);
		nulls[1] = secret ? ' ' : 'n';
		nulls[2] = password ? ' ' : 'n';
		(void) CiflowCatalogExecute(&insert_secrets, values, nulls, NULL, NULL);
		if (secret)
			explicit_bzero(VARDATA(DatumGetPointer(values[1])), strlen(secret));
		if (password)
			explicit_bzero(VARDATA(DatumGetPointer(values[2])), strlen(password));
	}
	CiflowFreeSecret(secret);
	CiflowFreeSecret(password);
	PG_RETURN_VOID();
}

/* Owners (and their members) and superusers may drop a sink or retry its deliveries. */
static void
RequireSinkOwner(Oid owner, const char *what)
{
	if (!has_privs_of_role(GetUserId(), owner))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for %s", what),
				 errdetail("Only the role that added the sink (or a member of it) and superusers may."),
				 errhint("The sink was added by role \"%s\".",
						 GetUserNameFromId(owner, true) ? GetUserNameFromId(owner, true) : "?")));
}

Datum
ciflow_drop_sink(PG_FUNCTION_ARGS)
{
	char	   *name = CiflowTextArg(fcinfo, 0);
	bool		if_exists = PG_ARGISNULL(1) ? false : PG_GETARG_BOOL(1);
	TupleDesc	desc;
	List	   *rows;
	bool		isnull;
	Datum		values[1];

	CiflowRefuseRestricted();
	if (name == NULL || !IsSinkName(name))
	{
		if (if_exists && name != NULL)
			PG_RETURN_VOID();
		CheckSinkName(name);
	}
	rows = CiflowCatalogLookup("sink_settings", "name", name, &desc);
	if (rows == NIL)
	{
		if (if_exists)
		{
			ereport(NOTICE,
					(errmsg("sink \"%s\" does not exist, skipping", name)));
			PG_RETURN_VOID();
		}
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("sink \"%s\" does not exist", name)));
	}
	RequireSinkOwner(DatumGetObjectId(CiflowCatalogDatum(linitial(rows), desc, "owner",
														 &isnull)),
					 psprintf("sink \"%s\"", name));
	values[0] = CStringGetTextDatum(name);
	(void) CiflowCatalogExecute(&delete_sink, values, NULL, NULL, NULL);
	PG_RETURN_VOID();
}

Datum
ciflow_retry_delivery(PG_FUNCTION_ARGS)
{
	int64		id = PG_GETARG_INT64(0);
	Datum		values[1];
	HeapTuple	tup;
	TupleDesc	desc;
	bool		isnull;
	char	   *status;

	CiflowRefuseRestricted();
	values[0] = Int64GetDatum(id);
	if (CiflowCatalogExecute(&read_delivery, values, NULL, &tup, &desc) == 0 || tup == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("delivery " INT64_FORMAT " does not exist", id)));
	RequireSinkOwner(DatumGetObjectId(heap_getattr(tup, 2, desc, &isnull)),
					 psprintf("delivery " INT64_FORMAT, id));
	status = TextDatumGetCString(heap_getattr(tup, 1, desc, &isnull));
	if (strcmp(status, "failed") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("delivery " INT64_FORMAT " has not failed", id),
				 errdetail("Its status is %s.", status),
				 errhint("Only a failed delivery can be queued again.")));
	(void) CiflowCatalogExecute(&requeue, values, NULL, NULL, NULL);
	PG_RETURN_VOID();
}

/* ---------------------------------------------------------------------
 * Formats
 * ---------------------------------------------------------------------
 */

/* A payload value as text: a string as itself, anything else as JSON. */
static char *
ValueText(json_t *v)
{
	char	   *s;

	if (json_is_string(v))
		return pstrdup(json_string_value(v));
	s = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT);
	return s ? s : pstrdup("");
}

/* The payload's members as "key: value" lines (CR and LF made spaces). */
typedef void (*FieldSink) (StringInfo buf, const char *key, const char *value);

static void
ForEachField(const Delivery *d, StringInfo buf, FieldSink emit)
{
	json_error_t err;
	json_t	   *obj = json_loads(d->payload, JSON_DECODE_ANY, &err);
	const char *key;
	json_t	   *v;

	if (obj == NULL || !json_is_object(obj))
		elog(ERROR, "ciflow: the payload of event " INT64_FORMAT " is not a JSON object",
			 d->event_id);
	json_object_foreach(obj, key, v)
		emit(buf, key, ValueText(v));
	json_decref(obj);
}

static char *
Title(const Delivery *d)
{
	return psprintf("[ciflow] %s: %s", d->kind, d->subject);
}

static void
JsonBody(const Delivery *d, StringInfo buf)
{
	appendStringInfo(buf, "{\"id\": " INT64_FORMAT ", \"kind\": ", d->event_id);
	escape_json(buf, d->kind);
	appendStringInfoString(buf, ", \"connection\": ");
	escape_json(buf, d->connection);
	appendStringInfoString(buf, ", \"subject\": ");
	escape_json(buf, d->subject);
	appendStringInfoString(buf, ", \"created_at\": ");
	escape_json(buf, d->created_at);
	appendStringInfo(buf, ", \"payload\": %s}", d->payload);
}

static void
TeamsFact(StringInfo buf, const char *key, const char *value)
{
	if (buf->data[buf->len - 1] != '[')
		appendStringInfoString(buf, ", ");
	appendStringInfoString(buf, "{\"name\": ");
	escape_json(buf, key);
	appendStringInfoString(buf, ", \"value\": ");
	escape_json(buf, value);
	appendStringInfoChar(buf, '}');
}

/* A MessageCard, as Teams incoming webhooks and Workflows webhooks take it. */
static void
TeamsBody(const Delivery *d, StringInfo buf)
{
	char	   *title = Title(d);
	size_t		klen = strlen(d->kind);
	bool		failed = klen > 7 && strcmp(d->kind + klen - 7, "_failed") == 0;

	appendStringInfoString(buf, "{\"@type\": \"MessageCard\", \"@context\": \"https://schema.org/extensions\", \"summary\": ");
	escape_json(buf, title);
	appendStringInfo(buf, ", \"themeColor\": \"%s\", \"title\": ", failed ? "D13438" : "2E7D32");
	escape_json(buf, title);
	appendStringInfoString(buf, ", \"text\": ");
	escape_json(buf, psprintf("Event " INT64_FORMAT " of connection %s at %s",
							  d->event_id, d->connection, d->created_at));
	appendStringInfoString(buf, ", \"sections\": [{\"facts\": [");
	ForEachField(d, buf, TeamsFact);
	appendStringInfoString(buf, "]}]}");
}

/* Slack's text escapes: &, < and >. */
static void
AppendSlackText(StringInfo buf, const char *s)
{
	for (; *s; s++)
	{
		if (*s == '&')
			appendStringInfoString(buf, "&amp;");
		else if (*s == '<')
			appendStringInfoString(buf, "&lt;");
		else if (*s == '>')
			appendStringInfoString(buf, "&gt;");
		else
			appendStringInfoChar(buf, *s);
	}
}

static void
SlackLine(StringInfo buf, const char *key, const char *value)
{
	appendStringInfoString(buf, "\n• ");
	AppendSlackText(buf, key);
	appendStringInfoString(buf, ": ");
	AppendSlackText(buf, value);
}

/* An incoming-webhook message: one mrkdwn text. */
static void
SlackBody(const Delivery *d, StringInfo buf)
{
	StringInfoData text;

	initStringInfo(&text);
	appendStringInfoChar(&text, '*');
	AppendSlackText(&text, Title(d));
	appendStringInfo(&text, "*\nEvent " INT64_FORMAT " of connection ", d->event_id);
	AppendSlackText(&text, d->connection);
	appendStringInfo(&text, " at %s", d->created_at);
	ForEachField(d, &text, SlackLine);
	appendStringInfoString(buf, "{\"text\": ");
	escape_json(buf, text.data);
	appendStringInfoChar(buf, '}');
}

/* Appends s with CR and LF made spaces: nothing can start a new header or line. */
static void
AppendOneLine(StringInfo buf, const char *s)
{
	for (; *s; s++)
		appendStringInfoChar(buf, (*s == '\r' || *s == '\n') ? ' ' : *s);
}

static void
MailLine(StringInfo buf, const char *key, const char *value)
{
	AppendOneLine(buf, key);
	appendStringInfoString(buf, ": ");
	AppendOneLine(buf, value);
	appendStringInfoString(buf, "\r\n");
}

/* A header value: as is when ASCII, else one RFC 2047 encoded word. */
static void
AppendHeaderText(StringInfo buf, const char *s)
{
	const unsigned char *p;
	StringInfoData line;
	int			enclen;
	char	   *enc;

	initStringInfo(&line);
	AppendOneLine(&line, s);
	for (p = (const unsigned char *) line.data; *p && *p < 0x80; p++)
		;
	if (*p == '\0')
	{
		appendStringInfoString(buf, line.data);
		return;
	}
	enc = palloc(pg_b64_enc_len(line.len) + 1);
	enclen = pg_b64_encode(line.data, line.len, enc, pg_b64_enc_len(line.len));
	if (enclen < 0)
		elog(ERROR, "ciflow: could not encode a mail header");
	enc[enclen] = '\0';
	appendStringInfo(buf, "=?UTF-8?B?%s?=", enc);
}

static void
MailBody(const Delivery *d, StringInfo buf)
{
	static const char *const days[] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
	static const char *const months[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
	"Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
	time_t		now = time(NULL);
	struct tm	tm;
	const char *p;

	gmtime_r(&now, &tm);
	appendStringInfo(buf, "From: %s\r\nTo: ", d->mail_from);
	for (p = d->mail_to; *p; p++)
	{
		if (*p == '\n')
			appendStringInfoString(buf, ", ");
		else
			appendStringInfoChar(buf, *p);
	}
	appendStringInfoString(buf, "\r\nSubject: ");
	AppendHeaderText(buf, Title(d));
	appendStringInfo(buf, "\r\nMessage-ID: <ciflow-event-" INT64_FORMAT "@%s>\r\n",
					 d->event_id, strchr(d->mail_from, '@') + 1);
	appendStringInfo(buf, "Date: %s, %02d %s %04d %02d:%02d:%02d +0000\r\n",
					 days[tm.tm_wday], tm.tm_mday, months[tm.tm_mon], tm.tm_year + 1900,
					 tm.tm_hour, tm.tm_min, tm.tm_sec);
	appendStringInfoString(buf, "MIME-Version: 1.0\r\n"
						   "Content-Type: text/plain; charset=UTF-8\r\n"
						   "Content-Transfer-Encoding: 8bit\r\n\r\n");
	appendStringInfo(buf, "id: " INT64_FORMAT "\r\n", d->event_id);
	MailLine(buf, "kind", d->kind);
	MailLine(buf, "connection", d->connection);
	MailLine(buf, "subject", d->subject);
	MailLine(buf, "created_at", d->created_at);
	ForEachField(d, buf, MailLine);
}

/* X-Ciflow-Signature: sha256=<hex HMAC-SHA256 of the body keyed by the secret>. */
static char *
SignatureHeader(const char *secret, const char *body, size_t len)
{
	pg_hmac_ctx *ctx = pg_hmac_create(PG_SHA256);
	uint8		mac[PG_SHA256_DIGEST_LENGTH];
	char		hex[PG_SHA256_DIGEST_LENGTH * 2 + 1];

	if (ctx == NULL ||
		pg_hmac_init(ctx, (const uint8 *) secret, strlen(secret)) < 0 ||
		pg_hmac_update(ctx, (const uint8 *) body, len) < 0 ||
		pg_hmac_final(ctx, mac, sizeof(mac)) < 0)
	{
		pg_hmac_free(ctx);
		elog(ERROR, "ciflow: could not compute an HMAC-SHA256 signature");
	}
	pg_hmac_free(ctx);
	hex_encode((const char *) mac, sizeof(mac), hex);
	hex[sizeof(hex) - 1] = '\0';
	explicit_bzero(mac, sizeof(mac));
	return psprintf("X-Ciflow-Signature: sha256=%s", hex);
}

/* ---------------------------------------------------------------------
 * Transfers (libcurl callbacks must not ereport)
 * ---------------------------------------------------------------------
 */

/* Keeps the first bytes of the answer for last_error, drops the rest. */
static size_t
KeepAnswer(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	Delivery   *d = (Delivery *) userdata;
	size_t		n = size * nmemb;
	size_t		room = ANSWER_KEEP - d->answer_len;

	if (room > 0)
	{
		memcpy(d->answer + d->answer_len, ptr, Min(n, room));
		d->answer_len += Min(n, room);
	}
	return n;
}

static size_t
ReadMail(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	Delivery   *d = (Delivery *) userdata;
	size_t		n = Min(size * nmemb, d->body_len - d->body_pos);

	memcpy(ptr, d->body + d->body_pos, n);
	d->body_pos += n;
	return n;
}

static struct curl_slist *
AppendHeader(struct curl_slist *list, const char *s)
{
	struct curl_slist *next = curl_slist_append(list, s);

	if (next == NULL)
		ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
	return next;
}

/* Builds the delivery's body and easy handle (freed by FreeTransfer). */
static void
PrepareTransfer(Delivery *d)
{
	StringInfoData body;
	CURL	   *h;
	bool		mail = strcmp(d->format, "mail") == 0;

	initStringInfo(&body);
	if (mail)
		MailBody(d, &body);
	else if (strcmp(d->format, "teams") == 0)
		TeamsBody(d, &body);
	else if (strcmp(d->format, "slack") == 0)
		SlackBody(d, &body);
	else
		JsonBody(d, &body);
	d->body = body.data;
	d->body_len = body.len;

	d->easy = h = curl_easy_init();
	if (h == NULL)
		ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
	curl_easy_setopt(h, CURLOPT_PRIVATE, d);
	curl_easy_setopt(h, CURLOPT_URL, d->url);
	curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, mail ? "smtp,smtps" : "http,https");
	curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 0L);
	curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, (long) ciflow_settings.connect_timeout_ms);
	curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, (long) ciflow_settings.request_timeout_ms);
	curl_easy_setopt(h, CURLOPT_SSL_VERIFYPEER, 1L);
	curl_easy_setopt(h, CURLOPT_SSL_VERIFYHOST, 2L);
	if (d->ca_file)
		curl_easy_setopt(h, CURLOPT_CAINFO, d->ca_file);
	curl_easy_setopt(h, CURLOPT_ERRORBUFFER, d->errbuf);
	curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, KeepAnswer);
	curl_easy_setopt(h, CURLOPT_WRITEDATA, d);

	if (mail)
	{
		char	   *addr = pstrdup(d->mail_to);
		char	   *tok;
		char	   *save;

		for (tok = strtok_r(addr, "\n", &save); tok; tok = strtok_r(NULL, "\n", &save))
			d->rcpt = AppendHeader(d->rcpt, psprintf("<%s>", tok));
		curl_easy_setopt(h, CURLOPT_MAIL_FROM, psprintf("<%s>", d->mail_from));
		curl_easy_setopt(h, CURLOPT_MAIL_RCPT, d->rcpt);
		curl_easy_setopt(h, CURLOPT_UPLOAD, 1L);
		curl_easy_setopt(h, CURLOPT_READFUNCTION, ReadMail);
		curl_easy_setopt(h, CURLOPT_READDATA, d);
		curl_easy_setopt(h, CURLOPT_INFILESIZE_LARGE, (curl_off_t) d->body_len);

		/*
		 * smtp:// upgrades whenever the server offers STARTTLS; it must when
		 * require_tls is set or when credentials would go over the line.
		 */
		if (pg_strncasecmp(d->url, "smtp:", 5) == 0)
			curl_easy_setopt(h, CURLOPT_USE_SSL,
							 (d->require_tls || d->username) ? (long) CURLUSESSL_ALL :
							 (long) CURLUSESSL_TRY);
		if (d->username)
		{
			curl_easy_setopt(h, CURLOPT_USERNAME, d->username);
			curl_easy_setopt(h, CURLOPT_PASSWORD, d->password ? d->password : "");
		}
	}
	else
	{
		d->headers = AppendHeader(d->headers, "Content-Type: application/json");
		d->headers = AppendHeader(d->headers, psprintf("Idempotency-Key: " INT64_FORMAT, d->event_id));
		d->headers = AppendHeader(d->headers, psprintf("X-Ciflow-Event: %s", d->kind));
		d->headers = AppendHeader(d->headers, "Expect:");
		if (d->secret)
			d->headers = AppendHeader(d->headers, SignatureHeader(d->secret, d->body, d->body_len));
		curl_easy_setopt(h, CURLOPT_HTTPHEADER, d->headers);
		curl_easy_setopt(h, CURLOPT_USERAGENT, "ciflow/0.2");
		curl_easy_setopt(h, CURLOPT_POST, 1L);
		curl_easy_setopt(h, CURLOPT_POSTFIELDS, d->body);
		curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE, (long) d->body_len);
	}
}

static void
WipeSecrets(Delivery *d)
{
	CiflowFreeSecret(d->secret);
	CiflowFreeSecret(d->password);
	d->secret = NULL;
	d->password = NULL;
}

static void
FreeTransfer(Pass *pass, Delivery *d)
{
	if (d->easy)
	{
		if (pass->multi)
			curl_multi_remove_handle(pass->multi, d->easy);
		curl_easy_cleanup(d->easy);
		d->easy = NULL;
	}
	curl_slist_free_all(d->headers);
	curl_slist_free_all(d->rcpt);
	d->headers = NULL;
	d->rcpt = NULL;
	WipeSecrets(d);
}

/* Printable ASCII only: last_error must be valid in any database encoding. */
static char *
Printable(const char *s, size_t len)
{
	char	   *out = palloc(len + 1);
	size_t		i;

	for (i = 0; i < len; i++)
		out[i] = (s[i] >= ' ' && s[i] < 0x7f) ? s[i] : ' ';
	out[len] = '\0';
	return out;
}

/* Classifies an ended transfer and records it (in the open transaction). */
static void
RecordOutcome(Delivery *d)
{
	bool		mail = strcmp(d->format, "mail") == 0;
	long		code = 0;
	const char *status;
	char	   *error = NULL;
	bool		retry = false;
	double		delay_s = 0;
	Datum		values[5];
	char		nulls[5] = {' ', ' ', ' ', ' ', ' '};

	curl_easy_getinfo(d->easy, CURLINFO_RESPONSE_CODE, &code);
	if (d->rc == CURLE_OK && (mail || (code >= 200 && code < 300)))
		status = "delivered";
	else
	{
		if (d->rc == CURLE_OK)
		{
			error = psprintf("HTTP %ld%s%s", code, d->answer_len ? ": " : "",
							 Printable(d->answer, d->answer_len));
			retry = code >= 500 || code == 408 || code == 429;
		}
		else
		{
			const char *what = d->rc == CURLE_OPERATION_TIMEDOUT ? "timed out" :
			d->rc == CURLE_LOGIN_DENIED ? "SMTP authentication failed" :
			mail && code > 0 ? psprintf("SMTP %ld", code) : "transport failure";
			const char *words = d->errbuf[0] ? d->errbuf : curl_easy_strerror(d->rc);

			error = psprintf("%s: %s", what, Printable(words, strlen(words)));

			/*
			 * An SMTP 5xx reply and rejected credentials are final; 4xx and
			 * transport failures are not.  libcurl keeps the reply before a
			 * failed AUTH (334), which would mislead: none is recorded.
			 */
			if (d->rc == CURLE_LOGIN_DENIED)
				code = 0;
			retry = !(mail && code >= 500) && d->rc != CURLE_LOGIN_DENIED;
		}
		if (retry && d->attempts < ciflow_settings.delivery_max_attempts)
		{
			int64		wait_ms = -1;

			if (!mail && (code == 429 || code == 503))
			{
				struct curl_header *hdr;

				if (curl_easy_header(d->easy, "Retry-After", 0, CURLH_HEADER, -1, &hdr) == CURLHE_OK)
					wait_ms = CiflowRetryAfterMs(hdr->value);
				if (wait_ms > (int64) ciflow_settings.max_retry_after_s * 1000)
					wait_ms = (int64) ciflow_settings.max_retry_after_s * 1000;
			}
			if (wait_ms < 0)
				wait_ms = CiflowBackoffMs(d->attempts);
			delay_s = wait_ms / 1000.0;
			status = "pending";
		}
		else
			status = "failed";
	}

	values[0] = Int64GetDatum(d->id);
	values[1] = CStringGetTextDatum(status);
	values[2] = Int32GetDatum((int32) code);
	nulls[2] = code > 0 ? ' ' : 'n';
	values[3] = error ? CStringGetTextDatum(error) : (Datum) 0;
	nulls[3] = error ? ' ' : 'n';
	values[4] = Float8GetDatum(delay_s);
	(void) CiflowCatalogExecute(&record, values, nulls, NULL, NULL);
}

/* The claimed row as a Delivery, with its sink's secrets. */
static Delivery *
ReadClaimed(HeapTuple tup, TupleDesc desc)
{
	Delivery   *d = palloc0(sizeof(Delivery));
	bool		isnull;
	List	   *rows;
	TupleDesc	sdesc;

	d->id = DatumGetInt64(CiflowCatalogDatum(tup, desc, "id", &isnull));
	d->event_id = DatumGetInt64(CiflowCatalogDatum(tup, desc, "event_id", &isnull));
	d->attempts = DatumGetInt32(CiflowCatalogDatum(tup, desc, "attempts", &isnull));
	d->require_tls = DatumGetBool(CiflowCatalogDatum(tup, desc, "require_tls", &isnull));
	d->sink = CiflowCatalogText(tup, desc, "sink");
	d->url = CiflowCatalogText(tup, desc, "url");
	d->format = CiflowCatalogText(tup, desc, "format");
	d->mail_from = CiflowCatalogText(tup, desc, "mail_from");
	d->mail_to = CiflowCatalogText(tup, desc, "mail_to");
	d->username = CiflowCatalogText(tup, desc, "username");
	d->ca_file = CiflowCatalogText(tup, desc, "ca_file");
	d->kind = CiflowCatalogText(tup, desc, "kind");
	d->connection = CiflowCatalogText(tup, desc, "connection");
	d->subject = CiflowCatalogText(tup, desc, "subject");
	d->created_at = CiflowCatalogText(tup, desc, "created_at");
	d->payload = CiflowCatalogText(tup, desc, "payload");
	heap_freetuple(tup);

	rows = CiflowCatalogLookup("sink_secrets", "sink", d->sink, &sdesc);
	if (rows != NIL)
	{
		HeapTuple	stup = linitial(rows);

		d->secret = CiflowCatalogText(stup, sdesc, "secret");
		d->password = CiflowCatalogText(stup, sdesc, "password");
		/* The copy held the secrets too. */
		explicit_bzero(stup->t_data, stup->t_len);
		heap_freetuple(stup);
	}
	return d;
}

/* Reset callback of the pass's context: no secret outlives the pass. */
static void
WipePass(void *arg)
{
	Pass	   *pass = (Pass *) arg;
	int			i;

	for (i = 0; i < MAX_CONCURRENT; i++)
	{
		if (pass->slots[i])
		{
			FreeTransfer(pass, pass->slots[i]);
			pass->slots[i] = NULL;
		}
	}
	if (pass->multi)
		curl_multi_cleanup(pass->multi);
	pass->multi = NULL;
}

/*
 * Transaction boundaries of a pass.  Either way the pass's own context is
 * current afterwards: what it reads must outlive the transaction.
 */
static void
PassBegin(Pass *pass, bool own_transactions)
{
	if (own_transactions)
	{
		SetCurrentStatementStartTimestamp();
		StartTransactionCommand();
		PushActiveSnapshot(GetTransactionSnapshot());
	}
	MemoryContextSwitchTo(pass->cxt);
}

static void
PassCommit(Pass *pass, bool own_transactions)
{
	if (own_transactions)
	{
		PopActiveSnapshot();
		CommitTransactionCommand();
	}
	else
		SPI_commit();
	MemoryContextSwitchTo(pass->cxt);
}

/*
 * In one short transaction: records the ended transfers, then claims due
 * heads into the free slots.  Returns how many it claimed.
 */
static int
RecordAndClaim(Pass *pass, bool own_transactions)
{
	int			claimed = 0;
	int			i;
	double		lease_s = (ciflow_settings.connect_timeout_ms +
						   ciflow_settings.request_timeout_ms) / 1000.0 + 60.0;

	PassBegin(pass, own_transactions);
	for (i = 0; i < MAX_CONCURRENT; i++)
	{
		Delivery   *d = pass->slots[i];

		if (d && d->done)
		{
			RecordOutcome(d);
			FreeTransfer(pass, d);
			pass->slots[i] = NULL;
			pass->nrunning--;
		}
	}
	for (i = 0; i < MAX_CONCURRENT && pass->ntried < PASS_LIMIT; i++)
	{
		Datum		values[2];
		Datum	   *ids;
		HeapTuple	tup;
		TupleDesc	desc;
		int			j;

		if (pass->slots[i] != NULL)
			continue;
		ids = palloc(sizeof(Datum) * Max(pass->ntried, 1));
		for (j = 0; j < pass->ntried; j++)
			ids[j] = Int64GetDatum(pass->tried[j]);
		values[0] = Float8GetDatum(lease_s);
		values[1] = PointerGetDatum(construct_array(ids, pass->ntried, INT8OID, 8,
													FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
		if (CiflowCatalogExecute(&claim, values, NULL, &tup, &desc) == 0 || tup == NULL)
			break;
		pass->slots[i] = ReadClaimed(tup, desc);
		pass->tried[pass->ntried++] = pass->slots[i]->id;
		pass->nrunning++;
		claimed++;
	}
	PassCommit(pass, own_transactions);

	/* Only now, with nothing open, do the new transfers start. */
	for (i = 0; i < MAX_CONCURRENT; i++)
	{
		Delivery   *d = pass->slots[i];

		if (d && d->easy == NULL && !d->done)
		{
			PrepareTransfer(d);
			if (curl_multi_add_handle(pass->multi, d->easy) != CURLM_OK)
				ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
		}
	}
	return claimed;
}

void
CiflowDeliveryPass(bool own_transactions, int *attempted)
{
	MemoryContext cxt = AllocSetContextCreate(TopMemoryContext, "ciflow delivery pass",
											  ALLOCSET_DEFAULT_SIZES);
	MemoryContext old = MemoryContextSwitchTo(cxt);
	Pass	   *pass = palloc0(sizeof(Pass));
	MemoryContextCallback *cb = palloc(sizeof(MemoryContextCallback));

	pass->cxt = cxt;
	pass->tried = palloc(sizeof(int64) * PASS_LIMIT);
	cb->func = WipePass;
	cb->arg = pass;
	MemoryContextRegisterResetCallback(cxt, cb);

	PG_TRY();
	{
		pass->multi = curl_multi_init();
		if (pass->multi == NULL)
			ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
		(void) RecordAndClaim(pass, own_transactions);
		while (pass->nrunning > 0)
		{
			int			still;
			int			queued;
			CURLMsg    *msg;
			bool		ended = false;

			if (curl_multi_perform(pass->multi, &still) != CURLM_OK)
				elog(ERROR, "ciflow: curl_multi_perform failed");
			while ((msg = curl_multi_info_read(pass->multi, &queued)) != NULL)
			{
				Delivery   *d;

				if (msg->msg != CURLMSG_DONE)
					continue;
				curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **) &d);
				d->rc = msg->data.result;
				d->done = true;
				ended = true;
			}
			if (ended)
			{
				(void) RecordAndClaim(pass, own_transactions);
				continue;
			}
			(void) curl_multi_poll(pass->multi, NULL, 0, 100, NULL);
			CHECK_FOR_INTERRUPTS();
		}
	}
	PG_FINALLY();
	{
		*attempted = pass->ntried;
		MemoryContextSwitchTo(old);
		MemoryContextDelete(cxt);
	}
	PG_END_TRY();
}

/*
 * CALL ciflow.deliver(): one pass from SQL.  A procedure, called outside a
 * transaction block, so that it can commit between claiming, sending and
 * recording.
 */
Datum
ciflow_deliver(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[1];
	bool		nulls[1] = {false};
	int			attempted = 0;

	CiflowRefuseRestricted();
	if (fcinfo->context == NULL || !IsA(fcinfo->context, CallContext) ||
		((CallContext *) fcinfo->context)->atomic)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TRANSACTION_TERMINATION),
				 errmsg("ciflow.deliver must be called on its own, outside a transaction block"),
				 errdetail("A delivery pass commits between claiming, sending and recording, so that no transaction stays open while a sink answers."),
				 errhint("Run CALL ciflow.deliver() in autocommit mode.")));
	if (SPI_connect_ext(SPI_OPT_NONATOMIC) != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect_ext failed");
	CiflowDeliveryPass(false, &attempted);
	SPI_finish();

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "ciflow.deliver: return type must be a row type");
	values[0] = Int32GetDatum(attempted);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(tupdesc), values, nulls)));
}
