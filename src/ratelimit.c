/*-------------------------------------------------------------------------
 *
 * ratelimit.c
 *	  The client-side call limit: at most max_calls calls in any window of
 *	  per_interval, per connection, across every session and worker.
 *
 *	  Each connection has a slot holding the times of its recent calls in a
 *	  ring (an exact sliding window: a token bucket would allow up to twice
 *	  the limit in some windows).  A caller that finds the window full
 *	  sleeps on its latch until the oldest call leaves it, then tries again;
 *	  cancel and terminate interrupt the wait.
 *
 *	  The slots live in shared memory when ciflow is in
 *	  shared_preload_libraries.  Otherwise each process keeps its own slots:
 *	  the limit then holds per session and per sync, not across them (the
 *	  README says so).  Slots are keyed by connection name; with more
 *	  connections than slots, the least recently used slot is reused.
 *
 *	  A connection with max_calls 0 (NULL in SQL) has no client-side limit:
 *	  its calls take no slot.  The window of a slot holds at most
 *	  CIFLOW_MAX_CALLS_LIMIT calls (one timestamp each, in shared memory);
 *	  services that take more than that per interval enforce their own
 *	  limit, and connections to them should have none.
 *
 *	  This file only counts and waits; it never talks to the service.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "pgstat.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "ratelimit.h"

#define LIMITER_SLOTS 32

typedef struct LimiterSlot
{
	char		connection[NAMEDATALEN];	/* "" when free */
	TimestampTz last_used;
	int			head;			/* index of the oldest call */
	int			count;			/* calls in the ring */
	TimestampTz calls[CIFLOW_MAX_CALLS_LIMIT];
} LimiterSlot;

typedef struct LimiterState
{
	LWLock	   *lock;			/* NULL in the per-process fallback */
	LimiterSlot slots[LIMITER_SLOTS];
} LimiterState;

static LimiterState *limiter = NULL;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

static void
LimiterShmemRequest(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(LimiterState)));
	RequestNamedLWLockTranche("ciflow_ratelimit", 1);
}

static void
LimiterShmemStartup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	limiter = ShmemInitStruct("ciflow rate limiter", sizeof(LimiterState), &found);
	if (!found)
	{
		memset(limiter, 0, sizeof(LimiterState));
		limiter->lock = &(GetNamedLWLockTranche("ciflow_ratelimit"))->lock;
	}
	LWLockRelease(AddinShmemInitLock);
}

void
CiflowRateLimitInit(void)
{
	if (!process_shared_preload_libraries_in_progress)
		return;
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = LimiterShmemRequest;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = LimiterShmemStartup;
}

/* Not preloaded: this process's own slots, never shared. */
static LimiterState *
GetLimiter(void)
{
	if (limiter == NULL)
		limiter = MemoryContextAllocZero(TopMemoryContext, sizeof(LimiterState));
	return limiter;
}

static LimiterSlot *
FindSlot(LimiterState *state, const char *connection)
{
	LimiterSlot *lru = &state->slots[0];
	int			i;

	for (i = 0; i < LIMITER_SLOTS; i++)
	{
		LimiterSlot *slot = &state->slots[i];

		if (strcmp(slot->connection, connection) == 0)
			return slot;
		if (slot->last_used < lru->last_used)
			lru = slot;
	}
	/* Free slots have last_used 0, so they are taken before any used one. */
	strlcpy(lru->connection, connection, NAMEDATALEN);
	lru->head = 0;
	lru->count = 0;
	return lru;
}

/*
 * Takes a call slot if the window has room; otherwise returns how long to
 * wait (in microseconds) before the oldest call leaves the window.
 */
static int64
TryTakeSlot(LimiterSlot *slot, int max_calls, int64 interval_us, TimestampTz now)
{
	max_calls = Min(max_calls, CIFLOW_MAX_CALLS_LIMIT);
	while (slot->count > 0 && slot->calls[slot->head] <= now - interval_us)
	{
		slot->head = (slot->head + 1) % CIFLOW_MAX_CALLS_LIMIT;
		slot->count--;
	}
	slot->last_used = now;
	/* A lowered max_calls: the window holds more calls than allowed now. */
	if (slot->count >= max_calls)
	{
		int			oldest_needed = (slot->head + slot->count - max_calls) % CIFLOW_MAX_CALLS_LIMIT;

		return Max(slot->calls[oldest_needed] + interval_us - now, 1);
	}
	slot->calls[(slot->head + slot->count) % CIFLOW_MAX_CALLS_LIMIT] = now;
	slot->count++;
	return 0;
}

void
CiflowRateLimitAcquire(const CiflowConnection *conn)
{
	LimiterState *state;
	int64		interval_us = conn->per_interval_ms * 1000;

	if (conn->max_calls <= 0)
		return;
	state = GetLimiter();
	for (;;)
	{
		int64		wait_us;

		CHECK_FOR_INTERRUPTS();
		if (state->lock)
			LWLockAcquire(state->lock, LW_EXCLUSIVE);
		wait_us = TryTakeSlot(FindSlot(state, conn->name), conn->max_calls,
							  interval_us, GetCurrentTimestamp());
		if (state->lock)
			LWLockRelease(state->lock);
		if (wait_us == 0)
			return;

		elog(DEBUG1, "ciflow: connection \"%s\" is at its call limit; waiting %lld ms",
			 conn->name, (long long) (wait_us / 1000));
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 (long) ((wait_us + 999) / 1000), PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}
