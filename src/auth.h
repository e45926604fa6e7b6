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

/*
 * Registers the token source of the request path: the static bearer_token,
 * or one from the client-credentials grant, cached per process and renewed
 * before it expires (or at once after a rejection).  Called by _PG_init.
 */
extern void CiflowAuthInit(void);

#endif							/* CIFLOW_AUTH_H */
