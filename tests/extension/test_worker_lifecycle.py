"""The launcher's survival (issue 9): a missing, dropped or re-created
extension, a database that does not exist, kill -9 of the launcher with a
LISTEN client that reconnects, and the retention trims the launcher does at
its start.  Each test has a cluster of its own (crashes end every session).
"""

import os
import signal
import time

import pytest

from harness import wait_for
from extension.cihelpers import dict_rows
from extension.eventhelpers import Listener, finish_job, new_job
from extension.workerhelpers import (job, make_emu_connection, preloaded_cluster, runs,
                                     status, wait_job, wait_new_launcher, wait_up)


@pytest.fixture
def cluster_factory():
    made = []

    def make(**settings):
        pg = preloaded_cluster(**settings)
        made.append(pg)
        return pg
    yield make
    for pg in made:
        pg.cleanup()


def launcher_pids(pg):
    return [r[0] for r in pg.sql("SELECT pid FROM pg_stat_activity"
                                 " WHERE backend_type = 'ciflow launcher'")]


def test_extension_missing_dropped_and_created_again(cluster_factory, emulator):
    pg = cluster_factory(log_min_messages="log")
    wait_for(lambda: launcher_pids(pg), timeout=20, what="the launcher")
    pid = launcher_pids(pg)[0]
    time.sleep(6)
    # It waits, without exiting, and says so once (at most once a minute).
    assert launcher_pids(pg) == [pid]
    assert pg.log_text().count('extension "ciflow" is not installed') == 1

    pg.sql("CREATE EXTENSION ciflow")
    wait_for(lambda: status(pg)["state"] == "running", timeout=15, what="the launcher to see it")
    make_emu_connection(pg, emulator)
    job_id = pg.sql("SELECT ciflow.watch('emu', every => '1 second')")[0][0]
    wait_job(pg, job_id, lambda r: r["last_status"] == "succeeded", what="a pass")

    offset = pg.log_size()
    pg.sql("DROP EXTENSION ciflow CASCADE")
    time.sleep(3)
    pg.sql("CREATE EXTENSION ciflow")
    wait_for(lambda: status(pg)["state"] == "running", timeout=15, what="the launcher again")
    assert launcher_pids(pg) == [pid]
    make_emu_connection(pg, emulator)
    job_id = pg.sql("SELECT ciflow.watch('emu', every => '1 second')")[0][0]
    wait_job(pg, job_id, lambda r: r["last_status"] == "succeeded", what="a pass after")
    log = pg.log_since(offset)
    assert "server process" not in log and "terminated by signal" not in log, log
    assert log.count("ciflow launcher:") <= 2, log


def test_database_that_does_not_exist(cluster_factory):
    pg = cluster_factory(**{"ciflow.database": "no_such_db"})
    time.sleep(5)
    assert pg.sql("SELECT 1") == [(1,)]
    assert pg.log_text().count('database "no_such_db" does not exist') == 1
    assert launcher_pids(pg) == []


def test_killed_launcher_misses_no_event_and_repeats_none(cluster_factory, emulator):
    pg = cluster_factory()
    pg.sql("CREATE EXTENSION ciflow")
    make_emu_connection(pg, emulator)
    sync_job = pg.sql("SELECT ciflow.schedule_sync('emu', 'Customer',"
                      " on_event => 'full_refresh_completed')")[0][0]
    watch_job = pg.sql("SELECT ciflow.watch('emu', every => '1 second')")[0][0]
    wait_job(pg, watch_job, lambda r: r["last_status"] == "succeeded", what="a baseline")

    db = pg.database("postgres")
    listener = Listener(db, channels=("ciflow_full_refresh_completed",))
    refresh = new_job(emulator, operationType="all", submissionKind="scheduled")
    finish_job(emulator, refresh)
    wait_job(pg, sync_job, lambda r: r["last_status"] == "succeeded", what="the first sync")
    first = listener.drain(wait=1.0)
    assert len(first) == 1
    seen = first[0][1]["id"]

    # kill -9 of the launcher: the postmaster restarts every process.
    old = status(pg)["pid"]
    os.kill(old, signal.SIGKILL)
    time.sleep(1)
    wait_new_launcher(pg, old)
    listener = Listener(db, channels=("ciflow_full_refresh_completed",))
    # A subscriber that was away catches up from the table.
    assert pg.sql("SELECT id FROM ciflow.events WHERE kind = 'full_refresh_completed'"
                  " AND id > %s", (seen,)) == []

    refresh = new_job(emulator, operationType="all", submissionKind="onDemand")
    finish_job(emulator, refresh)
    wait_for(lambda: len(runs(pg)) == 2, timeout=30, what="the second sync")
    got = listener.drain(wait=1.0)
    assert [p["subject"] for _, p, _ in got] == [refresh]
    time.sleep(2.5)
    assert len(runs(pg)) == 2 and all(r["status"] == "succeeded" for r in runs(pg))
    assert pg.sql("SELECT count(*) FROM ciflow.events WHERE kind = 'full_refresh_completed'") \
        == [(2,)]
    assert job(pg, sync_job)["event_cursor"] == pg.sql(
        "SELECT max(id) FROM ciflow.events WHERE kind = 'full_refresh_completed'")[0][0]
    listener.close()


def test_launcher_trims_old_runs_and_events(cluster_factory):
    pg = cluster_factory(**{"ciflow.run_retention": "1h", "ciflow.event_retention": "1h"})
    pg.sql("CREATE EXTENSION ciflow")
    old = "now() - interval '2 days'"
    for target, st in (("a.x", "succeeded"), ("a.x", "succeeded"), ("a.x", "failed"),
                       ("b.y", "failed")):
        pg.sql("INSERT INTO ciflow.sync_runs (connection, entity, target, mode, status,"
               f" started_at, finished_at) VALUES ('c', 'E', %s, 'full', %s, {old}, {old})",
               (target, st))
    pg.sql("INSERT INTO ciflow.sync_runs (connection, entity, target, mode, status,"
           " finished_at) VALUES ('c', 'E', 'a.x', 'full', 'failed', now())")
    pg.sql("INSERT INTO ciflow.events (connection, kind, subject, payload, dedupe_key,"
           f" created_at) VALUES ('c', 'sync_failed', 's', '{{}}', 'k1', {old}),"
           " ('c', 'sync_failed', 's', '{}', 'k2', now())")
    pg.restart()
    wait_up(pg)
    wait_for(lambda: pg.sql("SELECT count(*) FROM ciflow.events") == [(1,)], timeout=20,
             what="the trim")
    left = dict_rows(pg.database("postgres"),
                     "SELECT id, target, status FROM ciflow.sync_runs ORDER BY id")
    # The last success of a.x stays (the next sync reads it), and the recent run.
    assert [(r["id"], r["status"]) for r in left] == [(2, "succeeded"), (5, "failed")]
    assert pg.sql("SELECT dedupe_key FROM ciflow.events") == [("k2",)]
