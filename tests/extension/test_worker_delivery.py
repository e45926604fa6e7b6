"""Delivery passes run by the launcher (issue 9 with issue 13): an event
recorded by a poll is delivered to a sink with no CALL ciflow.deliver(),
and a failed attempt is retried when it is due again."""

import pytest

from harness import wait_for
from extension.cihelpers import dict_rows
from extension.eventhelpers import set_datasource
from extension.receivers import HttpReceiver
from extension.workerhelpers import make_emu_connection, preloaded_cluster, status


@pytest.fixture
def receiver():
    r = HttpReceiver()
    yield r
    r.stop()


def test_the_launcher_delivers_events(emulator, receiver):
    pg = preloaded_cluster()
    try:
        pg.sql("CREATE EXTENSION ciflow")
        wait_for(lambda: status(pg)["state"] == "running", timeout=20, what="the launcher")
        make_emu_connection(pg, emulator)
        pg.sql("SELECT * FROM ciflow.poll('emu')")
        receiver.script("/hook", [500, 200])
        pg.sql("SELECT ciflow.add_sink('hook', %s)", (receiver.url("/hook"),))
        set_datasource(emulator, "RetailPos", refreshState="updateFailed", lastRefresh="now")
        ev = dict_rows(pg.database("postgres"), "SELECT * FROM ciflow.poll('emu')")[0]

        def delivered():
            rows = dict_rows(pg.database("postgres"), "SELECT * FROM ciflow.deliveries")
            return rows if rows and rows[0]["status"] == "delivered" else None
        rows = wait_for(delivered, timeout=30, what="the delivery")
        assert (rows[0]["event_id"], rows[0]["attempts"], rows[0]["last_status"]) == \
            (ev["id"], 2, 200)
        got = receiver.json_bodies("/hook")
        assert [b["id"] for b in got] == [ev["id"], ev["id"]]
        wait_for(lambda: pg.sql("SELECT count(*) FROM pg_stat_activity"
                                " WHERE backend_type = 'ciflow delivery'") == [(0,)],
                 timeout=10, what="the pass to end")
    finally:
        pg.cleanup()
