"""Interrupted syncs: nothing lost, nothing half-written, the run recorded.

- A cancelled statement (here statement_timeout) stops the sync worker
  promptly; the run is recorded as failed, the staging heap is dropped, the
  target keeps its previous contents byte for byte, and no worker lingers.
- A sync worker killed with SIGKILL takes the server through crash recovery;
  its run stays 'running' until the next sync of the same target marks it
  failed and removes what it left staged, then succeeds.  This test runs on a
  cluster of its own, because crash recovery ends every session.
"""

import threading
import time

from contextlib import contextmanager

from harness import wait_for
from extension.cihelpers import raises_sqlstate, session, sigkill_and_recover, sync, table_md5

# Page 3 (the one asking $skip=200) answers only after this long.
SLOW_PAGE = {"delay_ms": 8000}
SLOW_MATCH = {"method": "GET", "path": "/data/Customer$", "query": r"(\$|%24)skip=200(&|$)"}


def staged_tables(db):
    return db.sql("SELECT relname FROM pg_class WHERE relnamespace = 'emu'::regnamespace"
                  " AND relkind = 'r' AND relname <> 'customer'")


def sync_workers(db):
    return db.sql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'ciflow sync'")


def test_cancel_stops_the_worker_and_records_the_run(ciflow_db, ci_connection, emulator):
    sync(ciflow_db, "emu", "Customer")
    before = table_md5(ciflow_db, "emu.customer")
    emulator.add_fault(SLOW_MATCH, SLOW_PAGE)

    started = time.monotonic()
    with session(ciflow_db, {"statement_timeout": "1500ms"}) as conn, conn.cursor() as cur:
        with raises_sqlstate("57014"):
            cur.execute("SELECT * FROM ciflow.sync('emu', 'Customer')")
    # Cancelled at the timeout, not after the slow page answered.
    assert time.monotonic() - started < 6

    wait_for(lambda: not sync_workers(ciflow_db), timeout=10, what="the worker to exit")
    run = ciflow_db.sql("SELECT status, pages, error FROM ciflow.sync_runs"
                        " ORDER BY id DESC LIMIT 1")[0]
    assert run[0] == "failed" and run[1] == 2 and "cancel" in run[2], run
    assert staged_tables(ciflow_db) == []
    assert table_md5(ciflow_db, "emu.customer") == before


def kill_after_two_pages(pg, emu, query):
    """Runs query (a sync of Customer) in a thread with page 3 slow; once two
    pages are loaded, SIGKILLs the sync worker and waits for the crash
    restart.  Returns the caller's errors."""
    emu.add_fault(SLOW_MATCH, SLOW_PAGE)
    errors = []

    def caller():
        try:
            pg.sql(query)
        except Exception as exc:  # noqa: BLE001 - the server goes through crash recovery
            errors.append(exc)

    thread = threading.Thread(target=caller)
    thread.start()
    pid = wait_for(lambda: (sync_workers(pg) or [[None]])[0][0], timeout=10,
                   what="the sync worker")
    wait_for(lambda: pg.sql("SELECT pages FROM ciflow.sync_runs WHERE status = 'running'")
             == [(2,)], timeout=10, what="two pages loaded")
    sigkill_and_recover(pg, pid)
    thread.join(30)
    return errors


def test_killed_worker_is_cleaned_up_by_the_next_sync(private_ciflow, emulator):
    pg = private_ciflow
    before = table_md5(pg, "emu.customer")
    errors = kill_after_two_pages(pg, emulator, "SELECT * FROM ciflow.sync('emu', 'Customer')")
    assert errors, "the caller should lose its session in crash recovery"

    # The killed run is still 'running', its staging heap still there.
    assert pg.sql("SELECT status FROM ciflow.sync_runs ORDER BY id") == [("succeeded",),
                                                                      ("running",)]
    assert staged_tables(pg) != []
    assert table_md5(pg, "emu.customer") == before

    emulator.clear_faults()
    run = sync(pg, "emu", "Customer")
    assert run["status"] == "succeeded" and run["rows"] == 250
    statuses = pg.sql("SELECT status, error FROM ciflow.sync_runs ORDER BY id")
    assert statuses[1][0] == "failed" and "interrupted" in statuses[1][1], statuses
    assert staged_tables(pg) == []


@contextmanager
def two_pages_loaded(db, emu, delay_ms, **kwargs):
    """ciflow.sync('emu', 'Customer', **kwargs) in a thread, page 3 answering
    after delay_ms: entered once two pages are loaded; yields the list that
    holds the run (a dict) or its exception once the block is left."""
    emu.add_fault(SLOW_MATCH, {"delay_ms": delay_ms})
    result = []

    def run():
        try:
            result.append(sync(db, "emu", "Customer", **kwargs))
        except Exception as exc:  # noqa: BLE001 - the caller checks it
            result.append(exc)
    thread = threading.Thread(target=run)
    thread.start()
    try:
        wait_for(lambda: db.sql("SELECT pages FROM ciflow.sync_progress") == [(2,)],
                 timeout=10, what="two pages loaded")
        yield result
    finally:
        thread.join(30)


def test_no_transaction_is_open_while_a_page_is_fetched(ciflow_db, ci_connection, emulator):
    """While the worker waits for a slow page, it holds no transaction (and no
    snapshot): the pages already loaded are committed, progress included."""
    with two_pages_loaded(ciflow_db, emulator, 3000) as result:
        time.sleep(0.3)
        state = ciflow_db.sql(
            "SELECT xact_start, backend_xid, backend_xmin, state FROM pg_stat_activity"
            " WHERE backend_type = 'ciflow sync'")
        assert len(state) == 1, state
        xact_start, xid, xmin, _ = state[0]
        assert xact_start is None and xid is None and xmin is None, state
    assert result and isinstance(result[0], dict), result
    assert result[0]["status"] == "succeeded" and result[0]["rows"] == 250
