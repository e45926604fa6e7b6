"""The background worker (issue 9): scheduled syncs and watches run by the
launcher, as their owner, recorded in ciflow.jobs; crash-interrupted runs
marked when the launcher comes back.

One cluster with ciflow preloaded for the module (ciflow.database is the
default, postgres); each test gets the connection 'emu' to a freshly reset
emulator and no jobs.
"""

import datetime as dt
import os
import signal
import threading
import time

import pytest

from harness import wait_for
from extension.cihelpers import dict_rows, raises_sqlstate
from extension.eventhelpers import Listener, finish_job, new_job, set_datasource
from extension.workerhelpers import (job, make_emu_connection, preloaded_cluster, runs,
                                     stable, status, wait_job, wait_new_launcher,
                                     wait_up)

SLOW_MATCH = {"method": "GET", "path": "/data/Customer$", "query": r"(\$|%24)skip=200(&|$)"}


@pytest.fixture(scope="module")
def wpg():
    pg = preloaded_cluster()
    try:
        pg.sql("CREATE EXTENSION ciflow")
        wait_for(lambda: status(pg)["state"] == "running", timeout=30, what="the launcher")
        yield pg
    finally:
        pg.cleanup()


@pytest.fixture
def w(wpg, emulator):
    make_emu_connection(wpg, emulator)
    yield wpg
    wpg.sql("DELETE FROM ciflow.job_definitions")
    wait_for(lambda: wpg.sql("SELECT count(*) FROM pg_stat_activity"
                             " WHERE backend_type IN ('ciflow sync', 'ciflow watch')") == [(0,)],
             timeout=30, what="the job runs to end")
    wpg.sql("SELECT ciflow.drop_connection('emu', if_exists => true)")
    wpg.sql("DROP SCHEMA IF EXISTS emu CASCADE")
    wpg.sql("DELETE FROM ciflow.sync_runs")
    wpg.sql("DELETE FROM ciflow.events")
    wpg.sql("DELETE FROM ciflow.refresh_states")
    wpg.sql("DROP ROLE IF EXISTS jobber")


def staged_tables(pg):
    return pg.sql("SELECT relname FROM pg_class WHERE relname LIKE 'ciflow_stage_%'")


def test_every_job_syncs_until_unscheduled(w):
    job_id = w.sql("SELECT ciflow.schedule_sync('emu', 'Customer', every => '1 second')")[0][0]
    row = wait_job(w, job_id, lambda r: r["last_status"] == "succeeded", what="a first run")
    assert row["kind"] == "sync" and row["connection"] == "emu" and row["entity"] == "Customer"
    assert row["target"] == "emu.customer" and row["mode"] == "full"
    assert row["schedule"] == "every 00:00:01" and row["enabled"] and row["owner"] == "postgres"
    assert row["consecutive_failures"] == 0
    assert row["last_started_at"] <= row["last_finished_at"]
    assert row["next_run_at"] > row["last_started_at"]
    run = [r for r in runs(w) if r["id"] == row["last_run_id"]][0]
    assert run["status"] == "succeeded" and run["rows"] == 250 and run["run_by"] == "postgres"
    assert w.sql("SELECT count(*) FROM emu.customer") == [(250,)]

    # It keeps running on its schedule, never two runs at once.
    wait_for(lambda: len(runs(w)) >= 3, timeout=20, what="three runs")
    assert w.sql("SELECT ciflow.unschedule(%s)", (job_id,)) == [(True,)]
    assert w.sql("SELECT ciflow.unschedule(%s)", (job_id,)) == [(False,)]
    wait_for(lambda: w.sql("SELECT count(*) FROM ciflow.sync_runs WHERE status = 'running'")
             == [(0,)], timeout=20, what="the last run to end")
    stable(lambda: len(runs(w)), 2.5)


def test_schedule_arguments_are_checked(w):
    with raises_sqlstate("22023"):
        w.sql("SELECT ciflow.schedule_sync('emu', 'Customer')")
    with raises_sqlstate("22023"):
        w.sql("SELECT ciflow.schedule_sync('emu', 'Customer', every => '1 hour',"
              " cron => '* * * * *')")
    with raises_sqlstate("22023"):
        w.sql("SELECT ciflow.schedule_sync('emu', 'Customer', every => '10 ms')")
    with raises_sqlstate("22023"):
        w.sql("SELECT ciflow.schedule_sync('emu', 'Customer', on_event => 'no_such_kind')")
    with raises_sqlstate("22023"):
        w.sql("SELECT ciflow.schedule_sync('emu', 'Customer', every => '1 hour', mode => 'x')")
    with raises_sqlstate("42704"):
        w.sql("SELECT ciflow.schedule_sync('nope', 'Customer', every => '1 hour')")
    with raises_sqlstate("22023"):
        w.sql("SELECT ciflow.watch('emu')")
    assert w.sql("SELECT count(*) FROM ciflow.job_definitions") == [(0,)]


def test_watch_raises_events_that_reach_listeners(w, emulator):
    listener = Listener(w.database("postgres"))
    try:
        job_id = w.sql("SELECT ciflow.watch('emu', every => '1 second')")[0][0]
        # The first pass is a baseline: no event.
        wait_job(w, job_id, lambda r: r["last_status"] == "succeeded", what="a first pass")
        assert w.sql("SELECT count(*) FROM ciflow.events") == [(0,)]
        set_datasource(emulator, "RetailPos", refreshState="updateFailed", lastRefresh="now")
        wait_for(lambda: w.sql("SELECT count(*) FROM ciflow.events") == [(1,)], timeout=20,
                 what="the watch to record the failure")
        ev = dict_rows(w.database("postgres"), "SELECT * FROM ciflow.events")[0]
        assert ev["kind"] == "datasource_refresh_failed"
        got = listener.drain(wait=1.0)
        assert [(c, p["id"]) for c, p, _ in got] == [
            ("ciflow_events", ev["id"]), ("ciflow_datasource_refresh_failed", ev["id"])]
        row = job(w, job_id)
        assert row["kind"] == "watch" and row["entity"] is None and row["mode"] is None
        # Later passes do not repeat it.
        time.sleep(2.5)
        assert w.sql("SELECT count(*) FROM ciflow.events") == [(1,)]
        assert listener.drain(wait=0.2) == []
    finally:
        listener.close()


def test_on_event_job_syncs_once_per_event(w, emulator):
    sync_job = w.sql("SELECT ciflow.schedule_sync('emu', 'Customer',"
                     " on_event => 'full_refresh_completed')")[0][0]
    watch_job = w.sql("SELECT ciflow.watch('emu', every => '1 second')")[0][0]
    wait_job(w, watch_job, lambda r: r["last_status"] == "succeeded", what="a baseline pass")
    assert job(w, sync_job)["last_status"] is None and runs(w) == []

    refresh = new_job(emulator, operationType="all", submissionKind="scheduled")
    finish_job(emulator, refresh)
    row = wait_job(w, sync_job, lambda r: r["last_status"] == "succeeded", what="the sync")
    event_id = w.sql("SELECT id FROM ciflow.events WHERE kind = 'full_refresh_completed'")[0][0]
    assert row["event_cursor"] == event_id
    assert len(runs(w)) == 1
    # Further watches see nothing new: no second sync.
    time.sleep(3)
    assert len(runs(w)) == 1

    # A poll of the connection in a session counts too, after it commits.
    refresh = new_job(emulator, operationType="all", submissionKind="onDemand")
    finish_job(emulator, refresh)
    w.sql("SELECT ciflow.alter_job(%s, enabled => false)", (watch_job,))
    w.sql("SELECT * FROM ciflow.poll('emu')")
    wait_for(lambda: len(runs(w)) == 2, timeout=20, what="a second sync")
    time.sleep(1.5)
    assert len(runs(w)) == 2


def test_paused_job_does_not_run(w):
    job_id = w.sql("SELECT ciflow.watch('emu', every => '1 second')")[0][0]
    wait_job(w, job_id, lambda r: r["last_status"] == "succeeded", what="a first pass")
    w.sql("SELECT ciflow.alter_job(%s, enabled => false)", (job_id,))
    assert not job(w, job_id)["enabled"]
    time.sleep(1.5)
    before = job(w, job_id)["last_started_at"]
    time.sleep(2)
    assert job(w, job_id)["last_started_at"] == before
    w.sql("SELECT ciflow.alter_job(%s, enabled => true, every => '2 seconds')", (job_id,))
    row = wait_job(w, job_id, lambda r: r["last_started_at"] > before, what="a resumed run")
    assert row["schedule"] == "every 00:00:02"


def test_failing_job_backs_off_and_recovers(w, emulator):
    emulator.add_fault({"method": "GET", "path": "/data/Customer"}, {"status": 500})
    bad = w.sql("SELECT ciflow.schedule_sync('emu', 'Customer', every => '1 second')")[0][0]
    good = w.sql("SELECT ciflow.watch('emu', every => '1 second')")[0][0]
    row = wait_job(w, bad, lambda r: r["consecutive_failures"] >= 3, timeout=30,
                   what="three failures")
    assert row["last_status"] == "failed" and "500" in (row["last_error"] or ""), row
    # Capped at ciflow.max_backoff (2s).
    assert row["next_run_at"] - row["last_finished_at"] <= dt.timedelta(seconds=2.1)
    # One bad job does not stop the others.
    assert job(w, good)["consecutive_failures"] == 0
    assert job(w, good)["last_status"] in ("succeeded", "running")
    failed = [r for r in runs(w) if r["status"] == "failed"]
    assert failed and failed[-1]["http_status"] == 500

    emulator.clear_faults()
    row = wait_job(w, bad, lambda r: r["last_status"] == "succeeded", timeout=20,
                   what="recovery")
    assert row["consecutive_failures"] == 0 and row["last_error"] is None


def test_jobs_run_as_their_owner(w):
    w.sql("CREATE ROLE jobber LOGIN")
    w.sql("GRANT USAGE ON SCHEMA ciflow TO jobber")
    w.sql("GRANT SELECT ON ciflow.jobs TO jobber")
    w.sql("GRANT EXECUTE ON FUNCTION ciflow.watch(text, interval, text),"
          " ciflow.unschedule(bigint) TO jobber")
    with raises_sqlstate("42501"):
        w.sql("SELECT ciflow.watch('emu', every => '1 second')", user="jobber")
    w.sql("SELECT ciflow.grant_connection('emu', 'jobber')")
    job_id = w.sql("SELECT ciflow.watch('emu', every => '1 second')", user="jobber")[0][0]
    row = wait_job(w, job_id, lambda r: r["last_status"] == "succeeded", what="a pass")
    assert row["owner"] == "jobber"
    assert [r[0] for r in w.sql("SELECT id FROM ciflow.jobs", user="jobber")] == [job_id]

    other = w.sql("SELECT ciflow.watch('emu', every => '1 hour')")[0][0]
    assert w.sql("SELECT id FROM ciflow.jobs", user="jobber") == [(job_id,)]
    with raises_sqlstate("42501"):
        w.sql("SELECT ciflow.unschedule(%s)", (other,), user="jobber")

    # The owner loses its privilege: its job fails alone, saying why.
    w.sql("SELECT ciflow.revoke_connection('emu', 'jobber')")
    row = wait_job(w, job_id, lambda r: r["last_status"] == "failed", what="a failure")
    assert "emu" in row["last_error"] and "permission" in row["last_error"].lower(), row
    assert job(w, other)["last_status"] == "succeeded"

    # Its owner dropped: the job fails with a clear error.
    w.sql("SELECT ciflow.unschedule(%s)", (other,))
    w.sql("REVOKE ALL ON ciflow.jobs FROM jobber")
    w.sql("REVOKE ALL ON SCHEMA ciflow FROM jobber")
    w.sql("REVOKE ALL ON FUNCTION ciflow.watch(text, interval, text),"
          " ciflow.unschedule(bigint) FROM jobber")
    w.sql("DROP ROLE jobber")
    t0 = job(w, job_id)["last_finished_at"]

    def orphan_failure(r):
        # A run under way has no finish yet: wait for one that ends after t0.
        finished = r["last_finished_at"]
        return (finished is not None and (t0 is None or finished > t0)
                and "no longer exists" in (r["last_error"] or ""))
    row = wait_job(w, job_id, orphan_failure, what="an orphan failure")
    assert row["owner"].startswith("unknown (OID=")


def test_worker_status_shows_the_launcher_and_its_children(w, emulator):
    st = status(w)
    assert st["state"] == "running" and st["database"] == "postgres" and st["pid"] > 0
    assert st["max_concurrent_jobs"] == 4
    emulator.add_fault(SLOW_MATCH, {"delay_ms": 3000})
    job_id = w.sql("SELECT ciflow.schedule_sync('emu', 'Customer', every => '1 hour')")[0][0]
    wait_for(lambda: status(w)["running"] == 1, timeout=20, what="a running child")
    child = status(w)["children"][0]
    assert child["job_id"] == job_id and child["pid"] > 0
    assert w.sql("SELECT backend_type FROM pg_stat_activity WHERE pid = %s",
                 (child["pid"],)) == [("ciflow sync",)]
    assert job(w, job_id)["last_status"] == "running"
    wait_job(w, job_id, lambda r: r["last_status"] == "succeeded", what="the run")
    wait_for(lambda: status(w)["running"] == 0, timeout=10, what="the child collected")


def test_max_concurrent_jobs_and_sighup(w, emulator):
    w.sql("ALTER SYSTEM SET ciflow.max_concurrent_jobs = 1")
    w.sql("SELECT pg_reload_conf()")
    try:
        wait_for(lambda: status(w)["max_concurrent_jobs"] == 1, timeout=10,
                 what="the reload")
        emulator.add_fault(SLOW_MATCH, {"delay_ms": 2000})
        a = w.sql("SELECT ciflow.schedule_sync('emu', 'Customer', every => '1 hour')")[0][0]
        b = w.sql("SELECT ciflow.schedule_sync('emu', 'Customer', every => '1 hour',"
                  " target => 'emu.customer2')")[0][0]
        seen = set()

        def both_done():
            seen.add(status(w)["running"])
            return (job(w, a)["last_status"] == "succeeded"
                    and job(w, b)["last_status"] == "succeeded")
        wait_for(both_done, timeout=30, what="both jobs, one after the other")
        assert max(seen) <= 1
    finally:
        w.sql("ALTER SYSTEM RESET ciflow.max_concurrent_jobs")
        w.sql("SELECT pg_reload_conf()")
    wait_for(lambda: status(w)["max_concurrent_jobs"] == 4, timeout=10, what="the reset")


def test_drop_database_is_not_blocked(w):
    w.sql("CREATE DATABASE other_db")
    w.sql("SELECT ciflow.watch('emu', every => '1 second')")
    started = time.monotonic()
    w.sql("DROP DATABASE other_db")
    assert time.monotonic() - started < 3


def test_killed_sync_worker_run_is_marked_and_work_resumes(w, emulator):
    emulator.add_fault(SLOW_MATCH, {"delay_ms": 30000})
    job_id = w.sql("SELECT ciflow.schedule_sync('emu', 'Customer', every => '1 hour')")[0][0]
    wait_for(lambda: w.sql("SELECT pages FROM ciflow.sync_progress") == [(2,)], timeout=20,
             what="two pages loaded")
    assert staged_tables(w) != []
    run_id = w.sql("SELECT run_id FROM ciflow.sync_progress")[0][0]
    pid = w.sql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'ciflow sync'")[0][0]
    old_launcher = status(w)["pid"]
    emulator.clear_faults()
    os.kill(pid, signal.SIGKILL)
    time.sleep(1)
    wait_new_launcher(w, old_launcher)
    run = [r for r in runs(w) if r["id"] == run_id][0]
    assert run["error"] == "interrupted by a server crash or restart"
    # The job was due: it runs again at once, and fills the table.
    row = wait_job(w, job_id, lambda r: r["last_status"] == "succeeded", timeout=30,
                   what="the job to run again")
    assert row["consecutive_failures"] == 0
    assert staged_tables(w) == []
    assert w.sql("SELECT count(*) FROM ciflow.sync_progress") == [(0,)]
    assert w.sql("SELECT count(*) FROM emu.customer") == [(250,)]
    assert [r["status"] for r in runs(w)] == ["failed", "succeeded"]


def test_restart_marks_a_running_run_of_any_target(w, emulator):
    """A run whose process is gone, whatever its target and however it ended,
    is failed when the launcher starts; pg_ctl restart keeps the jobs."""
    job_id = w.sql("SELECT ciflow.watch('emu', every => '1 second')")[0][0]
    wait_job(w, job_id, lambda r: r["last_status"] == "succeeded", what="a pass")
    w.sql("INSERT INTO ciflow.sync_runs (connection, entity, target, mode, pid)"
          " VALUES ('emu', 'Ghost', 'emu.ghost', 'full', 999999)")
    # No process runs it: sync_progress does not show it.
    assert w.sql("SELECT count(*) FROM ciflow.sync_progress") == [(0,)]
    w.restart()
    wait_up(w)
    wait_for(lambda: w.sql("SELECT status, error FROM ciflow.sync_runs WHERE entity = 'Ghost'")
             == [("failed", "interrupted by a server crash or restart")], timeout=30,
             what="the ghost run marked")
    t0 = w.sql("SELECT now()")[0][0]
    wait_job(w, job_id, lambda r: r["last_started_at"] > t0 and r["last_status"] == "succeeded",
             what="the watch to resume")


def test_jobs_of_another_database_warn(w, emulator):
    w.sql("CREATE DATABASE elsewhere")
    try:
        w.sql("CREATE EXTENSION ciflow", dbname="elsewhere")
        make_emu_connection(w, emulator, dbname="elsewhere")
        conn = w.connect(dbname="elsewhere")
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT ciflow.watch('emu', every => '1 hour')")
            assert any('the jobs of database "elsewhere" do not run' in n
                       for n in conn.notices), conn.notices
        finally:
            conn.close()
    finally:
        w.sql("DROP DATABASE elsewhere")


def test_a_killed_session_sync_is_cleaned_up_by_the_launcher(w, emulator):
    """Today's ghost: a sync of a session killed with -9.  The launcher that
    comes back marks its run and drops its staging heap, with no new sync of
    the target."""
    emulator.add_fault(SLOW_MATCH, {"delay_ms": 30000})
    errors = []

    def caller():
        try:
            w.sql("SELECT * FROM ciflow.sync('emu', 'Customer')")
        except Exception as exc:  # noqa: BLE001 - crash recovery ends the session
            errors.append(exc)
    thread = threading.Thread(target=caller)
    thread.start()
    wait_for(lambda: w.sql("SELECT pages FROM ciflow.sync_progress") == [(2,)], timeout=20,
             what="two pages loaded")
    assert staged_tables(w) != []
    pid = w.sql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'ciflow sync'")[0][0]
    old_launcher = status(w)["pid"]
    emulator.clear_faults()
    os.kill(pid, signal.SIGKILL)
    thread.join(30)
    assert errors
    wait_new_launcher(w, old_launcher)
    assert [(r["status"], r["error"]) for r in runs(w)] == [
        ("failed", "interrupted by a server crash or restart")]
    assert staged_tables(w) == []
    assert w.sql("SELECT count(*) FROM ciflow.sync_progress") == [(0,)]


def test_on_event_subject_narrows_the_events(w, emulator):
    from extension.eventhelpers import RETAIL_POS
    sync_job = w.sql("SELECT ciflow.schedule_sync('emu', 'Customer',"
                     " on_event => 'datasource_refresh_failed', subject => %s)",
                     (RETAIL_POS,))[0][0]
    assert job(w, sync_job)["schedule"] == f"on_event datasource_refresh_failed ({RETAIL_POS})"
    w.sql("SELECT * FROM ciflow.poll('emu')")
    set_datasource(emulator, "WebEvents", refreshState="updateFailed", lastRefresh="now")
    assert len(w.sql("SELECT * FROM ciflow.poll('emu')")) == 1
    time.sleep(2)
    assert runs(w) == []
    set_datasource(emulator, "RetailPos", refreshState="updateFailed", lastRefresh="now")
    assert len(w.sql("SELECT * FROM ciflow.poll('emu')")) == 1
    wait_job(w, sync_job, lambda r: r["last_status"] == "succeeded", what="the sync")
    time.sleep(1.5)
    assert len(runs(w)) == 1


def test_a_run_going_on_elsewhere_is_not_started_twice(w):
    """A job whose row says a living process runs it (a launcher restarted
    alone leaves its children running) is not started again until that
    process is gone."""
    job_id = w.sql("SELECT ciflow.watch('emu', every => '1 hour')")[0][0]
    wait_job(w, job_id, lambda r: r["last_status"] == "succeeded", what="a first pass")
    other = w.connect()
    try:
        with other.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            pid = cur.fetchone()[0]
        w.sql("UPDATE ciflow.job_definitions SET last_status = 'running', run_pid = %s,"
              " next_run_at = now() WHERE id = %s", (pid, job_id))
        w.sql("SELECT ciflow.alter_job(%s, enabled => true)", (job_id,))
        time.sleep(2)
        assert job(w, job_id)["last_status"] == "running"
    finally:
        other.close()
    w.sql("SELECT ciflow.alter_job(%s, enabled => true)", (job_id,))
    wait_job(w, job_id, lambda r: r["last_status"] == "succeeded", what="the job to run again")
