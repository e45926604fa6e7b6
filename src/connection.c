/*-------------------------------------------------------------------------
 *
 * connection.c
 *	  Connections: create_connection, alter_connection, drop_connection,
 *	  and reading a connection (secrets included) for the request path.
 *
 *	  Settings, secrets and grants live in ciflow.connection_settings,
 *	  connection_secrets and connection_grants, which only superusers can
 *	  read; catalog.c reads them by relation scans and writes them as the
 *	  extension's owner, with the values as parameters so that no secret is
 *	  ever part of a statement's text.  Errors raised here hide the calling
 *	  statement, which may hold secrets, from the server log.
 *
 *	  Using a connection is a privilege: its owner, the roles granted it
 *	  (and their members) and superusers have it.  Altering, dropping and
 *	  granting belong to the owner and superusers.  A connection's secrets
 *	  go only to the host they were given for: changing base_url, token_url
 *	  or ca_file needs them again in the same call.
 *
 *	  A connection read for the request path lives in a memory context of
 *	  its own whose reset callback wipes the secrets, so that an error
 *	  anywhere (the context goes with the transaction) wipes them too.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <unistd.h>

#include "catalog/pg_type.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "catalog.h"
#include "ciflow.h"
#include "connection.h"
#include "entitykeys.h"
#include "http.h"
#include "ratelimit.h"

CIFLOW_SQL_FUNCTION(ciflow_create_connection);
CIFLOW_SQL_FUNCTION(ciflow_alter_connection);
CIFLOW_SQL_FUNCTION(ciflow_drop_connection);
CIFLOW_SQL_FUNCTION(ciflow_grant_connection);
CIFLOW_SQL_FUNCTION(ciflow_revoke_connection);

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
 * they are read, merged, validated and written, and its owner.
 */
typedef struct ConnValues
{
	char	   *v[NUM_CONN_ARGS];
	Oid			owner;
} ConnValues;

/* The secrets among the settings, in the order they are checked. */
static const ConnArg secret_args[] = {ARG_CLIENT_SECRET, ARG_SUBSCRIPTION_KEY, ARG_BEARER_TOKEN};

/* Settings that say where secrets go: changing one needs the secrets again. */
static const ConnArg destination_args[] = {ARG_BASE_URL, ARG_TOKEN_URL, ARG_CA_FILE};

/*
 * max_calls as text when there is no client-side limit: NULL in the
 * catalog and in SQL, 0 in CiflowConnection.max_calls.  No number a user
 * gives reads as this text (0 is refused as before).
 */
#define NO_CALL_LIMIT "none"

/* alter_connection's default for max_calls: leave it as it is. */
#define ALTER_KEEPS_MAX_CALLS "-1"

/* The longest per_interval: a longer one would stall every caller for good. */
#define MAX_PER_INTERVAL_MS ((int64) 24 * 60 * 60 * 1000)

static void
ConnError(const char *name, int sqlstate, const char *msg, const char *hint)
{
	ereport(ERROR,
			(errcode(sqlstate),
			 errmsg("connection \"%s\": %s", name, msg),
			 hint ? errhint("%s", hint) : 0,
			 errhidestmt(true)));
}

/*
 * A connection's name is also the default schema of its syncs, so it must
 * be one a schema may have.
 */
static void
CheckConnectionName(const char *name)
{
	if (!CiflowIsSimpleName(name))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_NAME),
				 errmsg("invalid connection name \"%s\"", name ? name : "(null)"),
				 errdetail("A connection name is a lowercase identifier: a-z, 0-9 and _, not starting with a digit, at most 63 bytes."),
				 errhidestmt(true)));
	if (strncmp(name, "pg_", 3) == 0 || strcmp(name, "ciflow") == 0 ||
		strcmp(name, "information_schema") == 0)
		ereport(ERROR,
				(errcode(ERRCODE_RESERVED_NAME),
				 errmsg("connection name \"%s\" is reserved", name),
				 errdetail("Syncs of a connection go into the schema named after it, and \"%s\" cannot be such a schema.",
						   name),
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

/* An http(s) URL without a query, a fragment or dot segments. */
static void
CheckServiceUrl(const ConnValues *cv, ConnArg arg, char **origin, const char *hint)
{
	const char *url = cv->v[arg];

	if (url == NULL || !CiflowParseUrl(url, origin))
		ConnError(cv->v[ARG_NAME], ERRCODE_INVALID_PARAMETER_VALUE,
				  psprintf("%s must be an http or https URL", arg_names[arg]), hint);
	if (!CiflowUrlIsPlain(url))
		ConnError(cv->v[ARG_NAME], ERRCODE_INVALID_PARAMETER_VALUE,
				  psprintf("%s must not have a query, a fragment or \".\" and \"..\" segments",
						   arg_names[arg]),
				  "Give the service's address as its documentation spells it.");
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
	int64		interval_ms;

	CheckConnectionName(name);

	CheckServiceUrl(cv, ARG_BASE_URL, &origin,
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

	if (cv->v[ARG_TOKEN_URL] != NULL)
		CheckServiceUrl(cv, ARG_TOKEN_URL, NULL, NULL);

	if (flavor == CIFLOW_FLAVOR_CUSTOMER_INSIGHTS && cv->v[ARG_INSTANCE_ID] == NULL)
		ConnError(name, ERRCODE_INVALID_PARAMETER_VALUE,
				  "a customer_insights connection needs an instance_id", NULL);
	if (cv->v[ARG_INSTANCE_ID] != NULL && !CiflowIsPathSegment(cv->v[ARG_INSTANCE_ID]))
		ConnError(name, ERRCODE_INVALID_PARAMETER_VALUE,
				  "instance_id must not be empty, \".\" or \"..\"",
				  "It is the instance's id, a GUID.");

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

	/*
	 * 0 (NULL in SQL) is no limit.  The cap is the capacity of the exact
	 * sliding window in shared memory (ratelimit.c): a service that takes
	 * more calls than that per interval enforces its own limit anyway, and
	 * such connections should have none.
	 */
	if (cv->v[ARG_MAX_CALLS] == NULL)
		cv->v[ARG_MAX_CALLS] = pstrdup("100");
	if (strcmp(cv->v[ARG_MAX_CALLS], NO_CALL_LIMIT) != 0 &&
		(strtol(cv->v[ARG_MAX_CALLS], NULL, 10) < 1 ||
		 strtol(cv->v[ARG_MAX_CALLS], NULL, 10) > CIFLOW_MAX_CALLS_LIMIT))
		ConnError(name, ERRCODE_INVALID_PARAMETER_VALUE,
				  psprintf("max_calls must be between 1 and %d", CIFLOW_MAX_CALLS_LIMIT),
				  NULL);
	if (cv->v[ARG_PAGE_SIZE] == NULL)
		cv->v[ARG_PAGE_SIZE] = pstrdup("100");
	(void) IntSetting(cv, ARG_PAGE_SIZE, 1, 5000);
	if (cv->v[ARG_PER_INTERVAL] == NULL)
		cv->v[ARG_PER_INTERVAL] = pstrdup("60 seconds");
	interval_ms = IntervalMs(cv->v[ARG_PER_INTERVAL]);
	if (interval_ms <= 0 || interval_ms > MAX_PER_INTERVAL_MS)
		ConnError(name, ERRCODE_INVALID_PARAMETER_VALUE,
				  "per_interval must be positive and at most 1 day",
				  "The service's own limit is 100 calls per 60 seconds.");

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
	cv->owner = GetUserId();
}

static void
WipeValues(ConnValues *cv)
{
	int			i;

	for (i = 0; i < (int) lengthof(secret_args); i++)
	{
		CiflowFreeSecret(cv->v[secret_args[i]]);
		cv->v[secret_args[i]] = NULL;
	}
}

/* Adds a stored connection's secrets to cv, in the current memory context. */
static void
LoadSecrets(const char *name, ConnValues *cv)
{
	TupleDesc	desc;
	List	   *rows = CiflowCatalogLookup("connection_secrets", "connection", name, &desc);
	HeapTuple	tup;

	if (rows == NIL)
		return;
	tup = linitial(rows);
	cv->v[ARG_CLIENT_SECRET] = CiflowCatalogText(tup, desc, "client_secret");
	cv->v[ARG_SUBSCRIPTION_KEY] = CiflowCatalogText(tup, desc, "subscription_key");
	cv->v[ARG_BEARER_TOKEN] = CiflowCatalogText(tup, desc, "bearer_token");
	/* The copy held the secrets too. */
	explicit_bzero(tup->t_data, tup->t_len);
	heap_freetuple(tup);
}

/*
 * Reads a stored connection as text; false when there is none.  Secrets
 * are read only when asked for.
 */
static bool
LoadValues(const char *name, ConnValues *cv, bool with_secrets)
{
	TupleDesc	desc;
	List	   *rows = CiflowCatalogLookup("connection_settings", "name", name, &desc);
	HeapTuple	tup;
	bool		isnull;

	memset(cv, 0, sizeof(*cv));
	if (rows == NIL)
		return false;
	tup = linitial(rows);
	cv->v[ARG_NAME] = CiflowCatalogText(tup, desc, "name");
	cv->v[ARG_BASE_URL] = CiflowCatalogText(tup, desc, "base_url");
	cv->v[ARG_INSTANCE_ID] = CiflowCatalogText(tup, desc, "instance_id");
	cv->v[ARG_FLAVOR] = CiflowCatalogText(tup, desc, "flavor");
	cv->v[ARG_TOKEN_URL] = CiflowCatalogText(tup, desc, "token_url");
	cv->v[ARG_CLIENT_ID] = CiflowCatalogText(tup, desc, "client_id");
	cv->v[ARG_SCOPE] = CiflowCatalogText(tup, desc, "scope");
	cv->v[ARG_MAX_CALLS] = psprintf("%d", DatumGetInt32(CiflowCatalogDatum(tup, desc, "max_calls", &isnull)));
	if (isnull)
		cv->v[ARG_MAX_CALLS] = pstrdup(NO_CALL_LIMIT);
	cv->v[ARG_PER_INTERVAL] =
		DatumGetCString(DirectFunctionCall1(interval_out,
											CiflowCatalogDatum(tup, desc, "per_interval", &isnull)));
	cv->v[ARG_PAGE_SIZE] = psprintf("%d", DatumGetInt32(CiflowCatalogDatum(tup, desc, "page_size", &isnull)));
	cv->v[ARG_CA_FILE] = CiflowCatalogText(tup, desc, "ca_file");
	cv->owner = DatumGetObjectId(CiflowCatalogDatum(tup, desc, "owner", &isnull));
	heap_freetuple(tup);

	if (with_secrets)
		LoadSecrets(name, cv);
	return true;
}

static CiflowCatalogStatement insert_settings = {
	.sql = "INSERT INTO ciflow.connection_settings (name, base_url, instance_id,"
	" flavor, token_url, client_id, scope, max_calls, per_interval,"
	" page_size, ca_file, owner) VALUES ($1, $2, $3, $4, $5, $6, $7,"
	" $8::pg_catalog.int4, $9::pg_catalog.interval, $10::pg_catalog.int4, $11,"
	" $12::pg_catalog.oid::pg_catalog.regrole)",
	.nargs = 12,
	.types = {TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID,
	TEXTOID, TEXTOID, TEXTOID, OIDOID}
};

static CiflowCatalogStatement update_settings = {
	.sql = "UPDATE ciflow.connection_settings SET base_url = $2,"
	" instance_id = $3, flavor = $4, token_url = $5, client_id = $6,"
	" scope = $7, max_calls = $8::pg_catalog.int4,"
	" per_interval = $9::pg_catalog.interval, page_size = $10::pg_catalog.int4,"
	" ca_file = $11, updated_at = pg_catalog.now()"
	" WHERE name OPERATOR(pg_catalog.=) $1",
	.nargs = 11,
	.types = {TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID,
	TEXTOID, TEXTOID, TEXTOID}
};

static CiflowCatalogStatement upsert_secrets = {
	.sql = "INSERT INTO ciflow.connection_secrets AS s (connection, client_secret,"
	" subscription_key, bearer_token) VALUES ($1, $2, $3, $4)"
	" ON CONFLICT (connection) DO UPDATE SET client_secret = $2,"
	" subscription_key = $3, bearer_token = $4",
	.nargs = 4,
	.types = {TEXTOID, TEXTOID, TEXTOID, TEXTOID}
};

static CiflowCatalogStatement delete_connection = {
	.sql = "DELETE FROM ciflow.connection_settings WHERE name OPERATOR(pg_catalog.=) $1",
	.nargs = 1,
	.types = {TEXTOID}
};

static CiflowCatalogStatement insert_grant = {
	.sql = "INSERT INTO ciflow.connection_grants (connection, grantee, granted_by)"
	" VALUES ($1, $2::pg_catalog.oid::pg_catalog.regrole,"
	" $3::pg_catalog.oid::pg_catalog.regrole)"
	" ON CONFLICT (connection, grantee) DO NOTHING",
	.nargs = 3,
	.types = {TEXTOID, OIDOID, OIDOID}
};

static CiflowCatalogStatement delete_grant = {
	.sql = "DELETE FROM ciflow.connection_grants WHERE connection OPERATOR(pg_catalog.=) $1"
	" AND grantee OPERATOR(pg_catalog.=) $2::pg_catalog.oid::pg_catalog.regrole",
	.nargs = 2,
	.types = {TEXTOID, OIDOID}
};

static uint64
WriteTexts(CiflowCatalogStatement *stmt, char **texts, int ntexts, Oid extra_oid)
{
	Datum		values[12];
	char		nulls[12];
	int			i;

	for (i = 0; i < ntexts; i++)
	{
		values[i] = texts[i] ? CStringGetTextDatum(texts[i]) : (Datum) 0;
		nulls[i] = texts[i] ? ' ' : 'n';
	}
	for (; i < stmt->nargs; i++)
	{
		values[i] = ObjectIdGetDatum(extra_oid);
		nulls[i] = ' ';
	}
	return CiflowCatalogExecute(stmt, values, nulls, NULL, NULL);
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

	if (strcmp(cv->v[ARG_MAX_CALLS], NO_CALL_LIMIT) == 0)
		settings[7] = NULL;

	if (replace)
		(void) WriteTexts(&update_settings, settings, 11, InvalidOid);
	else
		(void) WriteTexts(&insert_settings, settings, 11, cv->owner);
	(void) WriteTexts(&upsert_secrets, secrets, 4, InvalidOid);
}

/* Owners (and their members) and superusers may change a connection. */
static void
CheckOwner(const char *name, Oid owner, const char *action)
{
	if (!has_privs_of_role(GetUserId(), owner))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("must be owner of connection \"%s\" to %s it", name, action),
				 errdetail("Connection \"%s\" is owned by role %s.", name,
						   GetUserNameFromId(owner, true) ? GetUserNameFromId(owner, true) : "(dropped)"),
				 errhidestmt(true)));
}

/* Whether the current role may call the service through the connection. */
static bool
MayUse(const char *name, Oid owner)
{
	Oid			me = GetUserId();
	TupleDesc	desc;
	List	   *grants;
	ListCell   *lc;

	if (has_privs_of_role(me, owner))
		return true;
	grants = CiflowCatalogLookup("connection_grants", "connection", name, &desc);
	foreach(lc, grants)
	{
		bool		isnull;
		Oid			grantee = DatumGetObjectId(CiflowCatalogDatum(lfirst(lc), desc,
																  "grantee", &isnull));

		if (has_privs_of_role(me, grantee))
			return true;
	}
	return false;
}

static void
RequireConnection(bool found, const char *name)
{
	if (!found)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("connection \"%s\" does not exist", name),
				 errhint("See ciflow.connections for the connections there are."),
				 errhidestmt(true)));
}

Datum
ciflow_create_connection(PG_FUNCTION_ARGS)
{
	ConnValues	cv;
	ConnValues	existing;

	CiflowRefuseRestricted();
	ValuesFromArgs(fcinfo, &cv);
	/* Its default is 100: only an explicit NULL gets here as NULL. */
	if (cv.v[ARG_MAX_CALLS] == NULL)
		cv.v[ARG_MAX_CALLS] = pstrdup(NO_CALL_LIMIT);
	ValidateSettings(&cv);

	if (LoadValues(cv.v[ARG_NAME], &existing, false))
		ereport(ERROR,
				(errcode(ERRCODE_DUPLICATE_OBJECT),
				 errmsg("connection \"%s\" already exists", cv.v[ARG_NAME]),
				 errhint("Use ciflow.alter_connection to change it."),
				 errhidestmt(true)));
	StoreValues(&cv, false);
	WipeValues(&cv);
	PG_RETURN_VOID();
}

/*
 * Secrets go only where they were given for: a change of destination
 * needs every stored secret again in the same call ('' clears one).
 */
static void
CheckSecretsFollow(const ConnValues *stored, const ConnValues *changes,
				   const ConnValues *merged)
{
	const char *moved = NULL;
	int			i;

	for (i = 0; i < (int) lengthof(destination_args); i++)
	{
		ConnArg		a = destination_args[i];
		const char *before = stored->v[a];
		const char *after = merged->v[a];

		/*
		 * Clearing ca_file only narrows trust to the system's CAs for the
		 * same host; every other change can point the secrets elsewhere.
		 */
		if (a == ARG_CA_FILE && after == NULL)
			continue;
		if ((before == NULL) != (after == NULL) ||
			(before != NULL && strcmp(before, after) != 0))
		{
			moved = arg_names[a];
			break;
		}
	}
	if (moved == NULL)
		return;
	for (i = 0; i < (int) lengthof(secret_args); i++)
	{
		ConnArg		a = secret_args[i];

		if (stored->v[a] != NULL && changes->v[a] == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("connection \"%s\": changing %s requires giving its secrets again",
							merged->v[ARG_NAME], moved),
					 errdetail("The stored %s was given for the connection's current address; ciflow never sends it elsewhere.",
							   arg_names[a]),
					 errhint("Pass %s (and every other stored secret) in the same ciflow.alter_connection call, or '' to clear it.",
							 arg_names[a]),
					 errhidestmt(true)));
	}
}

/*
 * Whether the connection now reaches another service (or the same one
 * read another way), whose entities' remembered keys may not hold.
 */
static bool
ServiceChanged(const ConnValues *stored, const ConnValues *merged)
{
	static const ConnArg service_args[] = {ARG_BASE_URL, ARG_INSTANCE_ID, ARG_FLAVOR};
	int			i;

	for (i = 0; i < (int) lengthof(service_args); i++)
	{
		const char *before = stored->v[service_args[i]];
		const char *after = merged->v[service_args[i]];

		if ((before == NULL) != (after == NULL) ||
			(before != NULL && strcmp(before, after) != 0))
			return true;
	}
	return false;
}

Datum
ciflow_alter_connection(PG_FUNCTION_ARGS)
{
	ConnValues	changes;
	ConnValues	stored;
	ConnValues	cv;
	int			i;

	CiflowRefuseRestricted();
	ValuesFromArgs(fcinfo, &changes);
	CheckConnectionName(changes.v[ARG_NAME]);

	/*
	 * max_calls => NULL means no limit here too (the contract's words), so
	 * its SQL default is ALTER_KEEPS_MAX_CALLS, which leaves it alone.
	 */
	if (changes.v[ARG_MAX_CALLS] == NULL)
		changes.v[ARG_MAX_CALLS] = pstrdup(NO_CALL_LIMIT);
	else if (strcmp(changes.v[ARG_MAX_CALLS], ALTER_KEEPS_MAX_CALLS) == 0)
		changes.v[ARG_MAX_CALLS] = NULL;

	RequireConnection(LoadValues(changes.v[ARG_NAME], &stored, true), changes.v[ARG_NAME]);
	CheckOwner(changes.v[ARG_NAME], stored.owner, "alter");
	cv = stored;
	/* NULL leaves a setting alone; '' clears it. */
	for (i = ARG_NAME + 1; i < NUM_CONN_ARGS; i++)
	{
		if (changes.v[i] != NULL)
			cv.v[i] = changes.v[i][0] == '\0' ? NULL : pstrdup(changes.v[i]);
		else if (cv.v[i] != NULL)
			cv.v[i] = pstrdup(cv.v[i]);
	}
	ValidateSettings(&cv);
	CheckSecretsFollow(&stored, &changes, &cv);
	StoreValues(&cv, true);
	if (ServiceChanged(&stored, &cv))
		CiflowEntityKeysForget(cv.v[ARG_NAME]);
	WipeValues(&cv);
	WipeValues(&stored);
	WipeValues(&changes);
	PG_RETURN_VOID();
}

Datum
ciflow_drop_connection(PG_FUNCTION_ARGS)
{
	char	   *name;
	bool		if_exists = PG_ARGISNULL(1) ? false : PG_GETARG_BOOL(1);
	ConnValues	stored;
	char	   *args[1];

	CiflowRefuseRestricted();
	if (PG_ARGISNULL(0))
		CheckConnectionName(NULL);
	name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	if (!CiflowIsSimpleName(name))
		CheckConnectionName(name);

	if (!LoadValues(name, &stored, false))
	{
		if (!if_exists)
			RequireConnection(false, name);
		ereport(NOTICE,
				(errmsg("connection \"%s\" does not exist, skipping", name)));
		PG_RETURN_VOID();
	}
	CheckOwner(name, stored.owner, "drop");
	args[0] = name;
	(void) WriteTexts(&delete_connection, args, 1, InvalidOid);
	PG_RETURN_VOID();
}

/* grant_connection and revoke_connection: the owner's and superusers'. */
static void
ChangeGrant(FunctionCallInfo fcinfo, bool grant)
{
	char	   *name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	Oid			role = PG_GETARG_OID(1);
	ConnValues	stored;
	char	   *args[1];

	CiflowRefuseRestricted();
	RequireConnection(LoadValues(name, &stored, false), name);
	CheckOwner(name, stored.owner, grant ? "grant" : "revoke");
	args[0] = name;
	if (grant)
	{
		Datum		values[3] = {CStringGetTextDatum(name), ObjectIdGetDatum(role),
		ObjectIdGetDatum(GetUserId())};

		(void) CiflowCatalogExecute(&insert_grant, values, NULL, NULL, NULL);
	}
	else if (WriteTexts(&delete_grant, args, 1, role) == 0)
		ereport(NOTICE,
				(errmsg("role \"%s\" has no grant on connection \"%s\"",
						GetUserNameFromId(role, false), name)));
}

Datum
ciflow_grant_connection(PG_FUNCTION_ARGS)
{
	ChangeGrant(fcinfo, true);
	PG_RETURN_VOID();
}

Datum
ciflow_revoke_connection(PG_FUNCTION_ARGS)
{
	ChangeGrant(fcinfo, false);
	PG_RETURN_VOID();
}

/* Reset callback of a connection's memory context: the secrets go first. */
static void
WipeConnection(void *arg)
{
	CiflowConnection *conn = (CiflowConnection *) arg;

	if (conn->client_secret)
		explicit_bzero(conn->client_secret, strlen(conn->client_secret));
	if (conn->subscription_key)
		explicit_bzero(conn->subscription_key, strlen(conn->subscription_key));
	if (conn->bearer_token)
		explicit_bzero(conn->bearer_token, strlen(conn->bearer_token));
}

static char *
CopyOrNull(const char *s)
{
	return s ? pstrdup(s) : NULL;
}

/*
 * A connection in a context of its own, under parent, that wipes its
 * secrets when it goes, whether by CiflowFreeConnection or with parent.
 */
static CiflowConnection *
NewConnection(MemoryContext parent)
{
	MemoryContext cxt = AllocSetContextCreate(parent, "ciflow connection",
											  ALLOCSET_SMALL_SIZES);
	CiflowConnection *conn = MemoryContextAllocZero(cxt, sizeof(CiflowConnection));
	MemoryContextCallback *cb = MemoryContextAlloc(cxt, sizeof(MemoryContextCallback));

	conn->cxt = cxt;
	cb->func = WipeConnection;
	cb->arg = conn;
	MemoryContextRegisterResetCallback(cxt, cb);
	return conn;
}

CiflowConnection *
CiflowGetConnection(const char *name)
{
	ConnValues	cv;
	CiflowConnection *conn;
	MemoryContext old;

	if (name == NULL)
		CheckConnectionName(NULL);
	CiflowRefuseRestricted();
	if (!CiflowIsSimpleName(name))
		CheckConnectionName(name);

	/* The privilege first: a role without it never has the secrets read. */
	RequireConnection(LoadValues(name, &cv, false), name);
	if (!MayUse(name, cv.owner))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for connection \"%s\"", name),
				 errhint("Its owner or a superuser can grant it: SELECT ciflow.grant_connection('%s', '%s');",
						 name, GetUserNameFromId(GetUserId(), false))));

	/* Secrets straight into the wiping context: no other copy is left. */
	conn = NewConnection(CurrentMemoryContext);
	old = MemoryContextSwitchTo(conn->cxt);
	LoadSecrets(name, &cv);
	conn->name = pstrdup(cv.v[ARG_NAME]);
	conn->base_url = pstrdup(cv.v[ARG_BASE_URL]);
	conn->instance_id = CopyOrNull(cv.v[ARG_INSTANCE_ID]);
	conn->flavor = (CiflowFlavor) FlavorFromName(cv.v[ARG_FLAVOR]);
	conn->token_url = CopyOrNull(cv.v[ARG_TOKEN_URL]);
	conn->client_id = CopyOrNull(cv.v[ARG_CLIENT_ID]);
	conn->client_secret = cv.v[ARG_CLIENT_SECRET];
	conn->scope = CopyOrNull(cv.v[ARG_SCOPE]);
	conn->subscription_key = cv.v[ARG_SUBSCRIPTION_KEY];
	conn->bearer_token = cv.v[ARG_BEARER_TOKEN];
	conn->max_calls = strcmp(cv.v[ARG_MAX_CALLS], NO_CALL_LIMIT) == 0 ? 0 :
		atoi(cv.v[ARG_MAX_CALLS]);
	conn->per_interval_ms = IntervalMs(cv.v[ARG_PER_INTERVAL]);
	conn->page_size = atoi(cv.v[ARG_PAGE_SIZE]);
	conn->ca_file = CopyOrNull(cv.v[ARG_CA_FILE]);
	conn->owner = cv.owner;
	if (!CiflowParseUrl(conn->base_url, &conn->origin))
		elog(ERROR, "connection \"%s\" has an invalid base_url", name);
	MemoryContextSwitchTo(old);
	return conn;
}

CiflowConnection *
CiflowCopyConnection(const CiflowConnection *conn, MemoryContext parent)
{
	CiflowConnection *copy = NewConnection(parent);
	MemoryContext cxt = copy->cxt;
	MemoryContext old = MemoryContextSwitchTo(cxt);

	*copy = *conn;
	copy->cxt = cxt;
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

void
CiflowFreeConnection(CiflowConnection *conn)
{
	if (conn != NULL)
		MemoryContextDelete(conn->cxt);
}
