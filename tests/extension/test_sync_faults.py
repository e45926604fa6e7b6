"""Faults a sync must ride out, or fail cleanly on (sql-api.md section 6).

- A token that expires in the middle of a pull is renewed once and the pull
  goes on: one 401, one new token, the same page asked again, every row.
- 429 answers are retried after Retry-After (the wait is a lower bound on
  the run's duration), and a transient 500 is retried with back-off; both
  are counted in the run's retries.
- A page slower than ciflow.request_timeout is a transport failure (08006)
  after ciflow.max_attempts attempts; the previous contents stay.
- A server restart in the middle of a sync: the worker records its run as
  failed on the way down, and the target keeps its previous contents.
"""

import threading
import time

import pytest

from harness import wait_for
from extension.cihelpers import (data_requests, is_token_request, last_seq, raises_sqlstate,
                                 session, sync, table_md5)

PAGE_3 = {"method": "GET", "path": "/data/Customer$", "query": r"(\$|%24)skip=200(&|$)"}


def token_requests(emu, since):
    return [e for e in emu.log(since) if is_token_request(e)]


def test_token_expiring_mid_pull_is_renewed_once(ciflow_db, ci_connection, emulator):
    sync(ciflow_db, "emu", "Customer")              # the session caches nothing: a worker per run
    seq = last_seq(emulator)
    emulator.add_fault(dict(PAGE_3, nth=1), {"expire_token": True})
    run = sync(ciflow_db, "emu", "Customer")
    assert run["status"] == "succeeded" and run["rows"] == 250, run
    statuses = [e["status"] for e in data_requests(emulator, "Customer", seq)]
    # Pages 1 and 2, page 3 refused (401), page 3 again with a new token, page 4 (empty).
    assert statuses == [200, 200, 401, 200, 200], statuses
    assert len(token_requests(emulator, seq)) == 2
    assert run["retries"] == 1


def test_retry_after_is_honoured(ciflow_db, ci_connection, emulator):
    emulator.add_fault(dict(PAGE_3, nth=1, times=2),
                       {"status": 429, "body": "gateway", "headers": {"Retry-After": "1"}})
    started = time.monotonic()
    with session(ciflow_db, {"ciflow.max_attempts": 3}) as conn, conn.cursor() as cur:
        cur.execute("SELECT status, rows, retries FROM ciflow.sync('emu', 'Customer')")
        run = cur.fetchone()
    assert run == ("succeeded", 250, 2), run
    # Two waits of Retry-After: 1 second each (a lower bound, never an upper one).
    assert time.monotonic() - started >= 2.0


def test_transient_server_error_is_retried(ciflow_db, ci_connection, emulator):
    emulator.add_fault(dict(PAGE_3, nth=1), {"status": 500, "body": "apierror"})
    run = sync(ciflow_db, "emu", "Customer")
    assert (run["status"], run["rows"], run["retries"]) == ("succeeded", 250, 1), run
    assert run["http_status"] == 200


def test_request_timeout_fails_cleanly(ciflow_db, ci_connection, emulator):
    sync(ciflow_db, "emu", "Customer")
    before = table_md5(ciflow_db, "emu.customer")
    emulator.add_fault(PAGE_3, {"delay_ms": 3000})
    with session(ciflow_db, {"ciflow.request_timeout": "300ms"}) as conn, conn.cursor() as cur:
        with raises_sqlstate("08006") as err:
            cur.execute("SELECT * FROM ciflow.sync('emu', 'Customer')")
    assert "page 3" in err.detail and "Timed out after 2 attempts" in err.detail, err
    assert table_md5(ciflow_db, "emu.customer") == before


def test_server_restart_mid_sync_records_the_failure(private_ciflow, emulator):
    pg = private_ciflow
    before = table_md5(pg, "emu.customer")
    emulator.add_fault(PAGE_3, {"delay_ms": 8000})

    caller = threading.Thread(target=lambda: pytest.raises(Exception, pg.sql,
                                                           "SELECT * FROM ciflow.sync('emu', 'Customer')"))
    caller.start()
    wait_for(lambda: pg.sql("SELECT pages FROM ciflow.sync_runs WHERE status = 'running'")
             == [(2,)], timeout=10, what="two pages loaded")
    pg.restart(mode="fast")
    caller.join(30)

    runs = pg.sql("SELECT status, error FROM ciflow.sync_runs ORDER BY id")
    assert runs[0][0] == "succeeded"
    assert runs[1][0] == "failed" and "cancel" in runs[1][1], runs
    assert table_md5(pg, "emu.customer") == before
    assert pg.sql("SELECT count(*) FROM pg_class WHERE relnamespace = 'emu'::regnamespace"
                  " AND relkind = 'r'") == [(1,)]
