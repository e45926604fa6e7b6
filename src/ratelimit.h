/*-------------------------------------------------------------------------
 *
 * ratelimit.h
 *	  The client-side call limit: at most max_calls calls per per_interval
 *	  per connection, counted across every session and worker.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CIFLOW_RATELIMIT_H
#define CIFLOW_RATELIMIT_H

#include "connection.h"

/*
 * The largest max_calls a connection may have: the capacity of the exact
 * sliding window, one timestamp per call in shared memory (32 slots of
 * 6000 take 1.5 MB).  Above it, have no client-side limit (max_calls NULL).
 */
#define CIFLOW_MAX_CALLS_LIMIT 6000

/* From _PG_init, while shared_preload_libraries is processed. */
extern void CiflowRateLimitInit(void);

/* Waits (interruptibly) for a free call slot, then takes it. */
extern void CiflowRateLimitAcquire(const CiflowConnection *conn);

#endif							/* CIFLOW_RATELIMIT_H */
