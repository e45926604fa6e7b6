"""The call limit (sql-api.md sections 2 and 6).

At most max_calls calls per per_interval per connection, counted in shared
memory across every session and sync worker; callers wait for a free slot
instead of failing.  The emulator's request log is the witness: in any
window of per_interval, it must never see more than max_calls calls of the
connection.  Timings are asserted only as lower bounds (a working limiter
cannot be faster), never as upper bounds.

Without shared_preload_libraries each process limits itself (the README
says so); the last test shows that fallback.
"""

import threading
import time
from datetime import datetime

import pytest

from emulator_client import Emulator
from harness import PgCluster, wait_for
from extension.cihelpers import connection_args, create_connection_sql, is_token_request

MAX_CALLS = 5
WINDOW_S = 2.0
# Requests reach the emulator a little after ciflow stamps them; two calls one
# window apart may look a few milliseconds closer there.
JITTER_S = 0.1


def api_call_times(emu, since=0):
    """Receive times of the API calls (token requests excluded), sorted."""
    times = []
    for entry in emu.log(since):
        if is_token_request(entry) or "/instances/" not in entry.get("path", ""):
            continue
        stamp = entry["time"].rstrip("Z")
        head, _, frac = stamp.partition(".")
        times.append(datetime.fromisoformat(f"{head}.{frac[:6]:0<6}").timestamp())
    return sorted(times)


def assert_sliding_window(times, max_calls, window_s):
    for i, start in enumerate(times):
        in_window = [t for t in times[i:] if t < start + window_s - JITTER_S]
        assert len(in_window) <= max_calls, (
            f"{len(in_window)} calls within {window_s}s from call {i}: {times}")


@pytest.fixture(scope="module")
def limited():
    """A preloaded cluster and a connection limited to MAX_CALLS per WINDOW_S."""
    with Emulator() as emu, PgCluster(preload=True) as pg:
        pg.sql("CREATE EXTENSION ciflow")
        query, params = create_connection_sql(
            "emu", connection_args(emu, max_calls=MAX_CALLS,
                                   per_interval=f"{WINDOW_S} seconds"))
        pg.sql(query, params)
        yield pg, emu


def run_concurrently(*jobs):
    errors = []

    def wrap(job):
        try:
            job()
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


def test_sessions_share_the_limit(limited):
    pg, emu = limited
    seq = emu.log()[-1]["seq"] if emu.log() else 0
    calls_per_session = 7

    def session():
        for _ in range(calls_per_session):
            assert len(pg.sql("SELECT * FROM ciflow.get_items('emu', 'Customer', top => 1)")) == 1

    started = time.monotonic()
    run_concurrently(session, session)
    elapsed = time.monotonic() - started

    times = api_call_times(emu, seq)
    assert len(times) == 2 * calls_per_session
    assert_sliding_window(times, MAX_CALLS, WINDOW_S)
    # 14 calls at 5 per 2 s need at least two whole windows.
    assert elapsed >= 2 * WINDOW_S - JITTER_S, elapsed


def test_a_sync_worker_and_a_session_share_the_limit(limited):
    pg, emu = limited
    time.sleep(WINDOW_S)            # start from an empty window
    seq = emu.log()[-1]["seq"]
    seen_waiting = []

    def syncer():
        run = pg.sql("SELECT status, api_calls FROM ciflow.sync('emu', 'Customer')")[0]
        # 250 rows at 100 a page: metadata + 4 pages (the last one empty).
        assert run == ("succeeded", 5), run

    def session():
        for _ in range(5):
            pg.sql("SELECT * FROM ciflow.get_items('emu', 'Customer', top => 1)")

    def watcher():
        def waiting():
            rows = pg.sql("SELECT waiting FROM ciflow.sync_progress")
            if rows and rows[0][0]:
                seen_waiting.append(True)
            return bool(seen_waiting)
        wait_for(waiting, timeout=20, interval=0.02, what="a sync waiting for a call slot")

    run_concurrently(syncer, session, watcher)
    times = api_call_times(emu, seq)
    assert len(times) == 10
    assert_sliding_window(times, MAX_CALLS, WINDOW_S)
    assert seen_waiting, "ciflow.sync_progress never showed the run waiting"


def test_without_preload_each_process_limits_itself(ciflow_db, make_connection, emulator):
    make_connection("slow", emulator, max_calls=2, per_interval="1 second")
    conn = ciflow_db.connect()
    started = time.monotonic()
    try:
        with conn.cursor() as cur:
            for _ in range(5):
                cur.execute("SELECT * FROM ciflow.get_items('slow', 'Customer', top => 1)")
    finally:
        conn.close()
    # Five calls at two per second need at least two whole windows.
    assert time.monotonic() - started >= 2 - JITTER_S
