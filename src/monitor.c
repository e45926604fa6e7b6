/*-------------------------------------------------------------------------
 *
 * monitor.c
 *	  Monitoring passes (ciflow.poll) and thresholds (ciflow.add_threshold,
 *	  ciflow.drop_threshold): the six triggers of Customer Insights as
 *	  state transitions (customer-insights-api.md, part B).
 *
 *	  A pass makes a fixed number of calls whatever the number of subjects:
 *	  data sources (E6), jobs with tasks (E7), the workflow status (E7)
 *	  only when the jobs carry no tasks, and segments (E8) and measures
 *	  (E9) only when thresholds need them.  All calls come first,
 *	  through the one request path; a failed call raises before anything is
 *	  written.  Then, under a transaction-level advisory lock on the
 *	  connection (a concurrent pass waits, then compares with what the
 *	  first one committed), each subject's state row is locked, compared,
 *	  events are inserted by events.c (once per dedupe key, NOTIFY only for
 *	  new rows) and the state is updated, all in the caller's transaction.
 *	  No lock is held while a call is in flight.
 *
 *	  Statements go through catalog.c.  This file does not build the event
 *	  log's rows or notifications (events.c), and never talks to libcurl.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "fmgr.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"

#include "catalog.h"
#include "ciflow.h"
#include "ciflow_json.h"
#include "connection.h"
#include "events.h"
#include "http.h"
#include "monitor.h"
#include "odata.h"
#include "request.h"

CIFLOW_SQL_FUNCTION(ciflow_poll);
CIFLOW_SQL_FUNCTION(ciflow_add_threshold);
CIFLOW_SQL_FUNCTION(ciflow_drop_threshold);

/* B.1: jobs?includeTasks=true&top={job_window}. */
#define JOB_WINDOW 25

static CiflowCatalogStatement lock_connection = {
	.sql = "SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended("
	"'ciflow.poll ' OPERATOR(pg_catalog.||) $1, 0))",
	.nargs = 1,
	.types = {TEXTOID}
};

static CiflowCatalogStatement read_state = {
	.sql = "SELECT name, state, value::pg_catalog.text, remote_at, details::pg_catalog.text"
	" FROM ciflow.refresh_states WHERE connection OPERATOR(pg_catalog.=) $1"
	" AND kind OPERATOR(pg_catalog.=) $2 AND subject OPERATOR(pg_catalog.=) $3"
	" FOR UPDATE",
	.nargs = 3,
	.types = {TEXTOID, TEXTOID, TEXTOID}
};

static CiflowCatalogStatement write_state = {
	.sql = "INSERT INTO ciflow.refresh_states AS s (connection, kind, subject, name, state,"
	" value, remote_at, observed_at, details)"
	" VALUES ($1, $2, $3, $4, $5, $6::pg_catalog.numeric, $7, pg_catalog.clock_timestamp(),"
	" $8::pg_catalog.jsonb)"
	" ON CONFLICT (connection, kind, subject) DO UPDATE SET name = excluded.name,"
	" state = excluded.state, value = excluded.value, remote_at = excluded.remote_at,"
	" observed_at = excluded.observed_at, details = excluded.details",
	.nargs = 8,
	.types = {TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TIMESTAMPTZOID, TEXTOID}
};

static CiflowCatalogStatement read_threshold = {
	.sql = "SELECT above::pg_catalog.text, last_value::pg_catalog.text, last_evaluated_at,"
	" enabled, value_key, connection FROM ciflow.thresholds"
	" WHERE id OPERATOR(pg_catalog.=) $1 FOR UPDATE",
	.nargs = 1,
	.types = {INT8OID}
};

static CiflowCatalogStatement accept_threshold = {
	.sql = "UPDATE ciflow.thresholds SET last_value = $2::pg_catalog.numeric,"
	" last_evaluated_at = $3 WHERE id OPERATOR(pg_catalog.=) $1",
	.nargs = 3,
	.types = {INT8OID, TEXTOID, TIMESTAMPTZOID}
};

static CiflowCatalogStatement disable_threshold = {
	.sql = "UPDATE ciflow.thresholds SET enabled = false WHERE id OPERATOR(pg_catalog.=) $1",
	.nargs = 1,
	.types = {INT8OID}
};

static CiflowCatalogStatement insert_threshold = {
	.sql = "INSERT INTO ciflow.thresholds (connection, kind, subject, above, value_key,"
	" last_value, last_evaluated_at, created_by)"
	" VALUES ($1, $2, $3, $4::pg_catalog.numeric, $5, $6::pg_catalog.numeric, $7, $8)"
	" RETURNING id",
	.nargs = 8,
	.types = {TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TIMESTAMPTZOID, NAMEOID}
};

static CiflowCatalogStatement delete_threshold = {
	.sql = "DELETE FROM ciflow.thresholds WHERE id OPERATOR(pg_catalog.=) $1",
	.nargs = 1,
	.types = {INT8OID}
};

/* A remote timestamp: the service's text, and its value when it parses. */
typedef struct RemoteTime
{
	const char *text;			/* verbatim, NULL when absent */
	bool		valid;
	TimestampTz value;
} RemoteTime;

/* A row of ciflow.refresh_states as a pass compares it. */
typedef struct StoredState
{
	bool		found;
	char	   *state;
	char	   *value;			/* numeric as text, or NULL */
	bool		remote_valid;
	TimestampTz remote_at;
	json_t	   *details;
} StoredState;

/* A threshold, as read before the calls and locked after them. */
typedef struct Threshold
{
	int64		id;
	char	   *kind;
	char	   *subject;
	char	   *value_key;		/* measures: resolved when added */
} Threshold;

/* What one pass works with. */
typedef struct Pass
{
	CiflowConnection *conn;
	const char *failmsg;
	List	   *events;			/* new rows of ciflow.events */
	TupleDesc	desc;
} Pass;

/* ---------- small helpers ---------- */

static bool
StrEqualCI(const char *a, const char *b)
{
	return a != NULL && b != NULL && pg_strcasecmp(a, b) == 0;
}

/*
 * The service spells enums lowerCamel or PascalCase (A.1); ciflow stores
 * one spelling: lowerCamel, or PascalCase where the contract uses it.
 */
static char *
CanonEnum(const char *s, bool pascal)
{
	char	   *c;

	if (s == NULL)
		return NULL;
	c = pstrdup(s);
	if (c[0] >= 'A' && c[0] <= 'Z' && !pascal)
		c[0] += 'a' - 'A';
	else if (c[0] >= 'a' && c[0] <= 'z' && pascal)
		c[0] -= 'a' - 'A';
	return c;
}

static bool
IsDigits(const char *s, int n)
{
	int			i;

	for (i = 0; i < n; i++)
		if (s[i] < '0' || s[i] > '9')
			return false;
	return true;
}

/*
 * Parses an ISO 8601 timestamp with a zone (7 fractional digits are
 * rounded to microseconds).  Anything else is "no timestamp", not an
 * error: a hostile value must not stop every later pass.
 */
static RemoteTime
ParseRemoteTime(const char *s)
{
	RemoteTime	t = {s, false, 0};
	MemoryContext cxt = CurrentMemoryContext;

	if (s == NULL || strlen(s) < 20 || strlen(s) > 40 ||
		!IsDigits(s, 4) || s[4] != '-' || !IsDigits(s + 5, 2) || s[7] != '-' ||
		!IsDigits(s + 8, 2) || s[10] != 'T' || !IsDigits(s + 11, 2) || s[13] != ':' ||
		!IsDigits(s + 14, 2) || s[16] != ':' || !IsDigits(s + 17, 2) ||
		strspn(s + 19, "0123456789.:+-Z") != strlen(s + 19))
		return t;

	/* The shape is checked; a month 13 still fails, and is caught here. */
	PG_TRY();
	{
		t.value = DatumGetTimestampTz(DirectFunctionCall3(timestamptz_in,
														  CStringGetDatum(s),
														  ObjectIdGetDatum(InvalidOid),
														  Int32GetDatum(-1)));
		t.valid = true;
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		FlushErrorState();
		t.valid = false;
	}
	PG_END_TRY();
	return t;
}

/* A decimal number without separators, NaN or infinities, or NULL. */
static char *
NumericText(const char *s)
{
	const char *p = s;
	int			digits = 0;

	if (s == NULL || strlen(s) > 1000)
		return NULL;
	if (*p == '+' || *p == '-')
		p++;
	while (*p >= '0' && *p <= '9')
		p++, digits++;
	if (*p == '.')
		for (p++; *p >= '0' && *p <= '9'; p++)
			digits++;
	if (digits == 0)
		return NULL;
	if (*p == 'e' || *p == 'E')
	{
		int			exp_digits = 0;

		p++;
		if (*p == '+' || *p == '-')
			p++;
		while (*p >= '0' && *p <= '9')
			p++, exp_digits++;
		if (exp_digits == 0 || exp_digits > 3)
			return NULL;
	}
	if (*p != '\0')
		return NULL;
	/* Canonical text: numeric's own output. */
	return DatumGetCString(DirectFunctionCall1(numeric_out,
											   DirectFunctionCall3(numeric_in,
																   CStringGetDatum(s),
																   ObjectIdGetDatum(InvalidOid),
																   Int32GetDatum(-1))));
}

/* A JSON integer or numeric string as numeric text, or NULL. */
static char *
JsonNumericText(json_t *v)
{
	if (json_is_integer(v))
		return psprintf("%" JSON_INTEGER_FORMAT, json_integer_value(v));
	if (json_is_string(v))
		return NumericText(json_string_value(v));
	return NULL;
}

static int
NumericCompare(const char *a, const char *b)
{
	Datum		da = DirectFunctionCall3(numeric_in, CStringGetDatum(a),
										 ObjectIdGetDatum(InvalidOid), Int32GetDatum(-1));
	Datum		db = DirectFunctionCall3(numeric_in, CStringGetDatum(b),
										 ObjectIdGetDatum(InvalidOid), Int32GetDatum(-1));

	return DatumGetInt32(DirectFunctionCall2(numeric_cmp, da, db));
}

/* A remote time's part of a dedupe key: microseconds, whatever its spelling. */
static char *
TimeKey(const RemoteTime *t)
{
	return t->valid ? psprintf(INT64_FORMAT, (int64) t->value) : pstrdup("none");
}

static json_t *
Member(json_t *obj, const char *key)
{
	return json_is_object(obj) ? json_object_get(obj, key) : NULL;
}

/* ---------- the calls ---------- */

static void
RequireCustomerInsights(const CiflowConnection *conn)
{
	if (conn->flavor != CIFLOW_FLAVOR_CUSTOMER_INSIGHTS || conn->instance_id == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("connection \"%s\" cannot be monitored", conn->name),
				 errdetail("Refresh states, jobs, segments and measures are read from a Customer Insights instance."),
				 errhint("Use a connection of flavor customer_insights with an instance_id.")));
}

/*
 * One GET of the instance's management API; must answer a JSON array.
 * E6 and E7 name a second address for their documented form: asked only
 * when the first answers 404.
 */
static json_t *
FetchWithFallback(const CiflowConnection *conn, const char *path, const char *fallback,
				  const char *failmsg)
{
	CiflowRequest req;
	CiflowResponse resp;
	json_t	   *root;

	memset(&req, 0, sizeof(req));
	req.conn = conn;
	req.url = CiflowInstanceUrl(conn, path);
	req.api_call = true;
	req.failmsg = failmsg;
	req.return_refusal = fallback != NULL;
	resp = CiflowRequestPerform(&req);
	if (resp.status == 404)
	{
		path = fallback;
		req.url = CiflowInstanceUrl(conn, path);
		req.return_refusal = false;
		resp = CiflowRequestPerform(&req);
	}
	else if (resp.status >= 400)
		CiflowRaiseRefusal(&req, &resp);
	root = CiflowParseJson(resp.body, resp.len, failmsg);
	pfree(resp.body);
	if (!json_is_array(root))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_JSON_TEXT),
				 errmsg("%s", failmsg),
				 errdetail("The answer of %s is not a JSON array.", path)));
	return root;
}

static json_t *
Fetch(const CiflowConnection *conn, const char *path, const char *failmsg)
{
	return FetchWithFallback(conn, path, NULL, failmsg);
}

/* The element of a list (E8, E9) whose "name" is name, or NULL. */
static json_t *
FindByName(json_t *list, const char *name)
{
	size_t		i;

	for (i = 0; i < json_array_size(list); i++)
	{
		json_t	   *e = json_array_get(list, i);
		const char *n = CiflowJsonString(e, "name");

		if (n && strcmp(n, name) == 0)
			return e;
	}
	return NULL;
}

/* "a, b, c" from the names of a list, for a HINT (at most 20). */
static char *
NameList(json_t *list)
{
	StringInfoData buf;
	size_t		i;

	initStringInfo(&buf);
	for (i = 0; i < json_array_size(list) && i < 20; i++)
	{
		const char *n = CiflowJsonString(json_array_get(list, i), "name");

		if (n)
			appendStringInfo(&buf, "%s%s", buf.len ? ", " : "", n);
	}
	return buf.len ? buf.data : pstrdup("(none)");
}

/* ---------- states ---------- */

static StoredState
ReadState(Pass *pass, const char *kind, const char *subject)
{
	StoredState st;
	Datum		values[3];
	HeapTuple	tup;
	TupleDesc	desc;
	bool		isnull;
	Datum		d;

	memset(&st, 0, sizeof(st));
	values[0] = CStringGetTextDatum(pass->conn->name);
	values[1] = CStringGetTextDatum(kind);
	values[2] = CStringGetTextDatum(subject);
	if (CiflowCatalogExecute(&read_state, values, NULL, &tup, &desc) == 0 || tup == NULL)
		return st;
	st.found = true;
	d = heap_getattr(tup, 2, desc, &isnull);
	st.state = isnull ? NULL : TextDatumGetCString(d);
	d = heap_getattr(tup, 3, desc, &isnull);
	st.value = isnull ? NULL : TextDatumGetCString(d);
	d = heap_getattr(tup, 4, desc, &isnull);
	st.remote_valid = !isnull;
	st.remote_at = isnull ? 0 : DatumGetTimestampTz(d);
	d = heap_getattr(tup, 5, desc, &isnull);
	if (!isnull)
	{
		char	   *json = TextDatumGetCString(d);

		st.details = CiflowParseJson(json, strlen(json), pass->failmsg);
	}
	return st;
}

static void
WriteState(Pass *pass, const char *kind, const char *subject, const char *name,
		   const char *state, const char *value, const RemoteTime *remote,
		   const char *details)
{
	Datum		values[8];
	char		nulls[9] = "        ";

	values[0] = CStringGetTextDatum(pass->conn->name);
	values[1] = CStringGetTextDatum(kind);
	values[2] = CStringGetTextDatum(subject);
	values[3] = name ? CStringGetTextDatum(name) : (Datum) 0;
	nulls[3] = name ? ' ' : 'n';
	values[4] = state ? CStringGetTextDatum(state) : (Datum) 0;
	nulls[4] = state ? ' ' : 'n';
	values[5] = value ? CStringGetTextDatum(value) : (Datum) 0;
	nulls[5] = value ? ' ' : 'n';
	values[6] = remote->valid ? TimestampTzGetDatum(remote->value) : (Datum) 0;
	nulls[6] = remote->valid ? ' ' : 'n';
	values[7] = CStringGetTextDatum(details ? details : "{}");
	(void) CiflowCatalogExecute(&write_state, values, nulls, NULL, NULL);
}

/* An observation older than the stored one is a late answer: ignored. */
static bool
IsStale(const StoredState *st, const RemoteTime *t)
{
	return st->found && st->remote_valid && (!t->valid || t->value < st->remote_at);
}

static void
Record(Pass *pass, CiflowEvent *ev)
{
	HeapTuple	tup = CiflowEventInsert(ev, &pass->desc);

	if (tup != NULL)
		pass->events = lappend(pass->events, tup);
}

/* ---------- data sources (E6) ---------- */

/*
 * A data source's observation is the pair (refreshState, lastRefresh); a
 * changed pair whose state is updateFailed or updated is an event, even if
 * the refresh ran entirely between two passes.
 */
static void
ApplyDataSource(Pass *pass, json_t *item)
{
	json_t	   *md = Member(item, "dataSourceMetadata");
	const char *id = CiflowJsonString(md, "dataSourceId");
	const char *name = CiflowJsonString(md, "name");
	char	   *state = CanonEnum(CiflowJsonString(md, "refreshState"), false);
	RemoteTime	last = ParseRemoteTime(CiflowJsonString(md, "lastRefresh"));
	StoredState st;
	const char *kind = NULL;

	if (id == NULL)
		return;
	st = ReadState(pass, "datasource", id);
	if (IsStale(&st, &last))
		return;
	if (st.found &&
		(!StrEqualCI(st.state, state) || st.remote_valid != last.valid ||
		 (last.valid && last.value != st.remote_at)))
	{
		if (StrEqualCI(state, "updateFailed"))
			kind = "datasource_refresh_failed";
		else if (StrEqualCI(state, "updated"))
			kind = "datasource_refresh_succeeded";
	}
	if (kind)
	{
		CiflowEvent ev;

		CiflowEventInit(&ev, pass->conn->name, kind, id,
						psprintf("%s:%s:%s:%s", kind, pass->conn->name, id, TimeKey(&last)));
		CiflowEventAdd(&ev, "name", CIFLOW_FIELD_STRING, name);
		CiflowEventAdd(&ev, "refresh_state", CIFLOW_FIELD_STRING, state);
		CiflowEventAdd(&ev, "previous_state", CIFLOW_FIELD_STRING, st.state);
		CiflowEventAdd(&ev, "last_refresh", CIFLOW_FIELD_STRING, last.text);
		Record(pass, &ev);
	}
	WriteState(pass, "datasource", id, name, state, NULL, &last, NULL);
}

/* ---------- jobs (E7) ---------- */

static bool
IsTerminal(const char *status, const RemoteTime *ended)
{
	static const char *const terminal[] = {
		"successful", "failed", "timedOut", "aborted", "skipped", "deleted"
	};
	static const char *const active[] = {"queued", "needsUpdate", "running"};
	int			i;

	if (status == NULL)
		return false;
	for (i = 0; i < (int) lengthof(terminal); i++)
		if (StrEqualCI(status, terminal[i]))
			return true;
	for (i = 0; i < (int) lengthof(active); i++)
		if (StrEqualCI(status, active[i]))
			return false;
	/* An unknown status counts as final once the job has an end. */
	return ended->text != NULL;
}

/* A job as the triggers see it. */
typedef struct Job
{
	json_t	   *json;
	const char *id;
	const char *operation;
	char	   *status;
	char	   *submission_kind;
	char	   *job_type;
	RemoteTime	submitted;
	RemoteTime	ended;
	bool		terminal;
	json_t	   *steps[3];		/* map, match, merge tasks (or NULL) */
} Job;

static const char *const unification_steps[] = {"map", "match", "merge"};

static Job *
ReadJob(json_t *j)
{
	Job		   *job = palloc0(sizeof(Job));
	json_t	   *tasks = Member(j, "tasks");
	size_t		i;

	job->json = j;
	job->id = CiflowJsonString(j, "jobId");
	job->operation = CiflowJsonString(j, "operationType");
	job->status = CanonEnum(CiflowJsonString(j, "jobStatus"), false);
	job->submission_kind = CanonEnum(CiflowJsonString(j, "jobSubmissionKind"), false);
	job->job_type = CanonEnum(CiflowJsonString(j, "jobType"), false);
	job->submitted = ParseRemoteTime(CiflowJsonString(j, "submittedTimestamp"));
	job->ended = ParseRemoteTime(CiflowJsonString(j, "endTimestamp"));
	job->terminal = IsTerminal(job->status, &job->ended);
	for (i = 0; i < json_array_size(tasks); i++)
	{
		json_t	   *t = json_array_get(tasks, i);
		const char *op = CiflowJsonString(t, "operationType");
		int			s;

		for (s = 0; s < 3; s++)
			if (StrEqualCI(op, unification_steps[s]) && job->steps[s] == NULL)
				job->steps[s] = t;
	}
	return job;
}

static bool
HasUnification(const Job *job)
{
	return job->steps[0] || job->steps[1] || job->steps[2];
}

static char *
TaskStatus(json_t *task)
{
	return CanonEnum(CiflowJsonString(task, "taskStatus"), false);
}

static bool
TaskTerminal(json_t *task)
{
	RemoteTime	end = ParseRemoteTime(CiflowJsonString(task, "endTimestamp"));

	return task != NULL && IsTerminal(TaskStatus(task), &end);
}

/* The latest remote time of a job: when it ended, else when it was submitted. */
static const RemoteTime *
JobTime(const Job *job)
{
	return job->ended.valid ? &job->ended : &job->submitted;
}

static void
FireFullRefresh(Pass *pass, const Job *job)
{
	CiflowEvent ev;
	const char *kind = "full_refresh_completed";

	CiflowEventInit(&ev, pass->conn->name, kind, job->id,
					psprintf("%s:%s:%s", kind, pass->conn->name, job->id));
	CiflowEventAdd(&ev, "status", CIFLOW_FIELD_STRING, job->status);
	CiflowEventAdd(&ev, "submission_kind", CIFLOW_FIELD_STRING, job->submission_kind);
	CiflowEventAdd(&ev, "job_type", CIFLOW_FIELD_STRING, job->job_type);
	CiflowEventAdd(&ev, "submitted", CIFLOW_FIELD_STRING, job->submitted.text);
	CiflowEventAdd(&ev, "ended", CIFLOW_FIELD_STRING, job->ended.text);
	Record(pass, &ev);
}

/*
 * The payload of unification_refresh_completed; steps holds the map, match
 * and merge statuses (NULL when absent).
 */
static void
AddUnificationFields(CiflowEvent *ev, const char *operation, const char *status,
					 char *const steps[3], const char *submission_kind, const char *ended)
{
	StringInfoData buf;
	int			s;

	/* Statuses are the service's words: short in any sane answer, cut anyway. */
	initStringInfo(&buf);
	appendStringInfoChar(&buf, '{');
	for (s = 0; s < 3; s++)
	{
		appendStringInfo(&buf, "%s\"%s\":", s ? "," : "", unification_steps[s]);
		(void) CiflowAppendJsonString(&buf, steps[s], 64);
	}
	appendStringInfoChar(&buf, '}');
	CiflowEventAdd(ev, "operation_type", CIFLOW_FIELD_STRING, operation);
	CiflowEventAdd(ev, "status", CIFLOW_FIELD_STRING, status);
	CiflowEventAdd(ev, "steps", CIFLOW_FIELD_JSON, buf.data);
	CiflowEventAdd(ev, "submission_kind", CIFLOW_FIELD_STRING, submission_kind);
	CiflowEventAdd(ev, "ended", CIFLOW_FIELD_STRING, ended);
}

/*
 * B.2: the merge task's status once it is final; else (the chain stopped
 * early) the first step that did not succeed, in the order map, match;
 * else the job's.
 */
static void
FireUnification(Pass *pass, const Job *job)
{
	CiflowEvent ev;
	const char *kind = "unification_refresh_completed";
	const char *status = NULL;
	const char *ended = job->ended.text;
	char	   *step_status[3];
	int			s;

	if (TaskTerminal(job->steps[2]))
	{
		status = TaskStatus(job->steps[2]);
		ended = CiflowJsonString(job->steps[2], "endTimestamp");
	}
	for (s = 0; s < 2 && status == NULL; s++)
		if (job->steps[s] && !StrEqualCI(TaskStatus(job->steps[s]), "successful"))
			status = TaskStatus(job->steps[s]);
	if (status == NULL)
		status = job->status;

	for (s = 0; s < 3; s++)
		step_status[s] = job->steps[s] ? TaskStatus(job->steps[s]) : NULL;

	CiflowEventInit(&ev, pass->conn->name, kind, job->id,
					psprintf("%s:%s:%s", kind, pass->conn->name, job->id));
	AddUnificationFields(&ev, job->operation, status, step_status, job->submission_kind, ended);
	Record(pass, &ev);
}

static bool
DetailFlag(json_t *details, const char *key)
{
	return json_is_true(Member(details, key));
}

/*
 * A job's state row remembers which of its two events were reported, so
 * that neither comes again once the event log has been trimmed.  The
 * first job poll of a connection is a baseline: what is final then is
 * marked reported; later, a job that ended before the baseline is too.
 */
static bool
ApplyJob(Pass *pass, const Job *job, bool baseline_pass, const RemoteTime *baseline)
{
	StoredState st = ReadState(pass, "job", job->id);
	StringInfoData details;
	bool		full_done;
	bool		unification_done;
	bool		full_now;
	bool		unification_now;
	bool		silent;

	if (st.found && !StrEqualCI(st.state, job->status) &&
		IsTerminal(st.state, &job->ended) && !job->terminal)
		return false;			/* a late answer from before the end */

	full_done = DetailFlag(st.details, "full_reported");
	unification_done = DetailFlag(st.details, "unification_reported");
	silent = baseline_pass ||
		(!st.found && baseline->valid && job->ended.valid && job->ended.value < baseline->value);

	full_now = !full_done && StrEqualCI(job->operation, "all") && job->terminal;
	unification_now = !unification_done && HasUnification(job) &&
		(TaskTerminal(job->steps[2]) || job->terminal);
	if (full_now && !silent)
		FireFullRefresh(pass, job);
	if (unification_now && !silent)
		FireUnification(pass, job);

	initStringInfo(&details);
	appendStringInfoString(&details, "{\"submission_kind\":");
	(void) CiflowAppendJsonString(&details, job->submission_kind, -1);
	appendStringInfo(&details, ",\"full_reported\":%s,\"unification_reported\":%s}",
					 (full_done || full_now) ? "true" : "false",
					 (unification_done || unification_now) ? "true" : "false");
	WriteState(pass, "job", job->id, job->operation, job->status, NULL, JobTime(job),
			   details.data);
	return !st.found;
}

/* Oldest first, so that a pass's events come in the order the jobs ran. */
static int
CompareJobs(const ListCell *a, const ListCell *b)
{
	const Job  *ja = lfirst(a);
	const Job  *jb = lfirst(b);
	TimestampTz ta = ja->submitted.valid ? ja->submitted.value : 0;
	TimestampTz tb = jb->submitted.valid ? jb->submitted.value : 0;

	return (ta > tb) - (ta < tb);
}

static void
ApplyJobs(Pass *pass, json_t *list)
{
	StoredState base = ReadState(pass, "job_baseline", "");
	bool		baseline_pass = !base.found;
	RemoteTime	baseline = {NULL, base.remote_valid, base.remote_at};
	List	   *jobs = NIL;
	ListCell   *lc;
	size_t		i;
	int			fresh = 0;

	for (i = 0; i < json_array_size(list); i++)
	{
		Job		   *job = ReadJob(json_array_get(list, i));

		if (job->id == NULL)
			continue;
		jobs = lappend(jobs, job);
		/* The baseline: the latest time in the first listing. */
		if (baseline_pass && JobTime(job)->valid &&
			(!baseline.valid || JobTime(job)->value > baseline.value))
		{
			baseline.valid = true;
			baseline.value = JobTime(job)->value;
		}
	}
	list_sort(jobs, CompareJobs);
	if (baseline_pass)
		WriteState(pass, "job_baseline", "", NULL, NULL, NULL, &baseline, NULL);

	foreach(lc, jobs)
		fresh += ApplyJob(pass, lfirst(lc), baseline_pass, &baseline) ? 1 : 0;

	/* B.2: a full window of jobs never seen may hide some that ended unseen. */
	if (!baseline_pass && fresh >= JOB_WINDOW)
		ereport(WARNING,
				(errmsg("connection \"%s\": all %d jobs listed are new; some may have ended unseen",
						pass->conn->name, fresh),
				 errhint("Poll more often.")));
}

/*
 * B.2's fallback, for a service whose jobs never carry tasks: the merge
 * node of .../status, whose endTimestamp changes with a final taskStatus
 * at the end of each unification.
 */
static bool
JobsLackTasks(json_t *jobs)
{
	size_t		i;

	for (i = 0; i < json_array_size(jobs); i++)
		if (json_is_array(Member(json_array_get(jobs, i), "tasks")))
			return false;
	return json_array_size(jobs) > 0;
}

static void
ApplyStatusNodes(Pass *pass, json_t *nodes)
{
	char	   *steps[3] = {NULL, NULL, NULL};
	json_t	   *merge = NULL;
	size_t		i;
	int			s;
	const char *identifier;
	RemoteTime	ended;
	StoredState st;

	for (i = 0; i < json_array_size(nodes); i++)
	{
		json_t	   *node = json_array_get(nodes, i);

		for (s = 0; s < 3; s++)
			if (StrEqualCI(CiflowJsonString(node, "operationType"), unification_steps[s]) &&
				steps[s] == NULL)
			{
				steps[s] = TaskStatus(node);
				if (s == 2)
					merge = node;
			}
	}
	identifier = CiflowJsonString(merge, "identifier");
	if (identifier == NULL)
		return;
	ended = ParseRemoteTime(CiflowJsonString(merge, "endTimestamp"));
	st = ReadState(pass, "status", identifier);
	if (IsStale(&st, &ended))
		return;
	if (st.found && ended.valid && (!st.remote_valid || ended.value != st.remote_at) &&
		TaskTerminal(merge))
	{
		const char *kind = "unification_refresh_completed";
		CiflowEvent ev;

		CiflowEventInit(&ev, pass->conn->name, kind, identifier,
						psprintf("%s:%s:status:%s:%s", kind, pass->conn->name, identifier,
								 TimeKey(&ended)));
		AddUnificationFields(&ev, "merge", steps[2], steps, NULL, ended.text);
		Record(pass, &ev);
	}
	WriteState(pass, "status", identifier, "merge", steps[2], NULL, &ended, NULL);
}

/* ---------- segments (E8) and measures (E9) ---------- */

/* B.2: accepted when CompletedSuccess with a member count. */
static bool
SegmentObservation(json_t *seg, char **value, RemoteTime *time, char **status)
{
	json_t	   *es = Member(seg, "evaluationStatus");

	*status = CanonEnum(CiflowJsonString(es, "jobStatus"), true);
	*time = ParseRemoteTime(CiflowJsonString(es, "evaluationDate"));
	*value = JsonNumericText(Member(es, "entityCount"));
	return StrEqualCI(*status, "CompletedSuccess") && *value != NULL && time->valid;
}

/* isScalar not false and no dimensions. */
static bool
MeasureIsScalar(json_t *m)
{
	json_t	   *def = Member(m, "definition");

	return !json_is_false(Member(def, "isScalar")) &&
		json_array_size(Member(def, "dimensions")) == 0;
}

static json_t *
MeasureValues(json_t *m)
{
	return Member(Member(m, "output"), "values");
}

/*
 * The key of output.values a threshold reads: value_key, else the only
 * key, else the key equal to the measure's name (also while the measure
 * has no values yet); else, when raise is set, an error.
 */
static const char *
MeasureKey(json_t *m, const char *value_key, bool raise)
{
	json_t	   *values = MeasureValues(m);
	const char *name = CiflowJsonString(m, "name");
	StringInfoData keys;
	const char *k;
	json_t	   *v;

	if (value_key && (json_object_size(values) == 0 || Member(values, value_key)))
		return value_key;
	if (!value_key && json_object_size(values) == 1)
		return json_object_iter_key(json_object_iter(values));
	if (!value_key && (json_object_size(values) == 0 || Member(values, name)))
		return name;
	if (!raise)
		return NULL;
	initStringInfo(&keys);
	json_object_foreach(values, k, v)
		appendStringInfo(&keys, "%s%s", keys.len ? ", " : "", k);
	if (value_key)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("measure \"%s\" has no value \"%s\"", name, value_key),
				 errdetail("Its values are: %s.", keys.data),
				 errhint("Pass one of them as value_key.")));
	ereport(ERROR,
			(errcode(ERRCODE_AMBIGUOUS_PARAMETER),
			 errmsg("measure \"%s\" has several values and none is named after it", name),
			 errdetail("Its values are: %s.", keys.data),
			 errhint("Pass the one to watch as value_key => '...'.")));
	pg_unreachable();
}

/* B.2: accepted when completed with a decimal value; timed by output.evaluationTime, else endTime. */
static bool
MeasureObservation(json_t *m, const char *key, char **value, RemoteTime *time, char **state)
{
	json_t	   *le = Member(m, "latestEvaluation");
	const char *t = CiflowJsonString(Member(m, "output"), "evaluationTime");

	*state = CanonEnum(CiflowJsonString(le, "state"), false);
	*time = ParseRemoteTime(t ? t : CiflowJsonString(le, "endTime"));
	*value = key ? NumericText(CiflowJsonString(MeasureValues(m), key)) : NULL;
	return StrEqualCI(*state, "completed") && *value != NULL && time->valid;
}

/*
 * An accepted value of a threshold's subject: the first is a baseline; a
 * new one (other time or value, not older) fires when it crosses upward,
 * strictly, and re-arms when at or below.
 */
static void
ApplyThreshold(Pass *pass, const Threshold *thr, const char *value, const RemoteTime *time)
{
	Datum		values[3];
	HeapTuple	tup;
	TupleDesc	desc;
	bool		isnull;
	Datum		d;
	char	   *above;
	char	   *last = NULL;
	bool		segment = strcmp(thr->kind, "segment") == 0;

	values[0] = Int64GetDatum(thr->id);
	if (CiflowCatalogExecute(&read_threshold, values, NULL, &tup, &desc) == 0 || tup == NULL)
		return;					/* dropped meanwhile */
	if (!DatumGetBool(heap_getattr(tup, 4, desc, &isnull)))
		return;
	above = TextDatumGetCString(heap_getattr(tup, 1, desc, &isnull));
	d = heap_getattr(tup, 2, desc, &isnull);
	if (!isnull)
	{
		TimestampTz last_at;
		bool		last_at_null;

		last = TextDatumGetCString(d);
		last_at = DatumGetTimestampTz(heap_getattr(tup, 3, desc, &last_at_null));
		if (!last_at_null &&
			(time->value < last_at ||
			 (time->value == last_at && NumericCompare(value, last) == 0)))
			return;				/* older, or nothing new */
	}

	if (last != NULL && NumericCompare(last, above) <= 0 && NumericCompare(value, above) > 0)
	{
		const char *kind = segment ? "segment_threshold_exceeded" : "measure_threshold_exceeded";
		CiflowEventFieldType num = segment ? CIFLOW_FIELD_NUMBER : CIFLOW_FIELD_STRING;
		CiflowEvent ev;

		CiflowEventInit(&ev, pass->conn->name, kind, thr->subject,
						psprintf("%s:%s:" INT64_FORMAT ":%s", kind, pass->conn->name,
								 thr->id, TimeKey(time)));
		CiflowEventAdd(&ev, "threshold_id", CIFLOW_FIELD_NUMBER, psprintf(INT64_FORMAT, thr->id));
		if (!segment)
		{
			d = heap_getattr(tup, 5, desc, &isnull);
			CiflowEventAdd(&ev, "value_key", CIFLOW_FIELD_STRING,
						   isnull ? NULL : TextDatumGetCString(d));
		}
		CiflowEventAdd(&ev, "threshold", num, above);
		CiflowEventAdd(&ev, "previous", num, last);
		CiflowEventAdd(&ev, "value", num, value);
		CiflowEventAdd(&ev, "evaluated_at", CIFLOW_FIELD_STRING, time->text);
		Record(pass, &ev);
	}

	values[1] = CStringGetTextDatum(value);
	values[2] = TimestampTzGetDatum(time->value);
	(void) CiflowCatalogExecute(&accept_threshold, values, NULL, NULL, NULL);
}

static void
ApplySegment(Pass *pass, json_t *seg, List *thresholds)
{
	const char *name = CiflowJsonString(seg, "name");
	char	   *value;
	char	   *status;
	RemoteTime	time;
	bool		accepted = SegmentObservation(seg, &value, &time, &status);
	StoredState st;
	ListCell   *lc;

	if (name == NULL)
		return;
	st = ReadState(pass, "segment", name);
	if (IsStale(&st, &time))
		return;
	WriteState(pass, "segment", name, name, status, accepted ? value : st.value, &time, NULL);
	if (!accepted)
		return;
	foreach(lc, thresholds)
	{
		Threshold  *thr = lfirst(lc);

		if (strcmp(thr->kind, "segment") == 0 && strcmp(thr->subject, name) == 0)
			ApplyThreshold(pass, thr, value, &time);
	}
}

static void
ApplyMeasure(Pass *pass, json_t *m, List *thresholds)
{
	const char *name = CiflowJsonString(m, "name");
	char	   *value;
	char	   *state;
	RemoteTime	time;
	bool		accepted;
	StoredState st;
	ListCell   *lc;
	char	   *values_json;

	if (name == NULL)
		return;
	accepted = MeasureObservation(m, MeasureKey(m, NULL, false), &value, &time, &state);
	st = ReadState(pass, "measure", name);
	if (IsStale(&st, &time))
		return;
	values_json = json_is_object(MeasureValues(m)) ?
		json_dumps(MeasureValues(m), JSON_COMPACT | JSON_SORT_KEYS) : NULL;
	WriteState(pass, "measure", name, name, state, accepted ? value : st.value, &time,
			   values_json ? psprintf("{\"values\":%s}", values_json) : NULL);

	foreach(lc, thresholds)
	{
		Threshold  *thr = lfirst(lc);
		char	   *key;

		if (strcmp(thr->kind, "measure") != 0 || strcmp(thr->subject, name) != 0)
			continue;
		if (!MeasureIsScalar(m))
		{
			Datum		id = Int64GetDatum(thr->id);

			(void) CiflowCatalogExecute(&disable_threshold, &id, NULL, NULL, NULL);
			ereport(WARNING,
					(errmsg("threshold " INT64_FORMAT " on measure \"%s\" is disabled", thr->id, name),
					 errdetail("The measure has dimensions now; thresholds need a measure without dimensions."),
					 errhint("Drop it with ciflow.drop_threshold(" INT64_FORMAT ").", thr->id)));
			continue;
		}
		key = thr->value_key;
		if (MeasureObservation(m, key, &value, &time, &state))
			ApplyThreshold(pass, thr, value, &time);
	}
}

/* ---------- the pass ---------- */

/* The enabled thresholds of a connection (read before the calls, to choose them). */
static List *
LoadThresholds(const char *connection)
{
	TupleDesc	desc;
	List	   *rows = CiflowCatalogLookup("thresholds", "connection", connection, &desc);
	List	   *result = NIL;
	ListCell   *lc;

	foreach(lc, rows)
	{
		HeapTuple	tup = lfirst(lc);
		bool		isnull;
		Threshold  *thr;

		if (!DatumGetBool(CiflowCatalogDatum(tup, desc, "enabled", &isnull)))
			continue;
		thr = palloc0(sizeof(Threshold));
		thr->id = DatumGetInt64(CiflowCatalogDatum(tup, desc, "id", &isnull));
		thr->kind = CiflowCatalogText(tup, desc, "kind");
		thr->subject = CiflowCatalogText(tup, desc, "subject");
		thr->value_key = CiflowCatalogText(tup, desc, "value_key");
		result = lappend(result, thr);
	}
	return result;
}

static bool
NeedsKind(List *thresholds, const char *kind)
{
	ListCell   *lc;

	foreach(lc, thresholds)
		if (strcmp(((Threshold *) lfirst(lc))->kind, kind) == 0)
			return true;
	return false;
}

List *
CiflowMonitorPass(const char *connection, TupleDesc *desc)
{
	Pass		pass;
	List	   *thresholds;
	json_t	   *datasources;
	json_t	   *jobs;
	json_t	   *status = NULL;
	json_t	   *segments = NULL;
	json_t	   *measures = NULL;
	Datum		name;
	size_t		i;

	memset(&pass, 0, sizeof(pass));
	pass.conn = CiflowGetConnection(connection);
	RequireCustomerInsights(pass.conn);
	pass.failmsg = psprintf("could not poll connection \"%s\"", pass.conn->name);
	thresholds = LoadThresholds(pass.conn->name);

	/* Every call before any write: a failed call leaves no trace. */
	datasources = FetchWithFallback(pass.conn, "manage/datasources",
									"manage/datasources/v2", pass.failmsg);
	jobs = FetchWithFallback(pass.conn,
							 psprintf("workflows/main/jobs?includeTasks=true&top=%d", JOB_WINDOW),
							 psprintf("manage/workflows/main/jobs?includeTasks=true&top=%d",
									  JOB_WINDOW),
							 pass.failmsg);
	if (JobsLackTasks(jobs))
		status = FetchWithFallback(pass.conn, "workflows/main/status",
								   "manage/workflows/main/status", pass.failmsg);
	if (NeedsKind(thresholds, "segment"))
		segments = Fetch(pass.conn, "manage/segments", pass.failmsg);
	if (NeedsKind(thresholds, "measure"))
		measures = Fetch(pass.conn, "manage/measures", pass.failmsg);

	/*
	 * One pass of a connection at a time: a concurrent one waits here, and
	 * its statements (each with a fresh snapshot under READ COMMITTED) see
	 * what this one committed; under REPEATABLE READ they fail with a
	 * serialization error instead of reporting anything twice.
	 */
	name = CStringGetTextDatum(pass.conn->name);
	(void) CiflowCatalogExecute(&lock_connection, &name, NULL, NULL, NULL);

	for (i = 0; i < json_array_size(datasources); i++)
		ApplyDataSource(&pass, json_array_get(datasources, i));
	ApplyJobs(&pass, jobs);
	if (status)
		ApplyStatusNodes(&pass, status);
	for (i = 0; i < json_array_size(segments); i++)
		ApplySegment(&pass, json_array_get(segments, i), thresholds);
	for (i = 0; i < json_array_size(measures); i++)
		ApplyMeasure(&pass, json_array_get(measures, i), thresholds);

	*desc = pass.desc;
	return pass.events;
}

/* ---------- SQL functions ---------- */

/* ciflow.poll(connection) returns SETOF ciflow.events: the pass's new events. */
Datum
ciflow_poll(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	TupleDesc	desc = NULL;
	List	   *events;
	ListCell   *lc;

	CiflowRefuseRestricted();
	InitMaterializedSRF(fcinfo, 0);
	events = CiflowMonitorPass(CiflowTextArg(fcinfo, 0), &desc);
	foreach(lc, events)
	{
		Datum	   *values = palloc(desc->natts * sizeof(Datum));
		bool	   *nulls = palloc(desc->natts * sizeof(bool));

		heap_deform_tuple(lfirst(lc), desc, values, nulls);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

static void
RequireArg(FunctionCallInfo fcinfo, int n, const char *what)
{
	if (PG_ARGISNULL(n))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", what)));
}

/*
 * ciflow.add_threshold(connection, kind, name, above [, value_key]): checks
 * the subject with one call (E8 or E9) and keeps its current accepted
 * value as the baseline, so that a crossing between now and the next pass
 * is reported.
 */
Datum
ciflow_add_threshold(PG_FUNCTION_ARGS)
{
	CiflowConnection *conn;
	char	   *kind;
	char	   *name;
	Numeric		above;
	char	   *value_key;
	char	   *failmsg;
	json_t	   *list;
	json_t	   *subject;
	char	   *value = NULL;
	char	   *status;
	RemoteTime	time = {NULL, false, 0};
	bool		accepted;
	Datum		values[8];
	char		nulls[9] = "        ";
	HeapTuple	tup;
	TupleDesc	desc;
	bool		isnull;
	NameData	created_by;

	CiflowRefuseRestricted();
	RequireArg(fcinfo, 0, "connection");
	RequireArg(fcinfo, 1, "kind");
	RequireArg(fcinfo, 2, "name");
	RequireArg(fcinfo, 3, "above");
	kind = CiflowTextArg(fcinfo, 1);
	name = CiflowTextArg(fcinfo, 2);
	above = PG_GETARG_NUMERIC(3);
	value_key = CiflowTextArg(fcinfo, 4);
	if (strcmp(kind, "segment") != 0 && strcmp(kind, "measure") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("unknown threshold kind \"%s\"", kind),
				 errhint("Use 'segment' or 'measure'.")));
	if (numeric_is_nan(above) || numeric_is_inf(above))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("a threshold must be a finite number")));
	if (value_key && strcmp(kind, "segment") == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("value_key applies to measure thresholds only"),
				 errhint("A segment threshold watches its member count.")));

	conn = CiflowGetConnection(CiflowTextArg(fcinfo, 0));
	RequireCustomerInsights(conn);
	failmsg = psprintf("could not add a threshold on connection \"%s\"", conn->name);
	list = Fetch(conn, strcmp(kind, "segment") == 0 ? "manage/segments" : "manage/measures",
				 failmsg);
	subject = FindByName(list, name);
	if (subject == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("%s \"%s\" does not exist on connection \"%s\"", kind, name, conn->name),
				 errhint("The %ss of the instance are: %s.", kind, NameList(list))));
	if (strcmp(kind, "segment") == 0)
		accepted = SegmentObservation(subject, &value, &time, &status);
	else
	{
		if (!MeasureIsScalar(subject))
			ereport(ERROR,
					(errcode(ERRCODE_WRONG_OBJECT_TYPE),
					 errmsg("thresholds need a measure without dimensions"),
					 errdetail("Measure \"%s\" has dimensions; its values are rows of its output entity.", name),
					 errhint("Sync the measure's output entity and watch it with SQL instead.")));
		value_key = (char *) MeasureKey(subject, value_key, true);
		accepted = MeasureObservation(subject, value_key, &value, &time, &status);
	}

	namestrcpy(&created_by, GetUserNameFromId(GetUserId(), false));
	values[0] = CStringGetTextDatum(conn->name);
	values[1] = CStringGetTextDatum(kind);
	values[2] = CStringGetTextDatum(name);
	values[3] = DirectFunctionCall1(numeric_out, NumericGetDatum(above));
	values[3] = CStringGetTextDatum(DatumGetCString(values[3]));
	values[4] = value_key ? CStringGetTextDatum(value_key) : (Datum) 0;
	nulls[4] = value_key ? ' ' : 'n';
	values[5] = accepted ? CStringGetTextDatum(value) : (Datum) 0;
	nulls[5] = accepted ? ' ' : 'n';
	values[6] = accepted ? TimestampTzGetDatum(time.value) : (Datum) 0;
	nulls[6] = accepted ? ' ' : 'n';
	values[7] = NameGetDatum(&created_by);
	(void) CiflowCatalogExecute(&insert_threshold, values, nulls, &tup, &desc);
	PG_RETURN_INT64(DatumGetInt64(heap_getattr(tup, 1, desc, &isnull)));
}

/* ciflow.drop_threshold(id): by anyone who may use its connection. */
Datum
ciflow_drop_threshold(PG_FUNCTION_ARGS)
{
	Datum		id = PG_GETARG_DATUM(0);
	HeapTuple	tup;
	TupleDesc	desc;
	bool		isnull;

	CiflowRefuseRestricted();
	if (CiflowCatalogExecute(&read_threshold, &id, NULL, &tup, &desc) == 0 || tup == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("threshold " INT64_FORMAT " does not exist", DatumGetInt64(id)),
				 errhint("SELECT id FROM ciflow.thresholds lists them.")));
	(void) CiflowGetConnection(TextDatumGetCString(heap_getattr(tup, 6, desc, &isnull)));
	(void) CiflowCatalogExecute(&delete_threshold, &id, NULL, NULL, NULL);
	PG_RETURN_VOID();
}
