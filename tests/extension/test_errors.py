"""Errors (sql-api.md section 7, SQLSTATEs from interfaces.md).

Every error carries its SQLSTATE, a message naming the connection and the
entity, and for HTTP errors a DETAIL "HTTP status N: <service message>".
Retried failures are retried exactly ciflow.max_attempts times (2 in test
databases, see conftest.FAST_RETRIES); others fail after one request. A
failing sync leaves the target untouched and a 'failed' run behind.

Unknown connections and bad connection settings are in test_connections.py,
unknown entities for actions in test_actions.py.
"""

import re

import pytest

from harness import free_port
from extension.cihelpers import (assert_http_detail, assert_names, data_requests, last_seq,
                                 raises_sqlstate, regclass_of, run_row, session, sync,
                                 table_md5)

ENTITY = "Customer"
QUERY_SKIP = r"(\$|%24)skip=100(&|$)"

# (id, fault action, SQLSTATE, HTTP status in DETAIL or None, requests made)
FAULTS = [
    ("400", {"status": 400, "body": "odata", "message": "Bad filter near wibble"}, "22023", 400, 1),
    ("403", {"status": 403, "body": "apierror", "message": "Not allowed here"}, "42501", 403, 1),
    ("404", {"status": 404, "body": "apierror"}, "42704", 404, 1),
    ("406", {"status": 406, "body": "odata"}, "55000", 406, 1),
    ("409", {"status": 409, "body": "odata"}, "55000", 409, 1),
    ("429", {"status": 429, "body": "gateway", "headers": {"Retry-After": "1"}}, "53400", 429, 2),
    ("500", {"status": 500, "body": "apierror"}, "08006", 500, 2),
    ("502_html", {"status": 502, "body": "html"}, "08006", 502, 2),
    ("503", {"status": 503, "body": "empty", "headers": {"Retry-After": "1"}}, "08006", 503, 2),
    ("malformed_json", {"malformed": True}, "22032", None, 1),
    ("truncated_body", {"truncate_at": 40}, "08006", None, 2),
    # Three requests for two attempts: the first attempt reuses the keep-alive
    # connection of the token request, and when a reused connection dies before
    # any answer libcurl re-sends once on a fresh one (the request never got an
    # answer, which is what a stale keep-alive connection looks like).  ciflow's
    # own count, "after 2 attempts", is checked in the DETAIL below.
    ("connection_reset", {"reset": True}, "08006", None, 3),
]


@pytest.mark.parametrize("fault", FAULTS, ids=[f[0] for f in FAULTS])
def test_http_failures_in_get_items(ciflow_db, ci_connection, emulator, fault):
    _, action, sqlstate, status, requests = fault
    emulator.add_fault({"method": "GET", "path": "/data/Customer$"}, action)
    seq = last_seq(emulator)
    with raises_sqlstate(sqlstate) as err:
        ciflow_db.sql("SELECT * FROM ciflow.get_items('emu', 'Customer', top => 5)")
    assert_names(err, "emu", ENTITY)
    if status is not None:
        assert_http_detail(err, status)
        if "message" in action:
            assert action["message"] in err.detail, err
    if sqlstate == "08006" and status is None:
        assert "after 2 attempts" in err.detail, err
    assert len(data_requests(emulator, ENTITY, seq)) == requests


@pytest.fixture
def synced(ciflow_db, ci_connection, emulator):
    """emu.customer synced once from the default instance; its md5."""
    sync(ciflow_db, "emu", ENTITY)
    return table_md5(ciflow_db, "emu.customer")


SYNC_FAULTS = [f for f in FAULTS if f[0] in ("403", "429", "500", "malformed_json",
                                             "truncated_body")]


@pytest.mark.parametrize("fault", SYNC_FAULTS, ids=[f[0] for f in SYNC_FAULTS])
def test_sync_failure_on_page_2_keeps_table(ciflow_db, emulator, synced, fault):
    _, action, sqlstate, status, _ = fault
    emulator.add_fault({"method": "GET", "path": "/data/Customer$", "query": QUERY_SKIP}, action)
    with raises_sqlstate(sqlstate) as err:
        sync(ciflow_db, "emu", ENTITY)
    assert_names(err, "emu", ENTITY)
    m = re.match(r"Run (\d+), page 2\b", err.detail or "")
    assert m, f"DETAIL does not start 'Run <id>, page 2': {err!r}"
    if status is not None:
        assert f"HTTP status {status}" in err.detail
    run = run_row(ciflow_db, int(m.group(1)))
    assert run["status"] == "failed" and run["error"]
    if status is not None:
        assert run["http_status"] == status
    else:
        # The status line said 200; the body was broken or cut short.
        assert run["http_status"] in (None, 200)
    assert table_md5(ciflow_db, "emu.customer") == synced


def test_sync_unknown_entity(ciflow_db, ci_connection):
    with raises_sqlstate("42704") as err:
        sync(ciflow_db, "emu", "NoSuchEntity")
    assert_names(err, "emu", "NoSuchEntity")
    assert regclass_of(ciflow_db, "emu.no_such_entity") is None


def test_sync_modes(ciflow_db, ci_connection):
    # Issue 7: incremental exists now (tests in test_resync_incremental.py).
    assert sync(ciflow_db, "emu", ENTITY, mode="incremental")["status"] == "succeeded"
    with raises_sqlstate("22023") as err:
        sync(ciflow_db, "emu", ENTITY, mode="sideways")
    assert_names(err, "emu", ENTITY)


@pytest.mark.parametrize("target", ["", "x..y", '"unterminated', "a.b.c.d"])
def test_sync_bad_target_name(ciflow_db, ci_connection, target):
    with raises_sqlstate("42602") as err:
        sync(ciflow_db, "emu", ENTITY, target=target)
    assert_names(err, "emu", ENTITY)


def test_wrong_subscription_key_fails_at_once(ciflow_db, make_connection, emulator):
    make_connection("emu", emulator, subscription_key="not-a-valid-key")
    seq = last_seq(emulator)
    with raises_sqlstate("28000") as err:
        ciflow_db.sql("SELECT * FROM ciflow.get_items('emu', 'Customer', top => 1)")
    assert_names(err, "emu", ENTITY)
    assert_http_detail(err, 401)
    # The gateway's 401 (with a body) is a key problem: no retry, no new token.
    assert len(data_requests(emulator, ENTITY, seq)) == 1


def test_wrong_client_secret(ciflow_db, make_connection, emulator):
    make_connection("emu", emulator, client_secret="definitely-wrong")
    with raises_sqlstate("28000") as err:
        ciflow_db.sql("SELECT * FROM ciflow.get_items('emu', 'Customer', top => 1)")
    assert_names(err, "emu")
    # The token endpoint's own answer: 401 invalid_client (Entra's shape).
    assert_http_detail(err, 401)


def test_nothing_listening(ciflow_db, make_connection, emulator):
    port = free_port()
    make_connection("emu", emulator, base_url=f"http://127.0.0.1:{port}/v1",
                    token_url=f"http://127.0.0.1:{port}/t/oauth2/v2.0/token")
    with raises_sqlstate("08006") as err:
        ciflow_db.sql("SELECT * FROM ciflow.get_items('emu', 'Customer', top => 1)")
    assert_names(err, "emu")


def test_response_over_max_response_size(ciflow_db, ci_connection, emulator):
    # Customer's metadata (E2, over 1 kB) is read once here, so that the
    # get_item below is only the small answer of its row.
    ciflow_db.sql("SELECT ciflow.get_item('emu', 'Customer', 'nobody')")
    # 1 kB: a page of 100 customers is far more.
    with session(ciflow_db, {"ciflow.max_response_size": 1}) as conn, conn.cursor() as cur:
        with raises_sqlstate("54000") as err:
            cur.execute("SELECT * FROM ciflow.get_items('emu', 'Customer', top => 100)")
        assert_names(err, "emu", ENTITY)
        # Small answers still fit.
        cur.execute("SELECT ciflow.get_item('emu', 'Customer', 'nobody')")


BAD_VALUES = [
    # (id, attribute type, bad value, SQLSTATE: the type's own input error)
    ("int32_out_of_range", "Edm.Int32", 3000000000, "22003"),
    ("int64_out_of_range", "Edm.Int64", 92233720368547758070, "22003"),
    ("bad_date", "Edm.Date", "2024-13-45", "22008"),
    ("bad_timestamp", "Edm.DateTimeOffset", "yesterday-ish", "22007"),
    ("bad_guid", "Edm.Guid", "not-a-guid", "22P02"),
    ("nul_in_string", "Edm.String", "a\u0000b", "22P05"),
]


@pytest.mark.parametrize("bad", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_values_that_do_not_fit(ciflow_db, ci_connection, emulator, bad):
    _, edm, value, sqlstate = bad
    meta = {"entityType": "profile",
            "attributes": [{"name": "ThingId", "dataType": "Edm.String"},
                           {"name": "Value", "dataType": edm}],
            "keys": [["ThingId"]]}
    good = [{"ThingId": f"t{i}", "Value": None} for i in range(150)]
    emulator.set_entity("Things", meta, rows=good)
    sync(ciflow_db, "emu", "Things")
    before = table_md5(ciflow_db, "emu.things")
    # The bad value sits on the second page: the first page was fine.
    emulator.set_entity("Things", meta, rows=good[:120] + [{"ThingId": "bad", "Value": value}])
    with raises_sqlstate(sqlstate) as err:
        sync(ciflow_db, "emu", "Things")
    assert_names(err, "emu", "Things")
    assert table_md5(ciflow_db, "emu.things") == before
    failed = ciflow_db.sql("SELECT status FROM ciflow.sync_runs WHERE entity = 'Things'"
                           " ORDER BY id DESC LIMIT 1")
    assert failed == [("failed",)]
