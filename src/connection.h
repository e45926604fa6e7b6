/*-------------------------------------------------------------------------
 *
 * connection.h
 *	  A connection's settings and secrets, as the request path needs them.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CIFLOW_CONNECTION_H
#define CIFLOW_CONNECTION_H

typedef enum CiflowFlavor
{
	CIFLOW_FLAVOR_CUSTOMER_INSIGHTS,
	CIFLOW_FLAVOR_DATAVERSE,
	CIFLOW_FLAVOR_ODATA
} CiflowFlavor;

typedef struct CiflowConnection
{
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
	int			max_calls;
	int64		per_interval_ms;
	int			page_size;
} CiflowConnection;

/* Needs a transaction; raises 42704 if the connection does not exist. */
extern CiflowConnection *CiflowGetConnection(const char *name);

/* Deep copy into another memory context (for use outside transactions). */
extern CiflowConnection *CiflowCopyConnection(const CiflowConnection *conn,
											  MemoryContext cxt);

#endif							/* CIFLOW_CONNECTION_H */
