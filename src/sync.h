/*-------------------------------------------------------------------------
 *
 * sync.h
 *	  The sync executor: one run of one entity into one table, in short
 *	  transactions of its own.  It runs in a background worker (syncworker.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef CIFLOW_SYNC_H
#define CIFLOW_SYNC_H

#include "runs.h"

typedef struct CiflowSyncArgs
{
	const char *connection;
	const char *entity;
	const char *schema;			/* resolved target */
	const char *table;
	const char *filter;			/* or NULL */
	const char *fields;			/* or NULL */
	const char *mode;			/* "full" or "incremental" */
	const char *publish;		/* "diff" or "swap" */
	bool		adopt;			/* may fill a non-empty table no run filled */
} CiflowSyncArgs;

/* The primary message of every error of a sync, wherever it is raised. */
extern char *CiflowSyncFailMessage(const char *connection, const char *entity);

/*
 * Runs the sync.  Must be called outside a transaction.  On success fills
 * *run; on failure records the failed run and re-raises the error with the
 * run and page in its DETAIL.
 */
extern void CiflowSyncExecute(const CiflowSyncArgs *args, CiflowRunState *run);

#endif							/* CIFLOW_SYNC_H */
