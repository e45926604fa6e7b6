"""HTTP transfers (http.c): interruptible wherever they are, keep-alive kept,
bodies whole however they come.

- A cancel while a call waits for its answer (before the status line, during a
  body that trickles in, in a stall mid-body) ends the statement within a
  second, and the same session's next call works: the transfer was taken out
  of the multi handle, its handle left reusable.
- A terminate ends the backend within a second likewise.
- A sync whose caller is cancelled while the worker waits for a slow page
  ends within a second too.
- Calls of one session share one keep-alive connection, the token request's
  included, across the pool of handles.
- A body arrives whole with a Content-Length (the buffer is sized from it),
  chunked (no length: the buffer grows) or slowly; a body short of its
  Content-Length is a transport failure, retried; an announced length over
  ciflow.max_response_size fails the call, and the session's next one works.
"""

import os
import threading
import time

import pytest

from harness import wait_for
from extension.cihelpers import data_requests, last_seq, raises_sqlstate, session, sync

ENTITY = "Customer"
MATCH = {"method": "GET", "path": "/data/Customer$"}
GET_ITEMS = "SELECT count(*) FROM ciflow.get_items('emu', 'Customer', top => 100)"

# Where the answer is when the cancel comes; each would take 8 s or more.
SLOW = [
    ("before_status_line", {"delay_ms": 8000}),
    ("trickling_body", {"trickle_bps": 2000}),
    ("stalled_body", {"stall": {"after_bytes": 500, "ms": 8000}}),
]


def backend_pid(conn):
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        return cur.fetchone()[0]


def waiting_for_transfer(db, pid):
    return db.sql("SELECT wait_event_type = 'Extension' FROM pg_stat_activity"
                  " WHERE pid = %s AND state = 'active'", (pid,)) == [(True,)]


def interrupt(ciflow_db, pid, statement, ready, how, settle=0.5):
    """Runs statement() in a thread, and `how` (pg_cancel_backend or
    pg_terminate_backend) on pid once ready() and `settle` seconds more;
    returns (the error the statement raised or None, seconds from the
    interrupt to the statement's end)."""
    outcome = {}

    def run():
        try:
            statement()
            outcome["error"] = None
        except Exception as exc:  # noqa: BLE001 - the caller checks it
            outcome["error"] = exc
        outcome["at"] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        wait_for(ready, timeout=10, what="the statement to be under way")
        time.sleep(settle)
        sent = time.monotonic()
        assert ciflow_db.sql(f"SELECT {how}(%s)", (pid,)) == [(True,)]
    finally:
        thread.join(15)
    assert "at" in outcome, "the statement did not end"
    return outcome["error"], outcome["at"] - sent


def interrupt_during(ciflow_db, emulator, conn, action, how):
    """GET_ITEMS on conn, interrupted by `how` while the emulator answers with
    `action`; see interrupt()."""
    emulator.add_fault(dict(MATCH, nth=1), action)
    pid = backend_pid(conn)

    def statement():
        with conn.cursor() as cur:
            cur.execute(GET_ITEMS)

    # The emulator logs a delayed request only once it answers: the backend's
    # own wait (on its latch and sockets) says it is in.
    return interrupt(ciflow_db, pid, statement, lambda: waiting_for_transfer(ciflow_db, pid),
                     how)


@pytest.mark.parametrize("action", [a for _, a in SLOW], ids=[i for i, _ in SLOW])
def test_cancel_ends_a_pending_transfer_within_a_second(ciflow_db, ci_connection, emulator,
                                                        action):
    conn = ciflow_db.connect()
    try:
        error, elapsed = interrupt_during(ciflow_db, emulator, conn, action,
                                          "pg_cancel_backend")
        assert error is not None and error.pgcode == "57014", error
        assert elapsed < 1.0, elapsed
        # The handle is reusable and nothing of the cancelled answer remains.
        with conn.cursor() as cur:
            cur.execute(GET_ITEMS)
            assert cur.fetchone()[0] == 100
    finally:
        conn.close()


def test_terminate_ends_a_pending_transfer_within_a_second(ciflow_db, ci_connection, emulator):
    conn = ciflow_db.connect()
    try:
        error, elapsed = interrupt_during(ciflow_db, emulator, conn, {"delay_ms": 8000},
                                          "pg_terminate_backend")
        assert error is not None, "the backend should have been terminated"
        assert elapsed < 1.0, elapsed
    finally:
        conn.close()


def test_cancelled_sync_ends_within_a_second(ciflow_db, ci_connection, emulator):
    sync(ciflow_db, "emu", ENTITY)
    # Page 3 answers only after 8 s.
    emulator.add_fault(dict(MATCH, query=r"(\$|%24)skip=200(&|$)"), {"delay_ms": 8000})
    with session(ciflow_db, {}) as conn:
        error, elapsed = interrupt(
            ciflow_db, backend_pid(conn), lambda: sync(ciflow_db, "emu", ENTITY, conn=conn),
            lambda: ciflow_db.sql("SELECT pages FROM ciflow.sync_progress") == [(2,)],
            "pg_cancel_backend", settle=0.3)
    assert error is not None and error.pgcode == "57014", error
    assert elapsed < 1.0, elapsed
    wait_for(lambda: not ciflow_db.sql("SELECT pid FROM pg_stat_activity"
                                       " WHERE backend_type = 'ciflow sync'"),
             timeout=1, what="the sync worker to exit")


def emulator_sockets(pid, port):
    """Local ports of pid's established TCP connections to 127.0.0.1:port."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
    with open("/proc/net/tcp", encoding="ascii") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            if inode in inodes and state == "01" and int(remote.split(":")[1], 16) == port:
                ports.append(int(local.split(":")[1], 16))
    return sorted(ports)


def test_one_session_keeps_one_connection(ciflow_db, ci_connection, emulator):
    conn = ciflow_db.connect()
    try:
        pid = backend_pid(conn)
        seen = []
        for _ in range(3):
            with conn.cursor() as cur:
                cur.execute(GET_ITEMS)
                assert cur.fetchone()[0] == 100
            seen.append(emulator_sockets(pid, emulator.port))
        # The token request and three calls: one connection, the same one.
        assert len(seen[0]) == 1 and seen == [seen[0]] * 3, seen
    finally:
        conn.close()


BODIES = [
    ("content_length", None),
    ("chunked", {"chunked": True}),
    ("slow_content_length", {"trickle_bps": 200000}),
]


@pytest.mark.parametrize("action", [a for _, a in BODIES], ids=[i for i, _ in BODIES])
def test_bodies_arrive_whole(ciflow_db, ci_connection, emulator, action):
    query = ("SELECT md5(string_agg(i::text, ',' ORDER BY i::text))"
             " FROM ciflow.get_items('emu', 'Customer', top => 1000) AS i")
    expected = ciflow_db.sql(query)
    if action is not None:
        emulator.add_fault(dict(MATCH, nth=1), action)
    assert ciflow_db.sql(query) == expected


def test_body_shorter_than_its_content_length_is_retried(ciflow_db, ci_connection, emulator):
    emulator.add_fault(dict(MATCH, nth=1), {"truncate_at": 2000})
    seq = last_seq(emulator)
    assert ciflow_db.sql(GET_ITEMS) == [(100,)]
    assert len(data_requests(emulator, ENTITY, seq)) == 2


def test_announced_length_over_the_limit_fails_before_the_body(ciflow_db, ci_connection,
                                                               emulator):
    # Customer's key type is learnt first (its metadata is over 1 kB), so that
    # the get_item below is one small answer.
    ciflow_db.sql("SELECT ciflow.get_item('emu', 'Customer', 'nobody')")
    with session(ciflow_db, {"ciflow.max_response_size": 1}) as conn, conn.cursor() as cur:
        with raises_sqlstate("54000"):
            cur.execute(GET_ITEMS)
        # The same session's handles still serve small answers.
        cur.execute("SELECT ciflow.get_item('emu', 'Customer', 'nobody')")
