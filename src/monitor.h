/*-------------------------------------------------------------------------
 *
 * monitor.h
 *	  One monitoring pass of a connection: the calls, and the comparison of
 *	  what they answer with ciflow.refresh_states and ciflow.thresholds.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CIFLOW_MONITOR_H
#define CIFLOW_MONITOR_H

#include "access/tupdesc.h"
#include "nodes/pg_list.h"

/*
 * Runs a pass in the caller's transaction: every call first, then, under a
 * lock that serializes passes of the connection, the states, events and
 * notifications.  Returns the new rows of ciflow.events (HeapTuples with
 * *desc).  A worker (ciflow.watch) is meant to call this too.
 */
extern List *CiflowMonitorPass(const char *connection, TupleDesc *desc);

#endif							/* CIFLOW_MONITOR_H */
