/*-------------------------------------------------------------------------
 *
 * jobs.c
 *	  Scheduled work: ciflow.schedule_sync, ciflow.watch, ciflow.unschedule
 *	  and ciflow.alter_job, the bookkeeping a job's run does in
 *	  ciflow.job_definitions (last run, failures and back-off, next run, the
 *	  event cursor of on_event jobs), and the cron parser.
 *
 *	  It owns the rows of ciflow.job_definitions and nothing else: it does
 *	  not start processes (launcher.c does) nor run syncs or polls
 *	  (syncworker.c does).  Every statement goes through catalog.c.
 *
 *	  Cron schedules are read as pg_cron reads them: five fields (minute,
 *	  hour, day of month, month, day of week) in UTC, each a list of
 *	  numbers, ranges and steps (star, a-b, star/n, a-b/n), month and day
 *	  names, and the names @yearly, @annually, @monthly, @weekly, @daily,
 *	  @midnight and @hourly.  When both day fields are restricted a day
 *	  matching either runs the job, as in cron.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <ctype.h>
#include <math.h>

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "common/pg_prng.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/timestamp.h"

#include "catalog.h"
#include "ciflow.h"
#include "connection.h"
#include "jobs.h"
#include "launcher.h"
#include "target.h"

CIFLOW_SQL_FUNCTION(ciflow_schedule_sync);
CIFLOW_SQL_FUNCTION(ciflow_watch);
CIFLOW_SQL_FUNCTION(ciflow_unschedule);
CIFLOW_SQL_FUNCTION(ciflow_alter_job);

/* The first back-off of a cron or on_event job that failed. */
#define BACKOFF_BASE_S 10.0

/* ---------- cron ---------- */

static const char *const month_names[] = {
	"jan", "feb", "mar", "apr", "may", "jun",
	"jul", "aug", "sep", "oct", "nov", "dec", NULL
};
static const char *const dow_names[] = {
	"sun", "mon", "tue", "wed", "thu", "fri", "sat", NULL
};

typedef struct CronField
{
	const char *name;
	int			lo;
	int			hi;
	const char *const *names;	/* names[i] is lo + i */
} CronField;

static const CronField cron_fields[5] = {
	{"minute", 0, 59, NULL},
	{"hour", 0, 23, NULL},
	{"day of month", 1, 31, NULL},
	{"month", 1, 12, month_names},
	{"day of week", 0, 7, dow_names},
};

/* A number or a name of the field at *p; advances *p; -1 if neither. */
static int
CronValue(const char **p, const CronField *f)
{
	if (isdigit((unsigned char) **p))
	{
		long		v = 0;

		while (isdigit((unsigned char) **p) && v < 1000)
			v = v * 10 + (*(*p)++ - '0');
		return (v < f->lo || v > f->hi) ? -1 : (int) v;
	}
	if (f->names)
	{
		int			i;

		for (i = 0; f->names[i]; i++)
		{
			if (pg_strncasecmp(*p, f->names[i], 3) == 0)
			{
				*p += 3;
				return f->lo + i;
			}
		}
	}
	return -1;
}

/* One field (a comma-separated list) into a bit mask; false if malformed. */
static bool
CronParseField(const char *text, const CronField *f, uint64 *mask)
{
	const char *p = text;

	*mask = 0;
	for (;;)
	{
		int			lo,
					hi,
					step = 1,
					v;

		if (*p == '*')
		{
			p++;
			lo = f->lo;
			hi = f->hi;
		}
		else
		{
			if ((lo = CronValue(&p, f)) < 0)
				return false;
			hi = lo;
			if (*p == '-')
			{
				p++;
				if ((hi = CronValue(&p, f)) < 0 || hi < lo)
					return false;
			}
		}
		if (*p == '/')
		{
			p++;
			if (!isdigit((unsigned char) *p))
				return false;
			step = 0;
			while (isdigit((unsigned char) *p) && step <= f->hi)
				step = step * 10 + (*p++ - '0');
			if (step < 1 || step > f->hi)
				return false;
			if (lo == hi)		/* "5/10": from 5 to the end */
				hi = f->hi;
		}
		for (v = lo; v <= hi; v += step)
			*mask |= UINT64CONST(1) << v;
		if (*p == '\0')
			return true;
		if (*p++ != ',')
			return false;
	}
}

bool
CiflowCronParse(const char *spec, CiflowCron *cron, char **error)
{
	static const struct
	{
		const char *name;
		const char *fields;
	}			nicknames[] = {
		{"@yearly", "0 0 1 1 *"},
		{"@annually", "0 0 1 1 *"},
		{"@monthly", "0 0 1 * *"},
		{"@weekly", "0 0 * * 0"},
		{"@daily", "0 0 * * *"},
		{"@midnight", "0 0 * * *"},
		{"@hourly", "0 * * * *"},
	};
	char	   *copy;
	char	   *fields[5];
	char	   *save;
	char	   *tok;
	int			n = 0;
	int			i;
	uint64		masks[5];

	memset(cron, 0, sizeof(*cron));
	while (isspace((unsigned char) *spec))
		spec++;
	if (spec[0] == '@')
	{
		for (i = 0; i < (int) lengthof(nicknames); i++)
		{
			if (pg_strcasecmp(spec, nicknames[i].name) == 0)
				return CiflowCronParse(nicknames[i].fields, cron, error);
		}
		*error = psprintf("\"%s\" is not one of @yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly", spec);
		return false;
	}
	copy = pstrdup(spec);
	for (tok = strtok_r(copy, " \t", &save); tok; tok = strtok_r(NULL, " \t", &save))
	{
		if (n == 5)
		{
			*error = pstrdup("a cron schedule has five fields");
			return false;
		}
		fields[n++] = tok;
	}
	if (n != 5)
	{
		*error = pstrdup("a cron schedule has five fields");
		return false;
	}
	for (i = 0; i < 5; i++)
	{
		if (!CronParseField(fields[i], &cron_fields[i], &masks[i]))
		{
			*error = psprintf("invalid %s field \"%s\"", cron_fields[i].name, fields[i]);
			return false;
		}
	}
	cron->minute = masks[0];
	cron->hour = (uint32) masks[1];
	cron->dom = (uint32) masks[2];
	cron->month = (uint32) masks[3];
	/* 7 is Sunday too */
	cron->dow = (uint32) ((masks[4] | (masks[4] >> 7)) & 0x7f);
	cron->dom_star = fields[2][0] == '*';
	cron->dow_star = fields[4][0] == '*';
	if (CiflowCronNext(cron, GetCurrentTimestamp()) == 0)
	{
		*error = pstrdup("the schedule names no date that exists");
		return false;
	}
	return true;
}

TimestampTz
CiflowCronNext(const CiflowCron *cron, TimestampTz after)
{
	TimestampTz t = after - after % USECS_PER_MINUTE + USECS_PER_MINUTE;
	int			iterations;

	/* Skips whole months, days and hours: a few thousand steps at most. */
	for (iterations = 0; iterations < 100000; iterations++)
	{
		struct pg_tm tm;
		fsec_t		fsec;
		bool		dom_ok,
					dow_ok;

		if (timestamp2tm(t, NULL, &tm, &fsec, NULL, NULL) != 0)
			return 0;
		if (!(cron->month & (1U << tm.tm_mon)))
		{
			tm.tm_mon++;
			if (tm.tm_mon > 12)
			{
				tm.tm_mon = 1;
				tm.tm_year++;
			}
			tm.tm_mday = 1;
			tm.tm_hour = tm.tm_min = tm.tm_sec = 0;
			if (tm2timestamp(&tm, 0, NULL, &t) != 0)
				return 0;
			continue;
		}
		dom_ok = (cron->dom & (1U << tm.tm_mday)) != 0;
		dow_ok = (cron->dow & (1U << j2day(date2j(tm.tm_year, tm.tm_mon, tm.tm_mday)))) != 0;
		if (!((cron->dom_star || cron->dow_star) ? (dom_ok && dow_ok) : (dom_ok || dow_ok)))
		{
			t = t - t % USECS_PER_DAY + USECS_PER_DAY;
			continue;
		}
		if (!(cron->hour & (1U << tm.tm_hour)))
		{
			t = t - t % USECS_PER_HOUR + USECS_PER_HOUR;
			continue;
		}
		if (!(cron->minute & (UINT64CONST(1) << tm.tm_min)))
		{
			t += USECS_PER_MINUTE;
			continue;
		}
		return t;
	}
	return 0;
}

static void
CheckCron(const char *spec, CiflowCron *cron)
{
	char	   *error;

	if (!CiflowCronParse(spec, cron, &error))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid cron schedule \"%s\"", spec),
				 errdetail("%s.", error),
				 errhint("Use five fields (minute hour day-of-month month day-of-week, in UTC) as pg_cron does, e.g. '15 2 * * *', or @hourly.")));
}

/* ---------- the catalog ---------- */

static CiflowCatalogStatement insert_job = {
	.sql = "INSERT INTO ciflow.job_definitions (kind, connection, entity, target_schema,"
	" target_table, mode, every, cron, on_event, on_subject, owner, next_run_at, event_cursor)"
	" VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,"
	" (SELECT COALESCE(pg_catalog.max(e.id), 0) FROM ciflow.events e))"
	" RETURNING id",
	.nargs = 12,
	.types = {TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, INTERVALOID,
	TEXTOID, TEXTOID, TEXTOID, REGROLEOID, TIMESTAMPTZOID}
};

static CiflowCatalogStatement read_job = {
	.sql = "SELECT owner, every, cron, on_event, consecutive_failures, last_started_at"
	" FROM ciflow.job_definitions WHERE id OPERATOR(pg_catalog.=) $1 FOR UPDATE",
	.nargs = 1,
	.types = {INT8OID}
};

static CiflowCatalogStatement delete_job = {
	.sql = "DELETE FROM ciflow.job_definitions WHERE id OPERATOR(pg_catalog.=) $1",
	.nargs = 1,
	.types = {INT8OID}
};

static CiflowCatalogStatement alter_job = {
	.sql = "UPDATE ciflow.job_definitions SET"
	" enabled = COALESCE($2, enabled), every = $3, cron = $4,"
	" next_run_at = COALESCE($5, next_run_at)"
	" WHERE id OPERATOR(pg_catalog.=) $1",
	.nargs = 5,
	.types = {INT8OID, BOOLOID, INTERVALOID, TEXTOID, TIMESTAMPTZOID}
};

static CiflowCatalogStatement next_job = {
	.sql = "SELECT j.id, j.kind, j.connection, j.entity, j.target_schema, j.target_table,"
	" j.mode, j.owner, j.on_event IS NOT NULL, COALESCE(e.id, 0),"
	" j.next_run_at IS NOT NULL,"
	" pg_catalog.date_part('epoch', j.next_run_at OPERATOR(pg_catalog.-) pg_catalog.clock_timestamp()),"
	" j.last_status OPERATOR(pg_catalog.=) 'running' AND j.run_pid IS NOT NULL"
	" AND EXISTS (SELECT 1 FROM pg_catalog.pg_stat_get_activity(j.run_pid))"
	" FROM ciflow.job_definitions j"
	" LEFT JOIN LATERAL (SELECT pg_catalog.min(ev.id) AS id FROM ciflow.events ev"
	"  WHERE j.on_event IS NOT NULL AND ev.connection OPERATOR(pg_catalog.=) j.connection"
	"  AND ev.kind OPERATOR(pg_catalog.=) j.on_event"
	"  AND (j.on_subject IS NULL OR ev.subject OPERATOR(pg_catalog.=) j.on_subject)"
	"  AND ev.id OPERATOR(pg_catalog.>) j.event_cursor) e ON true"
	" WHERE j.enabled AND j.id OPERATOR(pg_catalog.>) $1 ORDER BY j.id LIMIT 1",
	.nargs = 1,
	.types = {INT8OID}
};

static CiflowCatalogStatement begin_run = {
	.sql = "UPDATE ciflow.job_definitions SET last_status = 'running',"
	" last_started_at = pg_catalog.clock_timestamp(), last_finished_at = NULL,"
	" run_pid = pg_catalog.pg_backend_pid()"
	" WHERE id OPERATOR(pg_catalog.=) $1"
	" RETURNING EXISTS (SELECT 1 FROM pg_catalog.pg_authid a"
	"  WHERE a.oid OPERATOR(pg_catalog.=) owner)",
	.nargs = 1,
	.types = {INT8OID}
};

static CiflowCatalogStatement end_run = {
	.sql = "UPDATE ciflow.job_definitions SET last_status = $2, last_run_id = $3,"
	" last_error = $4, consecutive_failures = $5, next_run_at = $6,"
	" last_finished_at = pg_catalog.clock_timestamp(), run_pid = NULL,"
	" event_cursor = GREATEST(event_cursor, $7)"
	" WHERE id OPERATOR(pg_catalog.=) $1",
	.nargs = 7,
	.types = {INT8OID, TEXTOID, INT8OID, TEXTOID, INT4OID, TIMESTAMPTZOID, INT8OID}
};

/* Column n of a row as a C string, or NULL. */
static char *
ColumnText(HeapTuple tup, TupleDesc desc, int n)
{
	bool		isnull;
	Datum		d = heap_getattr(tup, n, desc, &isnull);

	return isnull ? NULL : TextDatumGetCString(d);
}

static TimestampTz
PlusInterval(TimestampTz t, Datum interval)
{
	return DatumGetTimestampTz(DirectFunctionCall2(timestamptz_pl_interval,
												   TimestampTzGetDatum(t), interval));
}

/* The job's row, locked, with its owner checked against the current role. */
static HeapTuple
LockOwnJob(int64 job_id, TupleDesc *desc)
{
	Datum		id = Int64GetDatum(job_id);
	HeapTuple	tup;
	bool		isnull;
	Oid			owner;

	if (CiflowCatalogExecute(&read_job, &id, NULL, &tup, desc) == 0)
		return NULL;
	owner = DatumGetObjectId(heap_getattr(tup, 1, *desc, &isnull));
	if (!has_privs_of_role(GetUserId(), owner))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for ciflow job " INT64_FORMAT, job_id),
				 errdetail("Only the role that scheduled a job (or a member of it) may change it.")));
	return tup;
}

static void
CheckEvery(Datum every)
{
	Interval   *iv = DatumGetIntervalP(every);

	if (iv->month < 0 || iv->day < 0 || iv->time < 0 ||
		(iv->month == 0 && iv->day == 0 && iv->time < USECS_PER_SEC))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("a job's interval must be at least one second")));
}

static const char *const event_kinds[] = {
	"datasource_refresh_failed", "datasource_refresh_succeeded",
	"segment_threshold_exceeded", "measure_threshold_exceeded",
	"full_refresh_completed", "unification_refresh_completed",
	"sync_succeeded", "sync_failed", NULL
};

/*
 * Records a job after checking its schedule (exactly one of every, cron,
 * on_event) and that its owner may use the connection now.
 */
static int64
InsertJob(bool watch, const char *connection, const char *entity,
		  const char *schema, const char *table, const char *mode,
		  FunctionCallInfo fcinfo, int every_arg, int cron_arg,
		  const char *on_event, const char *subject)
{
	Datum		values[12];
	char		nulls[13] = "            ";
	int			nschedules = 0;
	TimestampTz next = GetCurrentTimestamp();
	HeapTuple	tup;
	TupleDesc	desc;
	bool		isnull;
	int			i;

	nschedules += !PG_ARGISNULL(every_arg);
	nschedules += !PG_ARGISNULL(cron_arg);
	nschedules += on_event != NULL;
	if (nschedules != 1)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("a ciflow job needs exactly one schedule"),
				 errhint(watch ? "Pass every => interval or cron => text." :
						 "Pass one of every => interval, cron => text or on_event => kind.")));
	if (!PG_ARGISNULL(every_arg))
		CheckEvery(PG_GETARG_DATUM(every_arg));
	if (!PG_ARGISNULL(cron_arg))
	{
		CiflowCron cron;

		CheckCron(CiflowTextArg(fcinfo, cron_arg), &cron);
		next = CiflowCronNext(&cron, GetCurrentTimestamp());
	}
	if (on_event)
	{
		for (i = 0; event_kinds[i]; i++)
			if (strcmp(event_kinds[i], on_event) == 0)
				break;
		if (event_kinds[i] == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("unknown event kind \"%s\"", on_event),
					 errhint("Use one of the kinds of ciflow.events, e.g. 'full_refresh_completed'.")));
	}
	else if (subject != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("subject is only for on_event jobs")));
	(void) CiflowGetConnection(connection);
	CiflowLauncherCheckDatabase();

	values[0] = CStringGetTextDatum(watch ? "watch" : "sync");
	values[1] = CStringGetTextDatum(connection);
	values[2] = entity ? CStringGetTextDatum(entity) : (Datum) 0;
	values[3] = schema ? CStringGetTextDatum(schema) : (Datum) 0;
	values[4] = table ? CStringGetTextDatum(table) : (Datum) 0;
	values[5] = CStringGetTextDatum(mode);
	values[6] = PG_ARGISNULL(every_arg) ? (Datum) 0 : PG_GETARG_DATUM(every_arg);
	values[7] = PG_ARGISNULL(cron_arg) ? (Datum) 0 : PG_GETARG_DATUM(cron_arg);
	values[8] = on_event ? CStringGetTextDatum(on_event) : (Datum) 0;
	values[9] = subject ? CStringGetTextDatum(subject) : (Datum) 0;
	values[10] = ObjectIdGetDatum(GetUserId());
	values[11] = TimestampTzGetDatum(next);
	nulls[2] = entity ? ' ' : 'n';
	nulls[3] = schema ? ' ' : 'n';
	nulls[4] = table ? ' ' : 'n';
	nulls[6] = PG_ARGISNULL(every_arg) ? 'n' : ' ';
	nulls[7] = PG_ARGISNULL(cron_arg) ? 'n' : ' ';
	nulls[8] = on_event ? ' ' : 'n';
	nulls[9] = subject ? ' ' : 'n';
	nulls[11] = on_event ? 'n' : ' ';
	(void) CiflowCatalogExecute(&insert_job, values, nulls, &tup, &desc);
	CiflowLauncherWakeAtCommit();
	return DatumGetInt64(heap_getattr(tup, 1, desc, &isnull));
}

Datum
ciflow_schedule_sync(PG_FUNCTION_ARGS)
{
	char	   *connection = CiflowTextArg(fcinfo, 0);
	char	   *entity = CiflowTextArg(fcinfo, 1);
	char	   *mode = PG_ARGISNULL(6) ? "full" : CiflowTextArg(fcinfo, 6);
	char	   *schema;
	char	   *table;

	CiflowRefuseRestricted();
	if (connection == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("connection must not be null")));
	if (entity == NULL || entity[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("entity must not be null or empty")));
	if (strcmp(mode, "full") != 0 && strcmp(mode, "incremental") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid sync mode \"%s\"", mode),
				 errhint("Use 'full' or 'incremental'.")));
	/* The target is resolved now, with the scheduling role's search_path. */
	CiflowResolveTarget(connection, entity, CiflowTextArg(fcinfo, 7), &schema, &table);
	PG_RETURN_INT64(InsertJob(false, connection, entity, schema, table, mode,
							  fcinfo, 2, 3, CiflowTextArg(fcinfo, 4),
							  CiflowTextArg(fcinfo, 5)));
}

Datum
ciflow_watch(PG_FUNCTION_ARGS)
{
	char	   *connection = CiflowTextArg(fcinfo, 0);

	CiflowRefuseRestricted();
	if (connection == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("connection must not be null")));
	PG_RETURN_INT64(InsertJob(true, connection, NULL, NULL, NULL, "full",
							  fcinfo, 1, 2, NULL, NULL));
}

Datum
ciflow_unschedule(PG_FUNCTION_ARGS)
{
	int64		job_id = PG_GETARG_INT64(0);
	TupleDesc	desc;
	Datum		id = Int64GetDatum(job_id);

	CiflowRefuseRestricted();
	if (LockOwnJob(job_id, &desc) == NULL)
		PG_RETURN_BOOL(false);
	(void) CiflowCatalogExecute(&delete_job, &id, NULL, NULL, NULL);
	CiflowLauncherWakeAtCommit();
	PG_RETURN_BOOL(true);
}

/* ciflow.alter_job(id, enabled, every, cron): what is NULL is kept. */
Datum
ciflow_alter_job(PG_FUNCTION_ARGS)
{
	int64		job_id;
	TupleDesc	desc;
	HeapTuple	tup;
	Datum		values[5];
	char		nulls[6] = "     ";
	bool		on_event;
	bool		every_null,
				cron_null;

	CiflowRefuseRestricted();
	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("job_id must not be null")));
	job_id = PG_GETARG_INT64(0);
	if (!PG_ARGISNULL(2) && !PG_ARGISNULL(3))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("a ciflow job needs exactly one schedule"),
				 errhint("Pass every => interval or cron => text, not both.")));
	tup = LockOwnJob(job_id, &desc);
	if (tup == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("ciflow job " INT64_FORMAT " does not exist", job_id),
				 errhint("See ciflow.jobs.")));
	(void) heap_getattr(tup, 4, desc, &on_event);
	on_event = !on_event;
	if (on_event && (!PG_ARGISNULL(2) || !PG_ARGISNULL(3)))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("ciflow job " INT64_FORMAT " runs on events, not on a schedule", job_id),
				 errhint("Unschedule it and schedule a new job.")));

	values[0] = Int64GetDatum(job_id);
	values[1] = PG_ARGISNULL(1) ? (Datum) 0 : PG_GETARG_DATUM(1);
	nulls[1] = PG_ARGISNULL(1) ? 'n' : ' ';
	values[2] = heap_getattr(tup, 2, desc, &every_null);
	values[3] = heap_getattr(tup, 3, desc, &cron_null);
	values[4] = (Datum) 0;
	nulls[4] = 'n';				/* next_run_at is kept... */

	/* ...unless the schedule changes: a new one counts from now. */
	if (!PG_ARGISNULL(2))
	{
		CheckEvery(PG_GETARG_DATUM(2));
		values[2] = PG_GETARG_DATUM(2);
		values[4] = TimestampTzGetDatum(PlusInterval(GetCurrentTimestamp(), values[2]));
		every_null = false;
		cron_null = true;
		nulls[4] = ' ';
	}
	else if (!PG_ARGISNULL(3))
	{
		CiflowCron cron;

		CheckCron(CiflowTextArg(fcinfo, 3), &cron);
		values[3] = PG_GETARG_DATUM(3);
		values[4] = TimestampTzGetDatum(CiflowCronNext(&cron, GetCurrentTimestamp()));
		cron_null = false;
		every_null = true;
		nulls[4] = ' ';
	}
	nulls[2] = every_null ? 'n' : ' ';
	nulls[3] = cron_null ? 'n' : ' ';
	(void) CiflowCatalogExecute(&alter_job, values, nulls, NULL, NULL);
	CiflowLauncherWakeAtCommit();
	PG_RETURN_VOID();
}

/* ---------- the launcher's and the runs' bookkeeping ---------- */

bool
CiflowJobNext(int64 after_id, CiflowJob *job)
{
	Datum		arg = Int64GetDatum(after_id);
	HeapTuple	tup;
	TupleDesc	desc;
	bool		isnull;
	char	   *kind;

	if (CiflowCatalogExecute(&next_job, &arg, NULL, &tup, &desc) == 0)
		return false;
	job->id = DatumGetInt64(heap_getattr(tup, 1, desc, &isnull));
	kind = ColumnText(tup, desc, 2);
	job->watch = strcmp(kind, "watch") == 0;
	job->connection = ColumnText(tup, desc, 3);
	job->entity = ColumnText(tup, desc, 4);
	job->schema = ColumnText(tup, desc, 5);
	job->table = ColumnText(tup, desc, 6);
	job->mode = ColumnText(tup, desc, 7);
	job->owner = DatumGetObjectId(heap_getattr(tup, 8, desc, &isnull));
	job->on_event = DatumGetBool(heap_getattr(tup, 9, desc, &isnull));
	job->event_id = DatumGetInt64(heap_getattr(tup, 10, desc, &isnull));
	job->has_next = DatumGetBool(heap_getattr(tup, 11, desc, &isnull));
	job->wait_s = job->has_next ? DatumGetFloat8(heap_getattr(tup, 12, desc, &isnull)) : 0;
	job->running = DatumGetBool(heap_getattr(tup, 13, desc, &isnull)) && !isnull;
	return true;
}

bool
CiflowJobBegin(int64 job_id, bool *owner_exists)
{
	Datum		values[1];
	HeapTuple	tup;
	TupleDesc	desc;
	bool		isnull;

	values[0] = Int64GetDatum(job_id);
	if (CiflowCatalogExecute(&begin_run, values, NULL, &tup, &desc) == 0)
		return false;
	*owner_exists = DatumGetBool(heap_getattr(tup, 1, desc, &isnull));
	return true;
}

/*
 * The back-off after `failures` consecutive failures: doubling from base,
 * capped at ciflow.max_backoff, minus up to a quarter at random so that
 * jobs that failed together do not retry together.
 */
static double
BackoffSeconds(double base, int failures)
{
	double		delay = base * pow(2.0, Min(failures - 1, 30));

	delay = Min(delay, (double) ciflow_settings.max_backoff_s);
	return delay * (1.0 - 0.25 * pg_prng_double(&pg_global_prng_state));
}

void
CiflowJobEnd(int64 job_id, int64 run_id, int64 event_id, bool succeeded,
			 const char *error)
{
	Datum		id = Int64GetDatum(job_id);
	HeapTuple	tup;
	TupleDesc	desc;
	bool		every_null,
				cron_null,
				isnull;
	Datum		every,
				cron;
	int			failures;
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz started;
	TimestampTz next = 0;
	double		base = BACKOFF_BASE_S;
	Datum		values[7];
	char		nulls[8] = "       ";

	if (CiflowCatalogExecute(&read_job, &id, NULL, &tup, &desc) == 0)
		return;					/* unscheduled while it ran */
	every = heap_getattr(tup, 2, desc, &every_null);
	cron = heap_getattr(tup, 3, desc, &cron_null);
	failures = DatumGetInt32(heap_getattr(tup, 5, desc, &isnull));
	started = DatumGetTimestampTz(heap_getattr(tup, 6, desc, &isnull));
	if (isnull)
		started = now;

	if (!every_null)
	{
		Interval   *iv = DatumGetIntervalP(every);

		next = PlusInterval(started, every);
		base = (double) iv->time / USECS_PER_SEC + iv->day * 86400.0 +
			iv->month * 30.0 * 86400.0;
	}
	else if (!cron_null)
	{
		CiflowCron parsed;
		char	   *cron_error;

		if (CiflowCronParse(TextDatumGetCString(cron), &parsed, &cron_error))
			next = CiflowCronNext(&parsed, now);
	}

	failures = succeeded ? 0 : failures + 1;
	if (!succeeded)
	{
		TimestampTz not_before = now + (int64) (BackoffSeconds(base, failures) * USECS_PER_SEC);

		if (!cron_null)
		{
			CiflowCron parsed;
			char	   *cron_error;

			if (CiflowCronParse(TextDatumGetCString(cron), &parsed, &cron_error))
				next = CiflowCronNext(&parsed, not_before - USECS_PER_MINUTE);
		}
		else
			next = Max(next, not_before);
	}

	values[0] = id;
	values[1] = CStringGetTextDatum(succeeded ? "succeeded" : "failed");
	values[2] = Int64GetDatum(run_id);
	values[3] = error ? CStringGetTextDatum(error) : (Datum) 0;
	values[4] = Int32GetDatum(failures);
	values[5] = TimestampTzGetDatum(next);
	values[6] = Int64GetDatum(event_id);
	nulls[2] = run_id > 0 ? ' ' : 'n';
	nulls[3] = error ? ' ' : 'n';
	nulls[5] = next != 0 ? ' ' : 'n';
	(void) CiflowCatalogExecute(&end_run, values, nulls, NULL, NULL);
	CiflowLauncherWakeAtCommit();
}

/*
 * At the launcher's start: a job left running whose process is gone lost
 * its run (a launcher restarted alone leaves its children running).
 */
static CiflowCatalogStatement fail_interrupted_jobs = {
	.sql = "UPDATE ciflow.job_definitions SET last_status = 'failed',"
	" last_finished_at = pg_catalog.clock_timestamp(),"
	" last_error = 'interrupted by a server crash or restart', run_pid = NULL"
	" WHERE last_status OPERATOR(pg_catalog.=) 'running' AND (run_pid IS NULL"
	" OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_get_activity(run_pid)))",
	.nargs = 0
};

void
CiflowJobsFailInterrupted(void)
{
	(void) CiflowCatalogExecute(&fail_interrupted_jobs, NULL, NULL, NULL, NULL);
}
