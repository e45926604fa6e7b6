/*-------------------------------------------------------------------------
 *
 * connection.h
 *	  A connection's settings and secrets, as the request path needs them.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CIFLOW_CONNECTION_H
#define CIFLOW_CONNECTION_H

#include "utils/palloc.h"

typedef enum CiflowFlavor
{
	CIFLOW_FLAVOR_CUSTOMER_INSIGHTS,
	CIFLOW_FLAVOR_DATAVERSE,
	CIFLOW_FLAVOR_ODATA
} CiflowFlavor;

typedef struct CiflowConnection
{
	MemoryContext cxt;			/* holds all of it; wipes secrets when reset */
	Oid			owner;
	char	   *name;
	char	   *base_url;		/* without a trailing slash */
	char	   *origin;			/* scheme://host:port of base_url */
	char	   *instance_id;
	CiflowFlavor flavor;
	char	   *token_url;
	char	   *client_id;
	char	   *client_secret;
	char	   *scope;
	char	   *subscription_key;
	char	   *bearer_token;
	char	   *ca_file;
	int			max_calls;		/* 0: no client-side limit */
	int64		per_interval_ms;
	int			page_size;
} CiflowConnection;

/*
 * Needs a transaction; raises 42704 if the connection does not exist and
 * 42501 if the current role may not use it.  The result lives in a child
 * of the current memory context that wipes the secrets when it goes.
 */
extern CiflowConnection *CiflowGetConnection(const char *name);

/* Deep copy under another memory context (for use outside transactions). */
extern CiflowConnection *CiflowCopyConnection(const CiflowConnection *conn,
											  MemoryContext parent);

/* Wipes and frees a connection (NULL is fine). */
extern void CiflowFreeConnection(CiflowConnection *conn);

#endif							/* CIFLOW_CONNECTION_H */
