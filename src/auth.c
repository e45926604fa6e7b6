/*-------------------------------------------------------------------------
 *
 * auth.c
 *	  Bearer tokens.  A connection either has a static bearer_token or gets
 *	  one with the OAuth 2.0 client-credentials grant from its token_url.
 *	  Tokens are cached per process and renewed before they expire.
 *
 *	  This file owns the token request and the cache; it sends nothing to
 *	  the service itself and never logs or reports a secret.  It sits above
 *	  the request path (request.c performs its token request) and hands the
 *	  request path its tokens through the token source it registers.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "lib/stringinfo.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "ciflow.h"
#include "auth.h"
#include "odata.h"
#include "request.h"

/* Renew when less than this remains (the service's own advice). */
#define RENEW_MARGIN_S 300

typedef struct CachedToken
{
	char	   *identity;		/* what the token was issued for */
	char	   *token;
	TimestampTz renew_at;
	struct CachedToken *next;
} CachedToken;

static CachedToken *token_cache = NULL;

/*
 * A cached token is reused only for the same connection with the same
 * token endpoint and credentials, so an alter_connection takes effect at
 * once.
 */
static char *
TokenIdentity(const CiflowConnection *conn)
{
	return psprintf("%s\n%s\n%s\n%s\n%s", conn->name, conn->token_url,
					conn->client_id ? conn->client_id : "",
					conn->client_secret ? conn->client_secret : "",
					conn->scope ? conn->scope : "");
}

static char *
FetchToken(const CiflowConnection *conn, const char *failmsg, int *expires_in)
{
	StringInfoData form;
	CiflowRequest req;
	json_t	   *root;
	json_t	   *ttl;
	const char *token;
	char	   *result;

	initStringInfo(&form);
	CiflowAppendQuery(&form, "grant_type", "client_credentials");
	CiflowAppendQuery(&form, "client_id", conn->client_id ? conn->client_id : "");
	CiflowAppendQuery(&form, "client_secret",
					  conn->client_secret ? conn->client_secret : "");
	if (conn->scope)
		CiflowAppendQuery(&form, "scope", conn->scope);

	memset(&req, 0, sizeof(req));
	req.conn = conn;
	req.method = "POST";
	req.url = conn->token_url;
	req.body = form.data;
	req.api_call = false;
	req.failmsg = failmsg;
	req.detail_prefix = "Token endpoint: ";
	PG_TRY();
	{
		root = CiflowRequestJson(&req);
	}
	PG_CATCH();
	{
		/* The form holds the client secret, whatever the answer was. */
		CiflowFreeSecret(form.data);
		PG_RE_THROW();
	}
	PG_END_TRY();
	CiflowFreeSecret(form.data);

	token = CiflowJsonString(root, "access_token");
	if (token == NULL || token[0] == '\0')
	{
		json_decref(root);
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION),
				 errmsg("%s", failmsg),
				 errdetail("Token endpoint: the answer has no access_token.")));
	}
	result = pstrdup(token);

	/* expires_in may come as a number or as a string. */
	*expires_in = 3599;
	ttl = json_object_get(root, "expires_in");
	if (json_is_integer(ttl))
		*expires_in = (int) json_integer_value(ttl);
	else if (json_is_string(ttl))
		*expires_in = atoi(json_string_value(ttl));
	json_decref(root);
	return result;
}

static char *
BearerToken(const CiflowConnection *conn, bool force_new, const char *failmsg)
{
	char	   *identity;
	CachedToken *entry;
	CachedToken **prev;
	char	   *token;
	int			expires_in;
	int			margin;
	MemoryContext old;

	if (conn->bearer_token != NULL)
		return pstrdup(conn->bearer_token);
	if (conn->token_url == NULL)
		return NULL;

	identity = TokenIdentity(conn);
	for (prev = &token_cache; (entry = *prev) != NULL; prev = &entry->next)
	{
		if (strcmp(entry->identity, identity) == 0)
			break;
	}
	if (entry != NULL &&
		(force_new || GetCurrentTimestamp() >= entry->renew_at))
	{
		*prev = entry->next;
		CiflowFreeSecret(entry->identity);
		CiflowFreeSecret(entry->token);
		pfree(entry);
		entry = NULL;
	}
	if (entry != NULL)
	{
		CiflowFreeSecret(identity);
		return pstrdup(entry->token);
	}

	token = FetchToken(conn, failmsg, &expires_in);

	/* A very short-lived token is renewed half-way through its life. */
	margin = Min(RENEW_MARGIN_S, Max(expires_in, 0) / 2);
	old = MemoryContextSwitchTo(TopMemoryContext);
	entry = palloc(sizeof(CachedToken));
	entry->identity = pstrdup(identity);
	entry->token = pstrdup(token);
	entry->renew_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
												  (int64) (expires_in - margin) * 1000);
	entry->next = token_cache;
	token_cache = entry;
	MemoryContextSwitchTo(old);
	CiflowFreeSecret(identity);
	return token;
}

void
CiflowAuthInit(void)
{
	CiflowSetTokenSource(BearerToken);
}
