/*-------------------------------------------------------------------------
 *
 * ciflow.h
 *	  Settings shared by every part of ciflow, and the privilege switch used
 *	  to touch ciflow's own catalog tables.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CIFLOW_H
#define CIFLOW_H

#include "postgres.h"

#include "fmgr.h"

/*
 * Every GUC of ciflow lives in one struct so that a sync can hand the
 * caller's values to the background worker that runs it in one copy.
 */
typedef struct CiflowSettings
{
	int			connect_timeout_ms;
	int			request_timeout_ms;
	int			max_response_kb;
	int			max_attempts;
	int			retry_base_delay_ms;
	int			max_retry_after_s;
	int			max_pages;
} CiflowSettings;

extern CiflowSettings ciflow_settings;

/* Run SQL on ciflow's catalog tables as their owner, whoever the caller is. */
typedef struct CiflowSavedUser
{
	Oid			userid;
	int			sec_context;
} CiflowSavedUser;

extern void CiflowBecomeOwner(CiflowSavedUser *saved);
extern void CiflowRestoreUser(const CiflowSavedUser *saved);

/* Wipes a palloc'd string that held a secret, then frees it (NULL is fine). */
extern void CiflowFreeSecret(char *s);

/* Argument n of a SQL-callable function as a C string, or NULL. */
extern char *CiflowTextArg(FunctionCallInfo fcinfo, int n);

/* Lower-case letters, digits and underscores, not starting with a digit. */
extern bool CiflowIsSimpleName(const char *name);

#endif							/* CIFLOW_H */
