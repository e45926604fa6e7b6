/*-------------------------------------------------------------------------
 *
 * launcher.h
 *	  The launcher: the background worker that runs ciflow's jobs.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CIFLOW_LAUNCHER_H
#define CIFLOW_LAUNCHER_H

/* _PG_init, while shared_preload_libraries is processed. */
extern void CiflowLauncherRegister(void);

/* _PG_init, in every process: the commit hook below. */
extern void CiflowLauncherInit(void);

/*
 * Wakes the launcher when the current transaction commits (jobs changed,
 * an event recorded); nothing happens if it aborts.
 */
extern void CiflowLauncherWakeAtCommit(void);

/* A WARNING when no launcher will run the jobs of this database. */
extern void CiflowLauncherCheckDatabase(void);

#endif							/* CIFLOW_LAUNCHER_H */
