"""Paging guards (customer-insights-api.md A.4 rule 4 and A.6).

A pull must never leave the connection's host and never loop:
- a nextLink to another host (or another port of the same host) is refused
  with 42501, and nothing is sent there: a listener on 127.0.0.2 proves it;
- a nextLink already followed in the same pull is an error (08P01);
- two identical non-empty pages in a row (a server ignoring $skip) are an
  error (08P01).
Each failure leaves the previous contents intact and a failed run behind.

Pages are served verbatim by the emulator's raw-body fault, so the tests
control exactly what the server says.
"""

import json
import socket
import threading

import pytest

from extension.cihelpers import (assert_names, data_requests, last_seq, raises_sqlstate,
                                 session, sync, table_md5)

ENTITY = "Customer"


def raw_page(rows, next_link=None):
    """A fault action that answers 200 with exactly this page."""
    page = {"value": rows}
    if next_link is not None:
        page["@odata.nextLink"] = next_link
    return {"status": 200, "body": "raw", "raw": json.dumps(page),
            "headers": {"Content-Type": "application/json"}}


class Listener:
    """Counts connections on a loopback address the connection does not use."""

    def __init__(self, host="127.0.0.2"):
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self):
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        self.thread.join()
        self.sock.close()


@pytest.fixture
def synced(ciflow_db, ci_connection, emulator):
    """emu.customer synced once; returns its md5 and the emulator's rows."""
    sync(ciflow_db, "emu", ENTITY)
    return table_md5(ciflow_db, "emu.customer"), emulator.rows(ENTITY)


def assert_failed_and_untouched(db, err, md5):
    assert_names(err, "emu", ENTITY)
    assert err.detail.startswith("Run "), err
    run = db.sql("SELECT id, status, error FROM ciflow.sync_runs ORDER BY id DESC LIMIT 1")[0]
    assert run[1] == "failed" and run[2], run
    assert table_md5(db, "emu.customer") == md5


@pytest.mark.parametrize("where", ["other_host", "other_port"])
def test_nextlink_elsewhere_is_refused(ciflow_db, emulator, synced, where):
    md5, rows = synced
    with Listener("127.0.0.2" if where == "other_host" else "127.0.0.1") as spy:
        link = (f"http://{'127.0.0.2' if where == 'other_host' else '127.0.0.1'}:{spy.port}"
                f"/v1/instances/x/data/Customer?$skiptoken=abc")
        emulator.add_fault({"method": "GET", "path": "/data/Customer$", "nth": 1},
                           raw_page(rows[:3], link))
        with raises_sqlstate("42501") as err:
            sync(ciflow_db, "emu", ENTITY)
    assert "is not followed" in err.detail, err
    assert spy.connections == 0, "credentials went to another host"
    assert_failed_and_untouched(ciflow_db, err, md5)


def test_nextlink_loop_is_an_error(ciflow_db, emulator, synced):
    md5, rows = synced
    link = f"{emulator.base_url}/instances/x/data/Customer?$skiptoken=loop"
    emulator.add_fault({"method": "GET", "path": "/data/Customer$", "nth": 1},
                       raw_page(rows[:2], link))
    # The linked page links to itself.
    emulator.add_fault({"method": "GET", "path": "/data/Customer$", "query": "skiptoken"},
                       raw_page(rows[2:4], link))
    seq = last_seq(emulator)
    with raises_sqlstate("08P01") as err:
        sync(ciflow_db, "emu", ENTITY)
    assert "already followed" in err.detail, err
    assert len(data_requests(emulator, ENTITY, seq)) == 2
    assert_failed_and_untouched(ciflow_db, err, md5)


def test_server_ignoring_skip_is_an_error(ciflow_db, emulator, synced):
    md5, rows = synced
    # Every page is the same three rows, whatever $skip says.
    emulator.add_fault({"method": "GET", "path": "/data/Customer$"}, raw_page(rows[:3]))
    seq = last_seq(emulator)
    with raises_sqlstate("08P01") as err:
        sync(ciflow_db, "emu", ENTITY)
    assert "identical" in err.detail, err
    assert len(data_requests(emulator, ENTITY, seq)) == 2
    assert_failed_and_untouched(ciflow_db, err, md5)


def test_max_pages_stops_a_pull(ciflow_db, emulator, synced):
    md5, _ = synced
    with session(ciflow_db, {"ciflow.max_pages": 2}) as conn, conn.cursor() as cur:
        with raises_sqlstate("54000") as err:
            cur.execute("SELECT * FROM ciflow.sync('emu', 'Customer')")
    assert "ciflow.max_pages" in err.detail, err
    assert_failed_and_untouched(ciflow_db, err, md5)
