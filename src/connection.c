/*-------------------------------------------------------------------------
 *
 * connection.c
 *	  Connections: create_connection, alter_connection, drop_connection,
 *	  and reading a connection (secrets included) for the request path.
 *
 *	  Settings and secrets live in ciflow.connection_settings and
 *	  ciflow.connection_secrets, which only superusers can read; this file
 *	  reads and writes them as their owner, with the values as SPI
 *	  parameters so that no secret is ever part of a query text.  Errors
 *	  raised here hide the calling statement, which may hold secrets, from
 *	  the server log.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <unistd.h>

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "ciflow.h"
#include "connection.h"
#include "http.h"
#include "ratelimit.h"

PG_FUNCTION_INFO_V1(create_connection);
PG_FUNCTION_INFO_V1(alter_connection);
PG_FUNCTION_INFO_V1(drop_connection);

/* The SQL functions' argument positions, which are also the settings. */
typedef enum ConnArg
{
	ARG_NAME,
	ARG_BASE_URL,
	ARG_INSTANCE_ID,
	ARG_FLAVOR,
	ARG_TOKEN_URL,
	ARG_CLIENT_ID,
	ARG_CLIENT_SECRET,
	ARG_SCOPE,
	ARG_SUBSCRIPTION_KEY,
	ARG_BEARER_TOKEN,
	ARG_MAX_CALLS,
	ARG_PER_INTERVAL,
	ARG_PAGE_SIZE,
	ARG_CA_FILE,
	NUM_CONN_ARGS
} ConnArg;

static const char *const arg_names[NUM_CONN_ARGS] = {
	"name", "base_url", "instance_id", "flavor", "token_url", "client_id",
	"client_secret", "scope", "subscription_key", "bearer_token",
	"max_calls", "per_interval", "page_size", "ca_file"
};

static const char *const flavor_names[] = {"customer_insights", "dataverse", "odata"};

#define DEFAULT_CI_SCOPE "https://api.ci.ai.microsoft.com/.default"

/*
 * One connection's settings as text (NULL = not set), the form in which
 * they are read, merged, validated and written.
 */
typedef struct ConnValues
{
	char	   *v[NUM_CONN_ARGS];
} ConnValues;

static SPIPlanPtr load_plan = NULL;

static void
ConnError(const char *name, int sqlstate, const char *msg, const char *hint)
{
	ereport(ERROR,
			(errcode(sqlstate),
			 errmsg("connection \"%s\": %s", name, msg),
			 hint ? errhint("%s", hint) : 0,
			 errhidestmt(true)));
}

static void
CheckConnectionName(const char *name)
{
	if (!CiflowIsSimpleName(name))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_NAME),
				 errmsg("invalid connection name \"%s\"", name ? name : "(null)"),
				 errdetail("A connection name is a lowercase identifier: a-z, 0-9 and _, not starting with a digit, at most 63 bytes."),
				 errhidestmt(true)));
}

static int
FlavorFromName(const char *flavor)
{
	int			i;

	for (i = 0; i < (int) lengthof(flavor_names); i++)
	{
		if (strcmp(flavor, flavor_names[i]) == 0)
			return i;
	}
	return -1;
}

static int
IntSetting(const ConnValues *cv, ConnArg arg, int min, int max)
{
	char	   *end;
	long		val;

	errno = 0;
	val = strtol(cv->v[arg], &end, 10);
	if (errno != 0 || *end != '\0' || val < min || val > max)
		ConnError(cv->v[ARG_NAME], ERRCODE_INVALID_PARAMETER_VALUE,
				  psprintf("%s must be between %d and %d", arg_names[arg], min, max),
				  NULL);
	return (int) val;
}

static int64
IntervalMs(const char *text)
{
	Interval   *iv = DatumGetIntervalP(DirectFunctionCall3(interval_in,
														   CStringGetDatum(text),
														   ObjectIdGetDatum(InvalidOid),
														   Int32GetDatum(-1)));

	return iv->time / 1000 +
		((int64) iv->day + (int64) iv->month * DAYS_PER_MONTH) * (USECS_PER_DAY / 1000);
}

/*
 * Checks a complete set of settings and fills in defaults; create and
 * alter both end here, so a connection can never be stored half-valid.
 */
static void
ValidateSettings(ConnValues *cv)
{
	const char *name = cv->v[ARG_NAME];
	int			flavor;
	char	   *origin;
	size_t		len;

	CheckConnectionName(name);

	if (cv->v[ARG_BASE_URL] == NULL || !CiflowParseUrl(cv->v[ARG_BASE_URL], &origin))
		ConnError(name, ERRCODE_INVALID_PARAMETER_VALUE,
				  "base_url must be an http or https URL",
				  "For Customer Insights it is https://api.ci.ai.dynamics.com/v1.");
	len = strlen(cv->v[ARG_BASE_URL]);
	while (len > 0 && cv->v[ARG_BASE_URL][len - 1] == '/')
		cv->v[ARG_BASE_URL][--len] = '\0';

	if (cv->v[ARG_FLAVOR] == NULL)
		cv->v[ARG_FLAVOR] = pstrdup("customer_insights");
	flavor = FlavorFromName(cv->v[ARG_FLAVOR]);
	if (flavor < 0)
		ConnError(name, ERRCODE_INVALID_PARAMETER_VALUE,
				  psprintf("unknown flavor \"%s\"", cv->v[ARG_FLAVOR]),
				  "Use customer_insights, dataverse or odata.");

	if (cv->v[ARG_TOKEN_URL] != NULL && !CiflowParseUrl(cv->v[ARG_TOKEN_URL], NULL))
		ConnError(name, ERRCODE_INVALID_PARAMETER_VALUE,
				  "token_url must be an http or https URL", NULL);

	if (flavor == CIFLOW_FLAVOR_CUSTOMER_INSIGHTS && cv->v[ARG_INSTANCE_ID] == NULL)
		ConnError(name, ERRCODE_INVALID_PARAMETER_VALUE,
				  "a customer_insights connection needs an instance_id", NULL);

	/* A token comes either as is, or from the client-credentials grant. */
	if (cv->v[ARG_BEARER_TOKEN] == NULL)
	{
		bool		have_grant = cv->v[ARG_TOKEN_URL] != NULL &&
			cv->v[ARG_CLIENT_ID] != NULL && cv->v[ARG_CLIENT_SECRET] != NULL;

		if (!have_grant && flavor != CIFLOW_FLAVOR_ODATA)
			ConnError(name, ERRCODE_INVALID_PARAMETER_VALUE,
					  "no credentials",
					  "Give token_url, client_id and client_secret, or bearer_token.");
	}
	if (flavor == CIFLOW_FLAVOR_CUSTOMER_INSIGHTS && cv->v[ARG_SUBSCRIPTION_KEY] == NULL)
		ConnError(name, ERRCODE_INVALID_PARAMETER_VALUE,
				  "no subscription_key",
				  "Customer Insights needs the API's primary or secondary key as subscription_key.");
	if (cv->v[ARG_SCOPE] == NULL && cv->v[ARG_TOKEN_URL] != NULL)
	{
		if (flavor == CIFLOW_FLAVOR_CUSTOMER_INSIGHTS)
			cv->v[ARG_SCOPE] = pstrdup(DEFAULT_CI_SCOPE);
		else
			cv->v[ARG_SCOPE] = psprintf("%s/.default", origin);
	}

	if (cv->v[ARG_MAX_CALLS] == NULL)
		cv->v[ARG_MAX_CALLS] = pstrdup("100");
	(void) IntSetting(cv, ARG_MAX_CALLS, 1, CIFLOW_MAX_CALLS_LIMIT);
	if (cv->v[ARG_PAGE_SIZE] == NULL)
		cv->v[ARG_PAGE_SIZE] = pstrdup("100");
	(void) IntSetting(cv, ARG_PAGE_SIZE, 1, 5000);
	if (cv->v[ARG_PER_INTERVAL] == NULL)
		cv->v[ARG_PER_INTERVAL] = pstrdup("60 seconds");
	if (IntervalMs(cv->v[ARG_PER_INTERVAL]) <= 0)
		ConnError(name, ERRCODE_INVALID_PARAMETER_VALUE,
				  "per_interval must be positive", NULL);

	if (cv->v[ARG_CA_FILE] != NULL &&
		(cv->v[ARG_CA_FILE][0] != '/' || access(cv->v[ARG_CA_FILE], R_OK) != 0))
		ConnError(name, ERRCODE_INVALID_PARAMETER_VALUE,
				  "ca_file must be an absolute path the server can read", NULL);
}

/* The function's arguments as settings; a NULL argument stays NULL. */
static void
ValuesFromArgs(FunctionCallInfo fcinfo, ConnValues *cv)
{
	int			i;

	for (i = 0; i < NUM_CONN_ARGS; i++)
	{
		if (PG_ARGISNULL(i))
			cv->v[i] = NULL;
		else if (i == ARG_MAX_CALLS || i == ARG_PAGE_SIZE)
			cv->v[i] = psprintf("%d", PG_GETARG_INT32(i));
		else if (i == ARG_PER_INTERVAL)
			cv->v[i] = DatumGetCString(DirectFunctionCall1(interval_out,
														   PG_GETARG_DATUM(i)));
		else
			cv->v[i] = text_to_cstring(PG_GETARG_TEXT_PP(i));
	}
}

/* Reads a stored connection as text; false when there is none.  Needs SPI. */
static bool
LoadValues(const char *name, ConnValues *cv)
{
	Datum		arg = CStringGetTextDatum(name);
	Oid			argtype = TEXTOID;
	int			i;

	if (load_plan == NULL)
	{
		SPIPlanPtr	plan = SPI_prepare(
									   "SELECT c.name, c.base_url, c.instance_id, c.flavor, c.token_url,"
									   "       c.client_id, s.client_secret, c.scope, s.subscription_key,"
									   "       s.bearer_token, c.max_calls::text, c.per_interval::text,"
									   "       c.page_size::text, c.ca_file"
									   "  FROM ciflow.connection_settings c"
									   "  LEFT JOIN ciflow.connection_secrets s ON s.connection = c.name"
									   " WHERE c.name = $1", 1, &argtype);

		if (plan == NULL)
			elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
		SPI_keepplan(plan);
		load_plan = plan;
	}
	if (SPI_execute_plan(load_plan, &arg, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read connection \"%s\"", name);
	if (SPI_processed == 0)
		return false;
	for (i = 0; i < NUM_CONN_ARGS; i++)
		cv->v[i] = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, i + 1);
	return true;
}

static void
ExecWrite(const char *sql, int nargs, char **values)
{
	Oid			types[NUM_CONN_ARGS + 1];
	Datum		datums[NUM_CONN_ARGS + 1];
	char		nulls[NUM_CONN_ARGS + 1];
	int			i;
	int			rc;

	for (i = 0; i < nargs; i++)
	{
		types[i] = TEXTOID;
		datums[i] = values[i] ? CStringGetTextDatum(values[i]) : (Datum) 0;
		nulls[i] = values[i] ? ' ' : 'n';
	}
	rc = SPI_execute_with_args(sql, nargs, types, datums, nulls, false, 0);
	if (rc < 0)
		elog(ERROR, "SPI_execute_with_args failed: %s", SPI_result_code_string(rc));
}

/* Writes a validated connection: insert, or update when replacing. */
static void
StoreValues(ConnValues *cv, bool replace)
{
	char	   *secrets[4] = {cv->v[ARG_NAME], cv->v[ARG_CLIENT_SECRET],
	cv->v[ARG_SUBSCRIPTION_KEY], cv->v[ARG_BEARER_TOKEN]};
	char	   *settings[11] = {cv->v[ARG_NAME], cv->v[ARG_BASE_URL],
		cv->v[ARG_INSTANCE_ID], cv->v[ARG_FLAVOR], cv->v[ARG_TOKEN_URL],
		cv->v[ARG_CLIENT_ID], cv->v[ARG_SCOPE], cv->v[ARG_MAX_CALLS],
	cv->v[ARG_PER_INTERVAL], cv->v[ARG_PAGE_SIZE], cv->v[ARG_CA_FILE]};

	if (replace)
		ExecWrite("UPDATE ciflow.connection_settings SET base_url = $2,"
				  " instance_id = $3, flavor = $4, token_url = $5, client_id = $6,"
				  " scope = $7, max_calls = $8::integer, per_interval = $9::interval,"
				  " page_size = $10::integer, ca_file = $11, updated_at = now()"
				  " WHERE name = $1", 11, settings);
	else
		ExecWrite("INSERT INTO ciflow.connection_settings (name, base_url, instance_id,"
				  " flavor, token_url, client_id, scope, max_calls, per_interval,"
				  " page_size, ca_file) VALUES ($1, $2, $3, $4, $5, $6, $7,"
				  " $8::integer, $9::interval, $10::integer, $11)", 11, settings);
	ExecWrite("INSERT INTO ciflow.connection_secrets AS s (connection, client_secret,"
			  " subscription_key, bearer_token) VALUES ($1, $2, $3, $4)"
			  " ON CONFLICT (connection) DO UPDATE SET client_secret = $2,"
			  " subscription_key = $3, bearer_token = $4", 4, secrets);
}

Datum
create_connection(PG_FUNCTION_ARGS)
{
	ConnValues	cv;
	CiflowSavedUser saved;

	ValuesFromArgs(fcinfo, &cv);
	ValidateSettings(&cv);

	CiflowBecomeOwner(&saved);
	SPI_connect();
	{
		ConnValues	existing;

		if (LoadValues(cv.v[ARG_NAME], &existing))
			ereport(ERROR,
					(errcode(ERRCODE_DUPLICATE_OBJECT),
					 errmsg("connection \"%s\" already exists", cv.v[ARG_NAME]),
					 errhint("Use ciflow.alter_connection to change it."),
					 errhidestmt(true)));
	}
	StoreValues(&cv, false);
	SPI_finish();
	CiflowRestoreUser(&saved);
	PG_RETURN_VOID();
}

Datum
alter_connection(PG_FUNCTION_ARGS)
{
	ConnValues	changes;
	ConnValues	cv;
	CiflowSavedUser saved;
	int			i;

	ValuesFromArgs(fcinfo, &changes);
	CheckConnectionName(changes.v[ARG_NAME]);

	CiflowBecomeOwner(&saved);
	SPI_connect();
	if (!LoadValues(changes.v[ARG_NAME], &cv))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("connection \"%s\" does not exist", changes.v[ARG_NAME]),
				 errhidestmt(true)));
	/* NULL leaves a setting alone; '' clears it. */
	for (i = ARG_NAME + 1; i < NUM_CONN_ARGS; i++)
	{
		if (changes.v[i] != NULL)
			cv.v[i] = changes.v[i][0] == '\0' ? NULL : changes.v[i];
	}
	ValidateSettings(&cv);
	StoreValues(&cv, true);
	SPI_finish();
	CiflowRestoreUser(&saved);
	PG_RETURN_VOID();
}

Datum
drop_connection(PG_FUNCTION_ARGS)
{
	char	   *name;
	bool		if_exists = PG_ARGISNULL(1) ? false : PG_GETARG_BOOL(1);
	CiflowSavedUser saved;
	char	   *args[1];
	uint64		deleted;

	if (PG_ARGISNULL(0))
		CheckConnectionName(NULL);
	name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	CheckConnectionName(name);

	CiflowBecomeOwner(&saved);
	SPI_connect();
	args[0] = name;
	ExecWrite("DELETE FROM ciflow.connection_settings WHERE name = $1", 1, args);
	deleted = SPI_processed;
	SPI_finish();
	CiflowRestoreUser(&saved);
	if (deleted == 0 && !if_exists)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("connection \"%s\" does not exist", name)));
	if (deleted == 0)
		ereport(NOTICE,
				(errmsg("connection \"%s\" does not exist, skipping", name)));
	PG_RETURN_VOID();
}

static char *
CopyOrNull(const char *s)
{
	return s ? pstrdup(s) : NULL;
}

CiflowConnection *
CiflowGetConnection(const char *name)
{
	ConnValues	cv;
	CiflowConnection *conn;
	CiflowSavedUser saved;
	MemoryContext cxt = CurrentMemoryContext;
	bool		found;

	if (name == NULL)
		CheckConnectionName(NULL);
	CheckConnectionName(name);

	CiflowBecomeOwner(&saved);
	SPI_connect();
	found = LoadValues(name, &cv);
	if (found)
	{
		MemoryContext old = MemoryContextSwitchTo(cxt);
		int			i;

		/* SPI's memory goes away at SPI_finish. */
		for (i = 0; i < NUM_CONN_ARGS; i++)
			cv.v[i] = CopyOrNull(cv.v[i]);
		MemoryContextSwitchTo(old);
	}
	SPI_finish();
	CiflowRestoreUser(&saved);
	if (!found)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("connection \"%s\" does not exist", name),
				 errhint("See ciflow.connections for the connections there are.")));

	conn = palloc0(sizeof(CiflowConnection));
	conn->name = cv.v[ARG_NAME];
	conn->base_url = cv.v[ARG_BASE_URL];
	if (!CiflowParseUrl(conn->base_url, &conn->origin))
		elog(ERROR, "connection \"%s\" has an invalid base_url", name);
	conn->instance_id = cv.v[ARG_INSTANCE_ID];
	conn->flavor = (CiflowFlavor) FlavorFromName(cv.v[ARG_FLAVOR]);
	conn->token_url = cv.v[ARG_TOKEN_URL];
	conn->client_id = cv.v[ARG_CLIENT_ID];
	conn->client_secret = cv.v[ARG_CLIENT_SECRET];
	conn->scope = cv.v[ARG_SCOPE];
	conn->subscription_key = cv.v[ARG_SUBSCRIPTION_KEY];
	conn->bearer_token = cv.v[ARG_BEARER_TOKEN];
	conn->max_calls = atoi(cv.v[ARG_MAX_CALLS]);
	conn->per_interval_ms = IntervalMs(cv.v[ARG_PER_INTERVAL]);
	conn->page_size = atoi(cv.v[ARG_PAGE_SIZE]);
	conn->ca_file = cv.v[ARG_CA_FILE];
	return conn;
}

CiflowConnection *
CiflowCopyConnection(const CiflowConnection *conn, MemoryContext cxt)
{
	MemoryContext old = MemoryContextSwitchTo(cxt);
	CiflowConnection *copy = palloc(sizeof(CiflowConnection));

	*copy = *conn;
	copy->name = CopyOrNull(conn->name);
	copy->base_url = CopyOrNull(conn->base_url);
	copy->origin = CopyOrNull(conn->origin);
	copy->instance_id = CopyOrNull(conn->instance_id);
	copy->token_url = CopyOrNull(conn->token_url);
	copy->client_id = CopyOrNull(conn->client_id);
	copy->client_secret = CopyOrNull(conn->client_secret);
	copy->scope = CopyOrNull(conn->scope);
	copy->subscription_key = CopyOrNull(conn->subscription_key);
	copy->bearer_token = CopyOrNull(conn->bearer_token);
	copy->ca_file = CopyOrNull(conn->ca_file);
	MemoryContextSwitchTo(old);
	return copy;
}
