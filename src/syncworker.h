/*-------------------------------------------------------------------------
 *
 * syncworker.h
 *	  Starting the run worker for a job (the launcher), as ciflow.sync
 *	  starts it for its caller.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CIFLOW_SYNCWORKER_H
#define CIFLOW_SYNCWORKER_H

#include "postmaster/bgworker.h"
#include "storage/dsm.h"

#include "jobs.h"

/*
 * Starts a worker for one run of job (a sync or a monitoring pass, as the
 * job's owner), or for a delivery pass when job is NULL, notifying this
 * process when it starts and stops.  Returns
 * the segment, mapped until the caller detaches it, or NULL (and *error)
 * when no worker slot is free.
 */
extern dsm_segment *CiflowStartJobWorker(const CiflowJob *job,
										 BackgroundWorkerHandle **handle,
										 const char **error);

/* Whether the worker of that segment reached the end of its run. */
extern bool CiflowJobWorkerFinished(dsm_segment *seg);

#endif							/* CIFLOW_SYNCWORKER_H */
