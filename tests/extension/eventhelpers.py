"""Helpers of the event tests (issue 8): LISTEN clients and short-hands for
the emulator's control interface."""

import json
import select
import threading
import time

import pytest

from extension.cihelpers import api_requests, dict_rows, last_seq

RETAIL_POS = "d8d3b26a-0000-4000-8000-000000000001"
WEB_EVENTS = "d8d3b26a-0000-4000-8000-000000000002"
KINDS = ("datasource_refresh_failed", "datasource_refresh_succeeded",
         "segment_threshold_exceeded", "measure_threshold_exceeded",
         "full_refresh_completed", "unification_refresh_completed",
         "sync_succeeded", "sync_failed")


class Listener:
    """A psycopg2 session LISTENing on ciflow_events and every ciflow_<kind>."""

    def __init__(self, db, channels=None):
        self.conn = db.connect()
        self.channels = channels or ("ciflow_events",) + tuple("ciflow_" + k for k in KINDS)
        with self.conn.cursor() as cur:
            for ch in self.channels:
                cur.execute(f"LISTEN {ch}")

    def drain(self, wait=0.5):
        """Every notification received until none came for `wait` seconds,
        as (channel, payload as a dict, payload size in bytes)."""
        got = []
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if select.select([self.conn], [], [], left)[0]:
                self.conn.poll()
                if self.conn.notifies:
                    deadline = time.monotonic() + wait
        for n in self.conn.notifies:
            got.append((n.channel, json.loads(n.payload), len(n.payload.encode())))
        del self.conn.notifies[:]
        return got

    def close(self):
        self.conn.close()


@pytest.fixture
def listener(ciflow_db):
    """A Listener on the test module's database, closed after the test."""
    lst = Listener(ciflow_db)
    yield lst
    lst.close()


@pytest.fixture
def clean(ciflow_db, ci_connection):
    """The connection 'emu' with an empty event log."""
    ciflow_db.sql("DELETE FROM ciflow.events")
    yield ci_connection
    ciflow_db.sql("DELETE FROM ciflow.events")


def poll(db, conn=None):
    return dict_rows(db, "SELECT * FROM ciflow.poll('emu')", conn=conn)


def events(db, where="true"):
    return dict_rows(db, f"SELECT * FROM ciflow.events WHERE {where} ORDER BY id")


def state(db, kind, subject):
    rows = dict_rows(db, "SELECT * FROM ciflow.refresh_states WHERE connection = 'emu'"
                         " AND kind = %s AND subject = %s", (kind, subject))
    return rows[0] if rows else None


def set_datasource(emu, source, **fields):
    return emu.control("POST", f"datasources/{source}", fields)


def new_job(emu, **spec):
    return emu.control("POST", "jobs", spec)["jobId"]


def finish_job(emu, job, status="successful"):
    return emu.control("POST", f"jobs/{job}/finish", {"status": status})


def set_segment(emu, name, count, status="CompletedSuccess", date="now"):
    return emu.control("POST", f"segments/{name}", {"entityCount": count, "jobStatus": status,
                                                    "evaluationDate": date})


def set_measure(emu, name, values, state="completed", **extra):
    return emu.control("POST", f"measures/{name}", dict(values=values, state=state, **extra))


def expected_notification(row):
    """What a notification of the events row carries: id, kind, connection,
    subject and the payload's public fields."""
    note = {"id": row["id"], "kind": row["kind"], "connection": row["connection"],
            "subject": row["subject"]}
    note.update({k: v for k, v in row["payload"].items() if k not in ("error", "run_by")})
    return note


def assert_notified(listener, rows):
    """Each row was announced, in order, on ciflow_events and on its kind's
    channel, with exactly its notification; nothing else was."""
    got = listener.drain()
    want = []
    for r in rows:
        note = expected_notification(r)
        want += [("ciflow_events", note), ("ciflow_" + r["kind"], note)]
    assert [(c, p) for c, p, _ in got] == want
    return got


def api_calls_of(emu, action):
    """Runs action(); returns the API calls (token requests excluded) it made."""
    since = last_seq(emu)
    action()
    return api_requests(emu, since)


class Background(threading.Thread):
    """Runs fn in a thread, keeping its result or exception."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None
        self.start()

    def run(self):
        try:
            self.result = self.fn()
        except Exception as e:  # noqa: BLE001 - handed to the test
            self.error = e
