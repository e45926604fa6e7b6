"""A sync belongs to its caller (sql-api.md section 3, issue 7 item 4).

- Terminating the calling session stops the worker: the run is recorded as
  failed by the time the worker is gone, the target keeps its contents, and
  no staging table or lock is left behind.
- The worker's WARNINGs and NOTICEs reach the caller, and its ERROR arrives
  with SQLSTATE, DETAIL and HINT intact.
- ciflow.sync refuses to run inside a transaction block (25001), whatever
  the block has done, so a ROLLBACK can never meet a committed sync.
"""

import threading

import psycopg2

from harness import wait_for
from extension.cihelpers import raises_sqlstate, sync, table_md5

SLOW_MATCH = {"method": "GET", "path": "/data/Customer$", "query": r"(\$|%24)skip=200(&|$)"}


def sync_workers(db):
    return db.sql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'ciflow sync'")


def test_terminating_the_caller_stops_the_sync(ciflow_db, ci_connection, emulator):
    sync(ciflow_db, "emu", "Customer")
    before = table_md5(ciflow_db, "emu.customer")
    runs_before = ciflow_db.sql("SELECT count(*) FROM ciflow.sync_runs")[0][0]
    emulator.add_fault(SLOW_MATCH, {"delay_ms": 20000})

    conn = ciflow_db.connect()
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        caller_pid = cur.fetchone()[0]
    errors = []

    def caller():
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT * FROM ciflow.sync('emu', 'Customer')")
        except psycopg2.Error as exc:
            errors.append(exc)

    thread = threading.Thread(target=caller)
    thread.start()
    wait_for(lambda: ciflow_db.sql("SELECT pages FROM ciflow.sync_progress") == [(2,)],
             timeout=15, what="two pages loaded")
    ciflow_db.sql("SELECT pg_terminate_backend(%s)", (caller_pid,))
    thread.join(30)
    assert errors, "the caller's session should have ended"

    # The worker goes long before the slow page (20 s) would have answered.
    wait_for(lambda: not sync_workers(ciflow_db), timeout=10, what="the worker to exit")
    runs = ciflow_db.sql("SELECT status, error FROM ciflow.sync_runs ORDER BY id")
    assert len(runs) == runs_before + 1
    assert runs[-1][0] == "failed", runs[-1]
    assert table_md5(ciflow_db, "emu.customer") == before
    assert ciflow_db.sql("SELECT relname FROM pg_class WHERE relnamespace = 'emu'::regnamespace"
                         " AND relkind = 'r' AND relname <> 'customer'") == []
    assert ciflow_db.sql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == [(0,)]


def test_worker_warnings_reach_the_caller(ciflow_db, ci_connection, emulator):
    """A row added in front while the sync pages with $skip repeats a row on
    the next page: the worker's duplicate WARNING arrives in the caller."""
    emulator.add_fault({"method": "GET", "path": "/data/Customer$",
                        "query": r"(\$|%24)skip=100(&|$)"}, {"delay_ms": 1500})
    conn = ciflow_db.connect()
    result = []

    def run():
        with conn.cursor() as cur:
            cur.execute("SELECT status, rows FROM ciflow.sync('emu', 'Customer')")
            result.append(cur.fetchone())

    thread = threading.Thread(target=run)
    thread.start()
    try:
        wait_for(lambda: ciflow_db.sql("SELECT pages FROM ciflow.sync_progress") == [(1,)],
                 timeout=15, what="one page loaded")
        first = dict(emulator.row("Customer", 0))
        first["CustomerId"] = "!" + str(first["CustomerId"])
        emulator.control("POST", "entities/Customer/rows", {"mode": "append", "rows": [first]})
    finally:
        thread.join(30)
        conn.close()
    assert result and result[0][0] == "succeeded", result
    warnings = [n for n in conn.notices if n.startswith("WARNING")]
    assert any("duplicate" in w for w in warnings), conn.notices


def test_worker_errors_arrive_with_every_field(ciflow_db, ci_connection, emulator):
    emulator.add_fault({"method": "GET", "path": "/data/Customer$"},
                       {"status": 403, "body": "odata", "message": "not yours"})
    with raises_sqlstate("42501") as e:
        ciflow_db.sql("SELECT * FROM ciflow.sync('emu', 'Customer')")
    assert 'could not sync entity "Customer"' in e.message
    assert e.detail.startswith("Run "), e.detail
    assert "HTTP status 403" in e.detail and "not yours" in e.detail, e.detail
    assert e.hint


def test_sync_refuses_a_transaction_block(ciflow_db, ci_connection, emulator):
    conn = ciflow_db.connect(autocommit=False)
    try:
        with conn.cursor() as cur:
            with raises_sqlstate("25001") as e:
                cur.execute("SELECT * FROM ciflow.sync('emu', 'Customer')")
        assert "transaction block" in e.message
        conn.rollback()
    finally:
        conn.close()
    assert ciflow_db.sql("SELECT count(*) FROM ciflow.sync_runs"
                         " WHERE connection = 'emu' AND status = 'running'") == [(0,)]
