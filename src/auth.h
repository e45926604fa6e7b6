/*-------------------------------------------------------------------------
 *
 * auth.h
 *	  Bearer tokens: the static one, or OAuth 2.0 client credentials with a
 *	  per-process cache renewed before expiry.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CIFLOW_AUTH_H
#define CIFLOW_AUTH_H

#include "connection.h"
#include "request.h"

/*
 * Returns the bearer token to send (palloc'd), or NULL when the connection
 * has none.  force_new drops a cached token first (after a 401).  failmsg
 * is the primary message should the token request fail.
 */
extern char *CiflowBearerToken(const CiflowConnection *conn, bool force_new,
							   const char *failmsg);

/* Whether a token could be renewed at all (false for a static token). */
extern bool CiflowTokenRenewable(const CiflowConnection *conn);

#endif							/* CIFLOW_AUTH_H */
