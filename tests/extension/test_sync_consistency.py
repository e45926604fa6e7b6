"""ciflow.sync, full mode: what other sessions see and what failures leave.

* A concurrent reader sees the old complete contents or the new complete
  contents, never a partial or empty table, while a slowed-down sync runs.
* A fault on page k that does not go away raises an ERROR whose DETAIL names
  the run and the page, leaves the previous contents byte-for-byte identical
  and a 'failed' run with the HTTP status in ciflow.sync_runs.
* The run is recorded (and visible to others) while it runs; a second sync
  of the same target meanwhile is refused with 55006.
* Views on the target and grants on it survive a re-sync.

Slowness comes from the emulator's delay_ms fault on data pages; no test
asserts on durations, only on what was observed and in which order.
"""

import re
import threading
import time

import psycopg2
import pytest

from extension.cihelpers import (assert_names, data_requests, last_seq, query_of, raises_sqlstate,
                                 run_row, session, sync, table_md5, assert_table_matches_emulator)

ENTITY = "Paged"
TABLE = "emu.paged"
DATA_PATH = r"/data/" + ENTITY + "$"


def load(emu, rows, seed):
    emu.set_entity(ENTITY, {"entityType": "profile"},
                   generate={"schema": "customer", "rows": rows, "seed": seed})


def snapshot(conn):
    """(count, checksum) of the target as one session sees it in one statement."""
    with conn.cursor() as cur:
        cur.execute(f"SELECT count(*), md5(coalesce(string_agg(customer_id || ':' ||"
                    f" coalesce(lifetime_value::text, '-'), ',' ORDER BY customer_id), ''))"
                    f" FROM {TABLE}")
        return cur.fetchone()


class SyncThread(threading.Thread):
    """Runs ciflow.sync in its own session; keeps the result or the error."""

    def __init__(self, db, **kwargs):
        super().__init__(daemon=True)
        self.db, self.kwargs = db, kwargs
        self.run_result = self.error = None

    def run(self):
        try:
            self.run_result = sync(self.db, "emu", ENTITY, **self.kwargs)
        except psycopg2.Error as e:
            self.error = e


@pytest.fixture
def loaded(ciflow_db, make_connection, emulator):
    """500 old rows synced; the emulator then holds 700 different rows."""
    load(emulator, 500, seed=11)
    make_connection("emu", emulator, page_size=100)
    sync(ciflow_db, "emu", ENTITY)
    old = snapshot_of(ciflow_db)
    load(emulator, 700, seed=12)
    return old


def snapshot_of(db):
    conn = db.connect()
    try:
        return snapshot(conn)
    finally:
        conn.close()


def wait_for_data_calls(emu, seq, n, thread):
    """Block until the sync has made n data calls (or has ended)."""
    while thread.is_alive() and len(data_requests(emu, ENTITY, seq)) < n:
        time.sleep(0.02)


def test_concurrent_reader_sees_old_or_new(ciflow_db, emulator, loaded):
    old = loaded
    # 8 data pages (7 full + the empty one), each held back 400 ms by the emulator.
    emulator.add_fault({"method": "GET", "path": DATA_PATH, "every": 1},
                       {"delay_ms": 400})
    seq = last_seq(emulator)
    worker = SyncThread(ciflow_db)
    reader = ciflow_db.connect()
    observations = []      # (snapshot, data calls finished when it returned)
    try:
        worker.start()
        while worker.is_alive():
            snap = snapshot(reader)
            observations.append((snap, len(data_requests(emulator, ENTITY, seq))))
        worker.join()
        final = snapshot(reader)
    finally:
        reader.close()
    assert worker.error is None, worker.error
    assert worker.run_result["status"] == "succeeded"
    new = final
    assert new[0] == 700 and new != old
    bad = [o for o, _ in observations if o not in (old, new)]
    assert not bad, f"reader saw partial contents: {bad[:3]} (old {old}, new {new})"
    # Snapshots taken before the 7th page had even been served cannot be the
    # new contents, and there must have been some (the pull takes > 2.8 s).
    mid_sync = [o for o, calls in observations if calls < 7]
    assert mid_sync, "the reader never ran while the sync was in progress"
    assert all(o == old for o in mid_sync), "new contents visible before the pull ended"
    assert_table_matches_emulator(ciflow_db, TABLE, emulator, ENTITY)


def test_persistent_fault_on_page_k_fails_and_keeps_old_contents(ciflow_db, emulator, loaded):
    before = table_md5(ciflow_db, TABLE)
    emulator.add_fault({"method": "GET", "path": DATA_PATH, "query": r"\$skip=200(&|$)",
                        "every": 1},
                       {"status": 500, "body": "apierror"})
    seq = last_seq(emulator)
    with session(ciflow_db, {"ciflow.max_attempts": 2, "ciflow.retry_base_delay": 10}) as conn:
        with raises_sqlstate("08006") as err:
            sync(ciflow_db, "emu", ENTITY, conn=conn)
    assert_names(err, "emu", ENTITY)
    # Pages count from 1: $skip=200 with 100-row pages is page 3.
    m = re.match(r"Run (\d+), page (\d+)\b", err.detail or "")
    assert m, f"DETAIL does not start 'Run <id>, page <k>': {err!r}"
    run_id, page = int(m.group(1)), int(m.group(2))
    assert page == 3, err.detail
    assert "HTTP status 500" in err.detail

    assert table_md5(ciflow_db, TABLE) == before
    run = run_row(ciflow_db, run_id)
    assert run is not None, f"run {run_id} not in ciflow.sync_runs"
    assert (run["status"], run["http_status"], run["connection"], run["entity"]) == \
        ("failed", 500, "emu", ENTITY)
    assert run["finished_at"] is not None and run["error"]
    # max_attempts = 2: the failing page was asked for exactly twice, and
    # nothing after it.
    calls = [query_of(c) for c in data_requests(emulator, ENTITY, seq)]
    skips = [c.get("$skip") for c in calls]
    assert skips == ["0", "100", "200", "200"], skips
    assert run["retries"] >= 1


def test_run_is_visible_while_running_and_target_is_locked(ciflow_db, emulator, loaded):
    emulator.add_fault({"method": "GET", "path": DATA_PATH, "every": 1}, {"delay_ms": 300})
    seq = last_seq(emulator)
    worker = SyncThread(ciflow_db)
    worker.start()
    try:
        wait_for_data_calls(emulator, seq, 2, worker)
        # The bookkeeping commits on its own: other sessions see the run now.
        running = ciflow_db.sql(
            "SELECT id, status FROM ciflow.sync_runs WHERE entity = %s AND status = 'running'",
            (ENTITY,))
        progress = ciflow_db.sql(
            "SELECT run_id, connection, entity FROM ciflow.sync_progress WHERE entity = %s",
            (ENTITY,))
        still_running = worker.is_alive()
        if still_running:
            with raises_sqlstate("55006") as err:
                sync(ciflow_db, "emu", ENTITY)
            assert_names(err, "emu", ENTITY)
    finally:
        worker.join()
    assert still_running, "the slowed-down sync ended before it could be observed"
    assert len(running) == 1, running
    assert progress == [(running[0][0], "emu", ENTITY)]
    assert worker.error is None and worker.run_result["id"] == running[0][0]
    assert run_row(ciflow_db, running[0][0])["status"] == "succeeded"


def test_view_and_grant_survive_resync(ciflow_db, pg_cluster, emulator, loaded):
    role = "reader_" + ciflow_db.name
    pg_cluster.create_role(role)
    try:
        ciflow_db.sql(f"CREATE VIEW public.rich AS SELECT customer_id, lifetime_value"
                      f" FROM {TABLE} WHERE lifetime_value > 100")
        ciflow_db.sql(f'GRANT USAGE ON SCHEMA emu TO "{role}"')
        ciflow_db.sql(f'GRANT SELECT ON {TABLE} TO "{role}"')
        ciflow_db.sql(f'GRANT SELECT ON public.rich TO "{role}"')
        run = sync(ciflow_db, "emu", ENTITY)
        assert run["status"] == "succeeded"
        # The view shows the new contents, so it still reads the live target.
        assert ciflow_db.sql("SELECT count(*) FROM public.rich") == ciflow_db.sql(
            f"SELECT count(*) FROM {TABLE} WHERE lifetime_value > 100")
        assert ciflow_db.sql(f"SELECT count(*) FROM {TABLE}") == [(700,)]
        assert ciflow_db.sql(f"SELECT count(*) FROM {TABLE}", user=role) == [(700,)]
        assert ciflow_db.sql("SELECT count(*) FROM public.rich", user=role) == \
            ciflow_db.sql("SELECT count(*) FROM public.rich")
    finally:
        ciflow_db.sql("DROP VIEW IF EXISTS public.rich")
        pg_cluster.sql(f'DROP OWNED BY "{role}"', dbname=ciflow_db.name)
        pg_cluster.sql(f'DROP ROLE "{role}"')
