"""Helpers of the background worker tests (issue 9): a cluster with ciflow
preloaded, and waits on ciflow.jobs and the launcher."""

import time

from harness import PgCluster, wait_for
from extension.cihelpers import (connection_args, create_connection_sql, dict_rows,  # noqa: F401
                                 wait_up)

# Job runs take the launcher's settings (the server's configuration), not a
# database's: retries are kept short here.
WORKER_SETTINGS = {
    "ciflow.max_attempts": 1,
    "ciflow.retry_base_delay": "20ms",
    "ciflow.max_backoff": "2s",
    "max_worker_processes": 16,
}


def preloaded_cluster(**settings):
    """A started cluster with ciflow preloaded (stop it with cleanup())."""
    pg = PgCluster(preload=True, settings=dict(WORKER_SETTINGS, **settings))
    pg.start()
    return pg


def make_emu_connection(pg, emulator, name="emu", dbname="postgres"):
    query, params = create_connection_sql(name, connection_args(emulator))
    pg.sql(query, params, dbname=dbname)


def job(pg, job_id, dbname="postgres"):
    rows = dict_rows(pg.database(dbname), "SELECT * FROM ciflow.jobs WHERE id = %s", (job_id,))
    return rows[0] if rows else None


def wait_job(pg, job_id, predicate, timeout=30, what="the job", dbname="postgres"):
    """Waits until predicate(row of ciflow.jobs) holds; returns the row."""
    found = {}

    def check():
        row = job(pg, job_id, dbname)
        if row is not None and predicate(row):
            found["row"] = row
            return True
        return False
    wait_for(check, timeout=timeout, what=what)
    return found["row"]


def status(pg, dbname="postgres"):
    return dict_rows(pg.database(dbname), "SELECT * FROM ciflow.worker_status()")[0]


def runs(pg, dbname="postgres"):
    return dict_rows(pg.database(dbname), "SELECT * FROM ciflow.sync_runs ORDER BY id")


def stable(fn, seconds):
    """fn() gives the same value for `seconds`; returns it."""
    first = fn()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert fn() == first
        time.sleep(0.2)
    return first


def wait_new_launcher(pg, old_pid, timeout=60):
    """After a crash: waits for the server and a launcher other than
    old_pid that is running (connection errors while it recovers are
    retried)."""
    def back():
        try:
            st = status(pg)
        except Exception:  # noqa: BLE001 - still recovering
            return False
        return st["state"] == "running" and st["pid"] not in (None, old_pid)
    wait_for(back, timeout=timeout, what="a new launcher")
    wait_up(pg)
