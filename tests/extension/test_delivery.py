"""Event deliveries (issue 13): the outbox, the four formats, retries, order
and isolation, against real receivers started by the tests
(tests/extension/receivers.py).  Events are driven through the emulator and
ciflow.poll; a delivery pass is CALL ciflow.deliver() (the worker of issue 9
will call the same pass)."""

import datetime
import hashlib
import hmac
import json
import threading
import time

import pytest

from extension.cihelpers import dict_rows, raises_sqlstate, sigkill_and_recover
from harness import wait_for
from extension.eventhelpers import RETAIL_POS, poll, set_datasource
from extension.eventhelpers import clean  # noqa: F401 - fixture
from extension.receivers import HttpReceiver, deliver
from extension.receivers import tls_dir  # noqa: F401 - fixture


@pytest.fixture(scope="module")
def receiver():
    r = HttpReceiver()
    yield r
    r.stop()


@pytest.fixture
def hooks(ciflow_db, clean, receiver):
    """The emu connection with a baseline poll, no sinks, a clean receiver."""
    receiver.clear()
    poll(ciflow_db)
    yield receiver
    ciflow_db.sql("SELECT ciflow.drop_sink(name) FROM ciflow.sink_settings")


def fail_refresh(db, emu, state="updateFailed"):
    """One datasource event of RetailPos; returns its ciflow.events row."""
    set_datasource(emu, "RetailPos", refreshState=state, lastRefresh="now")
    new = poll(db)
    assert len(new) == 1
    return new[0]


def deliveries(db):
    return dict_rows(db, "SELECT * FROM ciflow.deliveries ORDER BY id")


def event_json(ev):
    return {"id": ev["id"], "kind": ev["kind"], "connection": ev["connection"],
            "subject": ev["subject"],
            "created_at": ev["created_at"].astimezone(
                datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "payload": ev["payload"]}


def test_json_delivery_is_signed_and_recorded(ciflow_db, hooks, emulator):
    before = fail_refresh(ciflow_db, emulator)        # before the sink: never delivered
    ciflow_db.sql("SELECT ciflow.add_sink('hook', %s, secret => %s)",
                  (hooks.url("/hook"), "s3cret"))
    ev = fail_refresh(ciflow_db, emulator, "updated")
    rows = deliveries(ciflow_db)
    assert [(r["event_id"], r["sink"], r["status"], r["attempts"]) for r in rows] == \
        [(ev["id"], "hook", "pending", 0)]
    assert before["id"] < ev["id"]

    assert deliver(ciflow_db) == 1
    got = hooks.received("/hook")
    assert len(got) == 1
    body, headers = got[0]["body"], got[0]["headers"]
    assert json.loads(body) == event_json(ev)
    assert headers["Content-Type"] == "application/json"
    assert headers["Idempotency-Key"] == str(ev["id"])
    want = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert headers["X-Ciflow-Signature"] == "sha256=" + want
    row = deliveries(ciflow_db)[0]
    assert (row["status"], row["attempts"], row["last_status"], row["last_error"]) == \
        ("delivered", 1, 200, None)
    assert row["delivered_at"] is not None
    assert deliver(ciflow_db) == 0
    assert len(hooks.received()) == 1
    with ciflow_db.connect() as conn, conn.cursor() as cur:    # the GUC needs the library
        cur.execute("LOAD 'ciflow'")
        cur.execute("SHOW ciflow.delivery_max_attempts")
        assert cur.fetchone() == ("8",)

    sinks = dict_rows(ciflow_db, "SELECT * FROM ciflow.sinks")
    assert list(sinks[0]) == ["name", "url", "format", "kinds", "connection", "mail_from",
                              "mail_to", "has_secret", "has_password", "created_at"]
    assert (sinks[0]["has_secret"], sinks[0]["has_password"]) == (True, False)
    assert "s3cret" not in json.dumps(sinks, default=str)


def test_kinds_and_connection_filter_sinks(ciflow_db, hooks, emulator):
    ciflow_db.sql("SELECT ciflow.add_sink('failures', %s, kinds => ARRAY['datasource_refresh_failed'],"
                  " connection => 'emu')", (hooks.url("/f"),))
    ciflow_db.sql("SELECT ciflow.add_sink('all', %s)", (hooks.url("/a"),))
    failed = fail_refresh(ciflow_db, emulator)
    ok = fail_refresh(ciflow_db, emulator, "updated")
    rows = deliveries(ciflow_db)
    assert sorted((r["sink"], r["event_id"]) for r in rows) == sorted(
        [("failures", failed["id"]), ("all", failed["id"]), ("all", ok["id"])])
    assert deliver(ciflow_db) == 3
    assert [b["id"] for b in hooks.json_bodies("/a")] == [failed["id"], ok["id"]]
    assert [b["id"] for b in hooks.json_bodies("/f")] == [failed["id"]]


def test_retries_back_off_then_give_up_and_retry_delivery_requeues(ciflow_db, hooks, emulator):
    ciflow_db.sql("SELECT ciflow.add_sink('flaky', %s)", (hooks.url("/flaky"),))
    hooks.script("/flaky", [500, 503, 502, 200])
    ev = fail_refresh(ciflow_db, emulator)
    fast = {"ciflow.delivery_max_attempts": 3, "ciflow.retry_base_delay": 200}
    assert deliver(ciflow_db, fast) == 1
    row = deliveries(ciflow_db)[0]
    assert (row["status"], row["attempts"], row["last_status"]) == ("pending", 1, 500)
    assert row["last_error"] == "HTTP 500: sink says no"
    with raises_sqlstate("55000"):                    # only a failed one
        ciflow_db.sql("SELECT ciflow.retry_delivery(%s)", (row["id"],))
    # Not due yet: 200 ms +-25 %.
    assert deliver(ciflow_db, fast) == 0
    time.sleep(0.3)
    assert deliver(ciflow_db, fast) == 1
    row = deliveries(ciflow_db)[0]
    assert (row["status"], row["attempts"], row["last_status"]) == ("pending", 2, 503)
    time.sleep(0.55)                                  # 400 ms +-25 %
    assert deliver(ciflow_db, fast) == 1
    row = deliveries(ciflow_db)[0]
    assert (row["status"], row["attempts"], row["last_status"]) == ("failed", 3, 502)
    assert deliver(ciflow_db, fast) == 0

    with raises_sqlstate("42704"):
        ciflow_db.sql("SELECT ciflow.retry_delivery(%s)", (row["id"] + 1000,))
    ciflow_db.sql("SELECT ciflow.retry_delivery(%s)", (row["id"],))
    row = deliveries(ciflow_db)[0]
    assert (row["status"], row["attempts"]) == ("pending", 0)
    assert deliver(ciflow_db, fast) == 1
    row = deliveries(ciflow_db)[0]
    assert (row["status"], row["attempts"], row["last_status"]) == ("delivered", 1, 200)
    assert [json.loads(r["body"])["id"] for r in hooks.received("/flaky")] == [ev["id"]] * 4


def test_other_4xx_and_redirects_fail_at_once_and_429_waits_retry_after(ciflow_db, hooks, emulator):
    ciflow_db.sql("SELECT ciflow.add_sink('gone', %s)", (hooks.url("/gone"),))
    ciflow_db.sql("SELECT ciflow.add_sink('busy', %s)", (hooks.url("/busy"),))
    ciflow_db.sql("SELECT ciflow.add_sink('moved', %s)", (hooks.url("/moved"),))
    hooks.script("/gone", [404])
    hooks.script("/busy", [(429, {"Retry-After": "30"})])
    hooks.script("/moved", [(302, {"Location": hooks.url("/elsewhere")})])
    fail_refresh(ciflow_db, emulator)
    assert deliver(ciflow_db, {"ciflow.max_retry_after": 5}) == 3
    rows = {r["sink"]: r for r in deliveries(ciflow_db)}
    assert (rows["gone"]["status"], rows["gone"]["attempts"], rows["gone"]["last_status"]) == \
        ("failed", 1, 404)
    # Redirects are not followed: a 3xx is the sink's final answer.
    assert (rows["moved"]["status"], rows["moved"]["last_status"]) == ("failed", 302)
    assert hooks.received("/elsewhere") == []
    busy = rows["busy"]
    assert (busy["status"], busy["last_status"]) == ("pending", 429)
    wait = dict_rows(ciflow_db, "SELECT extract(epoch FROM next_attempt_at - clock_timestamp())"
                                " AS s FROM ciflow.deliveries WHERE sink = 'busy'")[0]["s"]
    assert 3.5 < float(wait) <= 5.0                   # Retry-After 30 capped at 5 s


def test_order_per_sink_head_blocks_its_sink_only(ciflow_db, hooks, emulator):
    ciflow_db.sql("SELECT ciflow.add_sink('slow', %s)", (hooks.url("/slow"),))
    ciflow_db.sql("SELECT ciflow.add_sink('fine', %s)", (hooks.url("/fine"),))
    hooks.script("/slow", [500, 200])
    first = fail_refresh(ciflow_db, emulator)
    second = fail_refresh(ciflow_db, emulator, "updated")
    third = fail_refresh(ciflow_db, emulator)
    fast = {"ciflow.retry_base_delay": 100}
    # slow: head fails, the rest waits; fine: all three in one pass, in order.
    assert deliver(ciflow_db, fast) == 4
    assert [b["id"] for b in hooks.json_bodies("/fine")] == [first["id"], second["id"], third["id"]]
    assert [b["id"] for b in hooks.json_bodies("/slow")] == [first["id"]]
    time.sleep(0.2)
    assert deliver(ciflow_db, fast) == 3
    assert [b["id"] for b in hooks.json_bodies("/slow")] == \
        [first["id"], first["id"], second["id"], third["id"]]
    assert {r["status"] for r in deliveries(ciflow_db)} == {"delivered"}


def test_hanging_sink_does_not_delay_a_healthy_one(ciflow_db, hooks, emulator):
    ciflow_db.sql("SELECT ciflow.add_sink('hangs', %s)", (hooks.url("/hang"),))
    ciflow_db.sql("SELECT ciflow.add_sink('healthy', %s)", (hooks.url("/ok"),))
    hooks.script("/hang", ["hang"])
    fail_refresh(ciflow_db, emulator)
    fail_refresh(ciflow_db, emulator, "updated")
    start = time.monotonic()
    n = deliver(ciflow_db, {"ciflow.request_timeout": 2000})
    took = time.monotonic() - start
    assert n == 3                                     # healthy twice, hangs once
    ok = hooks.received("/ok")
    assert len(ok) == 2 and all(r["at"] - start < 1.0 for r in ok)
    assert 1.9 < took < 5
    rows = {(r["sink"], r["status"]) for r in deliveries(ciflow_db)}
    assert rows == {("healthy", "delivered"), ("hangs", "pending")}
    hang = [r for r in deliveries(ciflow_db) if r["sink"] == "hangs" and r["attempts"] == 1][0]
    assert hang["last_error"].startswith("timed out")
    assert hang["last_status"] is None


def _call_quietly(conn):
    try:
        with conn.cursor() as cur:
            cur.execute("SET ciflow.request_timeout = 20000")
            cur.execute("CALL ciflow.deliver()")
    except Exception:
        pass


def test_event_rolled_back_leaves_no_delivery_and_committed_one_survives_restart(
        ciflow_db, hooks, emulator):
    ciflow_db.sql("SELECT ciflow.add_sink('outbox', %s)", (hooks.url("/o"),))
    set_datasource(emulator, "RetailPos", refreshState="updateFailed", lastRefresh="now")
    conn = ciflow_db.connect(autocommit=False)
    with conn.cursor() as cur:
        cur.execute("SELECT * FROM ciflow.poll('emu')")
        assert len(cur.fetchall()) == 1
    conn.rollback()
    conn.close()
    assert deliveries(ciflow_db) == []
    ev = poll(ciflow_db)[0]
    assert [r["event_id"] for r in deliveries(ciflow_db)] == [ev["id"]]
    assert deliver(ciflow_db) == 1
    assert [b["id"] for b in hooks.json_bodies("/o")] == [ev["id"]]


def test_teams_and_slack_formats(ciflow_db, hooks, emulator):
    ciflow_db.sql("SELECT ciflow.add_sink('teams', %s, format => 'teams')", (hooks.url("/t"),))
    ciflow_db.sql("SELECT ciflow.add_sink('slack', %s, format => 'slack')", (hooks.url("/s"),))
    ev = fail_refresh(ciflow_db, emulator)
    assert deliver(ciflow_db) == 2
    created = event_json(ev)["created_at"]
    title = f"[ciflow] datasource_refresh_failed: {RETAIL_POS}"
    facts = [{"name": k, "value": v} for k, v in ev["payload"].items()]
    assert hooks.json_bodies("/t") == [{
        "@type": "MessageCard", "@context": "https://schema.org/extensions",
        "summary": title, "themeColor": "D13438", "title": title,
        "text": f"Event {ev['id']} of connection emu at {created}",
        "sections": [{"facts": facts}]}]
    lines = "".join(f"\n• {k}: {v}" for k, v in ev["payload"].items())
    assert hooks.json_bodies("/s") == [{
        "text": f"*{title}*\nEvent {ev['id']} of connection emu at {created}{lines}"}]
    for r in hooks.received():
        assert r["headers"]["Idempotency-Key"] == str(ev["id"])
        assert "X-Ciflow-Signature" not in r["headers"]


def test_drop_sink_discards_its_deliveries(ciflow_db, hooks, emulator):
    ciflow_db.sql("SELECT ciflow.add_sink('doomed', %s)", (hooks.url("/d"),))
    fail_refresh(ciflow_db, emulator)
    assert len(deliveries(ciflow_db)) == 1
    ciflow_db.sql("SELECT ciflow.drop_sink('doomed')")
    assert deliveries(ciflow_db) == []
    assert deliver(ciflow_db) == 0
    assert hooks.received() == []
    with raises_sqlstate("42704"):
        ciflow_db.sql("SELECT ciflow.drop_sink('doomed')")
    ciflow_db.sql("SELECT ciflow.drop_sink('doomed', if_exists => true)")


def test_trim_events_takes_deliveries_along(ciflow_db, hooks, emulator):
    ciflow_db.sql("SELECT ciflow.add_sink('old', %s)", (hooks.url("/x"),))
    fail_refresh(ciflow_db, emulator)
    ciflow_db.sql("UPDATE ciflow.events SET created_at = now() - interval '400 days'")
    ciflow_db.sql("SELECT ciflow.trim_events()")
    assert deliveries(ciflow_db) == []


@pytest.mark.parametrize("args, code", [
    ("'Bad Name', 'https://h.example/x'", "42602"),
    ("'x', 'ftp://h.example/x'", "22023"),
    ("'x', 'https://user:pw@h.example/x'", "22023"),
    ("'x', 'smtp://h.example', format => 'json'", "22023"),
    ("'x', 'https://h.example/x', format => 'mail', mail_from => 'a@b', mail_to => ARRAY['c@d']",
     "22023"),
    ("'x', 'smtp://h.example', format => 'mail', mail_from => 'a@b'", "22023"),
    ("'x', 'smtp://h.example', format => 'mail', mail_from => 'a@b',"
     " mail_to => ARRAY[E'c@d\\r\\nBcc: e@f']", "22023"),
    ("'x', 'https://h.example/x', kinds => ARRAY['nope']", "22023"),
    ("'x', 'https://h.example/x', format => 'teams', secret => 'k'", "22023"),
    ("'x', 'https://h.example/x', connection => 'nope'", "42704"),
])
def test_add_sink_refuses(ciflow_db, hooks, args, code):
    with raises_sqlstate(code):
        ciflow_db.sql(f"SELECT ciflow.add_sink({args})")


def test_not_for_public_and_secrets_hidden(ciflow_db, hooks, pg_cluster):
    ciflow_db.sql("SELECT ciflow.add_sink('private', %s, secret => 'topsecret')",
                  (hooks.url("/p"),))
    role = "delivery_nobody"
    ciflow_db.sql(f"DROP ROLE IF EXISTS {role}")
    ciflow_db.sql(f"CREATE ROLE {role} LOGIN")
    try:
        for stmt in ["SELECT ciflow.add_sink('p2', 'https://h.example/')",
                     "SELECT ciflow.drop_sink('private')",
                     "SELECT * FROM ciflow.sinks", "SELECT * FROM ciflow.deliveries",
                     "SELECT * FROM ciflow.sink_secrets", "CALL ciflow.deliver()",
                     "SELECT ciflow.retry_delivery(1)"]:
            with raises_sqlstate("42501"):
                ciflow_db.sql(stmt, user=role)
        # Granted the table, RLS with no policy still shows no secret.
        ciflow_db.sql(f"GRANT SELECT ON ciflow.sink_secrets TO {role}")
        assert ciflow_db.sql("SELECT * FROM ciflow.sink_secrets", user=role) == []
    finally:
        ciflow_db.sql(f"REVOKE ALL ON ciflow.sink_secrets FROM {role}")
        ciflow_db.sql(f"DROP ROLE {role}")
    assert "topsecret" not in pg_cluster.log_text()


def test_deliver_refuses_a_transaction_block(ciflow_db, hooks):
    conn = ciflow_db.connect(autocommit=False)
    try:
        with raises_sqlstate("2D000"):
            with conn.cursor() as cur:
                cur.execute("CALL ciflow.deliver()")
    finally:
        conn.close()


def test_https_sink_verifies_the_certificate(ciflow_db, hooks, emulator, tls_dir):
    tls = HttpReceiver(tls_dir=tls_dir)
    try:
        ciflow_db.sql("SELECT ciflow.add_sink('trusted', %s, ca_file => %s)",
                      (tls.url("/t"), tls_dir + "/ca.pem"))
        ciflow_db.sql("SELECT ciflow.add_sink('untrusted', %s)", (tls.url("/u"),))
        fail_refresh(ciflow_db, emulator)
        assert deliver(ciflow_db) == 2
        rows = {r["sink"]: r for r in deliveries(ciflow_db)}
        assert rows["trusted"]["status"] == "delivered"
        assert rows["untrusted"]["status"] == "pending"
        assert rows["untrusted"]["last_status"] is None
        assert "certificate" in rows["untrusted"]["last_error"].lower() or \
            "ssl" in rows["untrusted"]["last_error"].lower()
        assert [r["path"] for r in tls.received()] == ["/t"]
    finally:
        tls.stop()


def test_a_sink_gets_only_what_its_owner_may_read(ciflow_db, hooks, emulator):
    """Deliveries carry the rights of the role that added the sink: events of a
    connection it may not use are not delivered to it."""
    role = "delivery_adder"
    ciflow_db.sql(f"DROP ROLE IF EXISTS {role}")
    ciflow_db.sql(f"CREATE ROLE {role} LOGIN")
    ciflow_db.sql(f"GRANT EXECUTE ON FUNCTION ciflow.add_sink(text, text, text, text[], text,"
                  f" text, text, text[], text, text, boolean, text) TO {role}")
    ciflow_db.sql(f"GRANT SELECT ON ciflow.sinks TO {role}")
    try:
        ciflow_db.sql("SELECT ciflow.add_sink('theirs', %s)", (hooks.url("/theirs"),), user=role)
        assert ciflow_db.sql("SELECT name FROM ciflow.sinks", user=role) == [("theirs",)]
        fail_refresh(ciflow_db, emulator)
        assert deliveries(ciflow_db) == []
        ciflow_db.sql(f"SELECT ciflow.grant_connection('emu', '{role}')")
        ev = fail_refresh(ciflow_db, emulator, "updated")
        assert [(r["sink"], r["event_id"]) for r in deliveries(ciflow_db)] == [("theirs", ev["id"])]
    finally:
        ciflow_db.sql("SELECT ciflow.drop_sink('theirs', if_exists => true)")
        ciflow_db.sql(f"SELECT ciflow.revoke_connection('emu', '{role}')")
        ciflow_db.sql(f"REVOKE ALL ON FUNCTION ciflow.add_sink(text, text, text, text[], text,"
                      f" text, text, text[], text, text, boolean, text) FROM {role}")
        ciflow_db.sql(f"REVOKE ALL ON ciflow.sinks FROM {role}")
        ciflow_db.sql(f"DROP ROLE {role}")


def test_crashes_before_and_during_a_pass_lose_nothing(private_ciflow, receiver, emulator):
    """A server crash (SIGKILL of a backend: crash recovery ends every session)
    right after an event is recorded keeps its delivery; one in the middle of
    a send keeps the claimed delivery pending, and it is sent again with the
    same Idempotency-Key."""
    pg = private_ciflow
    # The harness turns synchronous_commit off; a crash would lose the last commits.
    pg.sql("ALTER DATABASE postgres SET synchronous_commit = on")
    receiver.clear()
    receiver.script("/crash", ["hang", 200])
    poll(pg)
    pg.sql("SELECT ciflow.add_sink('crash', %s)", (receiver.url("/crash"),))
    ev = fail_refresh(pg, emulator)

    victim = pg.connect()
    sigkill_and_recover(pg, victim.get_backend_pid())
    assert [(r["event_id"], r["status"], r["attempts"]) for r in deliveries(pg)] == \
        [(ev["id"], "pending", 0)]

    conn = pg.connect()
    t = threading.Thread(target=lambda: _call_quietly(conn), daemon=True)
    t.start()
    wait_for(lambda: receiver.received("/crash"), timeout=10, what="the request")
    sigkill_and_recover(pg, conn.get_backend_pid())
    t.join(10)
    assert [(r["status"], r["attempts"]) for r in deliveries(pg)] == [("pending", 1)]
    pg.sql("UPDATE ciflow.deliveries SET next_attempt_at = now()")   # end the lease
    assert deliver(pg) == 1
    assert [r["headers"]["Idempotency-Key"] for r in receiver.received("/crash")] == \
        [str(ev["id"])] * 2
    assert deliveries(pg)[0]["status"] == "delivered"
