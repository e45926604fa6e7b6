"""Issue 8: the data source and job triggers, exactly once, with their
NOTIFY (customer-insights-api.md B.1, B.2; sql-api.md section 5).

Every test starts from the emulator's default instance: RetailPos updated,
WebEvents updateFailed, a finished full refresh and a failed ingestion.
Listeners are real psycopg2 sessions (and psql in test_psql_listener)."""

import time

import psycopg2
import pytest

from extension.cihelpers import dict_rows, raises_sqlstate, session, sync
from extension.eventhelpers import (RETAIL_POS, WEB_EVENTS, Background, assert_notified,
                                    events, finish_job, new_job, poll, set_datasource, state)
from extension.eventhelpers import clean, listener  # noqa: F401 - fixtures


def test_first_poll_is_a_baseline_and_repeats_fire_nothing(ciflow_db, clean, listener):
    assert poll(ciflow_db) == []
    assert poll(ciflow_db) == []
    assert listener.drain() == []
    assert events(ciflow_db) == []
    rows = dict_rows(ciflow_db, "SELECT kind, subject, name, state FROM ciflow.refresh_states"
                                " WHERE connection = 'emu' ORDER BY kind, subject")
    assert rows == [
        {"kind": "datasource", "subject": RETAIL_POS, "name": "RetailPos", "state": "updated"},
        {"kind": "datasource", "subject": WEB_EVENTS, "name": "WebEvents", "state": "updateFailed"},
        {"kind": "job", "subject": "0f6c1d2e-0000-4000-8000-000000000001", "name": "all",
         "state": "successful"},
        {"kind": "job", "subject": "0f6c1d2e-0000-4000-8000-000000000002", "name": "ingestion",
         "state": "failed"},
        {"kind": "job_baseline", "subject": "", "name": None, "state": None},
    ]
    ds = state(ciflow_db, "datasource", RETAIL_POS)
    # 7 fractional digits, rounded to microseconds.
    assert ds["remote_at"].isoformat() == "2025-03-01T02:05:11.123457+00:00"


def test_datasource_failed_then_succeeded(ciflow_db, clean, emulator, listener):
    poll(ciflow_db)
    failed = set_datasource(emulator, "RetailPos", refreshState="updateFailed", lastRefresh="now")
    new = poll(ciflow_db)
    assert [(e["kind"], e["subject"]) for e in new] == [("datasource_refresh_failed", RETAIL_POS)]
    assert new[0]["payload"] == {"name": "RetailPos", "refresh_state": "updateFailed",
                                 "previous_state": "updated",
                                 "last_refresh": failed["lastRefresh"]}
    assert new[0]["dedupe_key"].startswith("datasource_refresh_failed:emu:" + RETAIL_POS + ":")
    assert events(ciflow_db) == new
    assert_notified(listener, new)

    ok = set_datasource(emulator, "RetailPos", refreshState="updated", lastRefresh="now")
    new = poll(ciflow_db)
    assert [(e["kind"], e["payload"]) for e in new] == [
        ("datasource_refresh_succeeded",
         {"name": "RetailPos", "refresh_state": "updated", "previous_state": "updateFailed",
          "last_refresh": ok["lastRefresh"]})]
    assert_notified(listener, new)
    assert poll(ciflow_db) == []
    assert listener.drain() == []
    st = state(ciflow_db, "datasource", RETAIL_POS)
    assert st["state"] == "updated"


def test_transition_between_two_polls_is_reported_once(ciflow_db, clean, emulator, listener):
    poll(ciflow_db)
    # updating, then updateFailed, both between two passes.
    set_datasource(emulator, "RetailPos", refreshState="updating")
    set_datasource(emulator, "RetailPos", refreshState="updateFailed", lastRefresh="now")
    new = poll(ciflow_db)
    assert [e["kind"] for e in new] == ["datasource_refresh_failed"]
    assert_notified(listener, new)
    assert poll(ciflow_db) == []


def test_two_successes_fire_twice_even_unseen_updating(ciflow_db, clean, emulator):
    poll(ciflow_db)
    set_datasource(emulator, "RetailPos", refreshState="updated", lastRefresh="now")
    assert [e["kind"] for e in poll(ciflow_db)] == ["datasource_refresh_succeeded"]
    set_datasource(emulator, "RetailPos", refreshState="updated", lastRefresh="now")
    assert [e["kind"] for e in poll(ciflow_db)] == ["datasource_refresh_succeeded"]


def test_stale_observation_is_ignored(ciflow_db, clean, emulator, listener):
    poll(ciflow_db)
    before = state(ciflow_db, "datasource", RETAIL_POS)
    set_datasource(emulator, "RetailPos", refreshState="updateFailed",
                   lastRefresh="2024-01-01T00:00:00Z")
    assert poll(ciflow_db) == []
    assert listener.drain() == []
    after = state(ciflow_db, "datasource", RETAIL_POS)
    assert (after["state"], after["remote_at"]) == (before["state"], before["remote_at"])


def test_vanished_subjects_fire_nothing_and_keep_their_state(ciflow_db, clean, emulator,
                                                              listener):
    poll(ciflow_db)
    before = dict_rows(ciflow_db, "SELECT kind, subject, state FROM ciflow.refresh_states"
                                  " ORDER BY 1, 2")
    emulator.add_fault({"method": "GET", "path": "/manage/datasources$"},
                       {"status": 200, "body": "raw", "message": "[]"})
    emulator.add_fault({"method": "GET", "path": "/workflows/main/jobs$"},
                       {"status": 200, "body": "raw", "message": "[]"})
    assert poll(ciflow_db) == []
    assert listener.drain() == []
    assert dict_rows(ciflow_db, "SELECT kind, subject, state FROM ciflow.refresh_states"
                                " ORDER BY 1, 2") == before


def test_a_recorded_event_is_never_recorded_or_announced_again(ciflow_db, clean, emulator,
                                                               listener):
    """A pass that finds a transition already in the log (another session
    recorded it, or the state was lost) inserts nothing and notifies nothing."""
    poll(ciflow_db)
    before = state(ciflow_db, "datasource", RETAIL_POS)
    set_datasource(emulator, "RetailPos", refreshState="updateFailed", lastRefresh="now")
    first = poll(ciflow_db)
    assert len(first) == 1
    listener.drain()
    # Put the old state back: the next pass sees the same transition again.
    ciflow_db.sql("UPDATE ciflow.refresh_states SET state = %s, remote_at = %s"
                  " WHERE kind = 'datasource' AND subject = %s",
                  (before["state"], before["remote_at"], RETAIL_POS))
    assert poll(ciflow_db) == []
    assert listener.drain() == []
    assert events(ciflow_db) == first


def test_pascal_case_enums(ciflow_db, clean, emulator, listener):
    emulator.settings(enum_case="pascal")
    poll(ciflow_db)
    set_datasource(emulator, "RetailPos", refreshState="updateFailed", lastRefresh="now")
    new = poll(ciflow_db)
    assert [(e["kind"], e["payload"]["refresh_state"], e["payload"]["previous_state"])
            for e in new] == [("datasource_refresh_failed", "updateFailed", "updated")]
    assert state(ciflow_db, "datasource", RETAIL_POS)["state"] == "updateFailed"


def test_full_and_unification_refresh(ciflow_db, clean, emulator, listener):
    poll(ciflow_db)
    job = new_job(emulator, operationType="all", submissionKind="scheduled")
    assert poll(ciflow_db) == []
    emulator.control("POST", f"jobs/{job}/advance", {"to": "running"})
    assert poll(ciflow_db) == []
    assert state(ciflow_db, "job", job)["state"] == "running"
    done = finish_job(emulator, job)
    new = poll(ciflow_db)
    # The ingestion of both data sources ended too.
    assert [(e["kind"], e["subject"]) for e in new] == [
        ("datasource_refresh_succeeded", RETAIL_POS),
        ("datasource_refresh_succeeded", WEB_EVENTS),
        ("full_refresh_completed", job),
        ("unification_refresh_completed", job)]
    merge = [t for t in done["tasks"] if t["operationType"] == "merge"][0]
    assert new[2]["payload"] == {"status": "successful", "submission_kind": "scheduled",
                                 "job_type": "full", "submitted": done["submittedTimestamp"],
                                 "ended": done["endTimestamp"]}
    assert new[3]["payload"] == {"operation_type": "all", "status": "successful",
                                 "steps": {"map": "successful", "match": "successful",
                                           "merge": "successful"},
                                 "submission_kind": "scheduled", "ended": merge["endTimestamp"]}
    assert_notified(listener, new)
    assert poll(ciflow_db) == []
    assert listener.drain() == []


def test_failed_merge_and_a_job_never_seen_running(ciflow_db, clean, emulator):
    poll(ciflow_db)
    job = new_job(emulator, operationType="all", submissionKind="onDemand",
                  plan={"merge": "failed"})
    for _ in range(12):
        if emulator.control("POST", f"jobs/{job}/advance", {})["jobStatus"] == "failed":
            break
    new = [e for e in poll(ciflow_db) if e["subject"] == job]
    assert [(e["kind"], e["payload"]["status"]) for e in new] == [
        ("full_refresh_completed", "failed"), ("unification_refresh_completed", "failed")]
    assert new[1]["payload"]["steps"] == {"map": "successful", "match": "successful",
                                          "merge": "failed"}
    assert new[0]["payload"]["submission_kind"] == "onDemand"


def test_unification_fires_when_merge_ends_before_the_job(ciflow_db, clean, emulator):
    poll(ciflow_db)
    job = new_job(emulator, operationType="all", submissionKind="scheduled")
    status = None
    while True:
        j = emulator.control("POST", f"jobs/{job}/advance", {})
        merge = [t for t in j["tasks"] if t["operationType"] == "merge"][0]
        if merge["taskStatus"] == "successful":
            status = j["jobStatus"]
            break
    assert status == "running"
    new = [e for e in poll(ciflow_db) if e["subject"] == job]
    assert [e["kind"] for e in new] == ["unification_refresh_completed"]
    finish_job(emulator, job)
    new = [e for e in poll(ciflow_db) if e["subject"] == job]
    assert [e["kind"] for e in new] == ["full_refresh_completed"]


def test_ingestion_with_downstream_is_a_unification_not_a_full_refresh(ciflow_db, clean,
                                                                       emulator):
    poll(ciflow_db)
    job = new_job(emulator, operationType="ingestion", identifiers=["RetailPos"], downstream=True)
    finish_job(emulator, job)
    new = [e for e in poll(ciflow_db) if e["subject"] == job]
    assert [(e["kind"], e["payload"]["operation_type"]) for e in new] == [
        ("unification_refresh_completed", "ingestion")]


def test_jobs_final_before_the_baseline_never_fire(ciflow_db, clean, emulator):
    # Jobs of the scenario (final before the first pass) are the baseline.
    assert poll(ciflow_db) == []
    st = state(ciflow_db, "job", "0f6c1d2e-0000-4000-8000-000000000001")
    assert st["details"]["full_reported"] and st["details"]["unification_reported"]


def test_sync_succeeded_and_failed_events(ciflow_db, clean, emulator, listener):
    run = sync(ciflow_db, "emu", "Customer")
    got = events(ciflow_db)
    assert [(e["kind"], e["subject"], e["dedupe_key"]) for e in got] == [
        ("sync_succeeded", "emu.customer", f"sync:{run['id']}")]
    p = got[0]["payload"]
    assert {k: p[k] for k in ("run_id", "entity", "target", "mode", "status", "rows", "error",
                              "run_by")} == {
        "run_id": run["id"], "entity": "Customer", "target": "emu.customer", "mode": "full",
        "status": "succeeded", "rows": 250, "error": None, "run_by": "postgres"}
    notes = assert_notified(listener, got)
    assert "error" not in notes[0][1] and "run_by" not in notes[0][1]

    emulator.add_fault({"method": "GET", "path": "/data/Customer$"}, {"status": 400})
    with pytest.raises(psycopg2.Error):
        sync(ciflow_db, "emu", "Customer")
    got = events(ciflow_db, "kind = 'sync_failed'")
    assert len(got) == 1
    failed_run = dict_rows(ciflow_db, "SELECT * FROM ciflow.sync_runs ORDER BY id DESC LIMIT 1")[0]
    assert failed_run["status"] == "failed"
    assert got[0]["payload"]["run_id"] == failed_run["id"]
    assert got[0]["payload"]["error"] == failed_run["error"]
    assert_notified(listener, got)


def test_concurrent_passes_never_double_fire(ciflow_db, clean, emulator, listener):
    poll(ciflow_db)
    set_datasource(emulator, "RetailPos", refreshState="updateFailed", lastRefresh="now")
    holder = ciflow_db.connect()
    holder.autocommit = False
    with holder.cursor() as cur:
        cur.execute("SELECT kind FROM ciflow.poll('emu')")
        assert cur.fetchall() == [("datasource_refresh_failed",)]
    # The second pass makes its calls, then waits for the first to commit.
    second = Background(lambda: poll(ciflow_db))
    second.join(1.5)
    assert second.is_alive()
    waits = ciflow_db.sql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                          " AND NOT granted")
    assert waits == [(1,)]
    holder.commit()
    holder.close()
    second.join(30)
    assert second.error is None and second.result == []
    assert len(events(ciflow_db)) == 1
    assert len(listener.drain()) == 2


def test_psql_listener(ciflow_db, clean, emulator):
    poll(ciflow_db)
    set_datasource(emulator, "RetailPos", refreshState="updateFailed", lastRefresh="now")
    script = ("LISTEN ciflow_datasource_refresh_failed;\n"
              "SELECT pg_sleep(3);\n")
    listening = Background(lambda: ciflow_db.psql(["-q"], input=script))
    time.sleep(1.0)
    new = poll(ciflow_db)
    listening.join(30)
    assert listening.error is None
    out = listening.result.stdout
    lines = [ln for ln in out.splitlines() if ln.startswith("Asynchronous notification")]
    assert len(lines) == 1
    assert '"ciflow_datasource_refresh_failed"' in lines[0]
    assert f'"id":{new[0]["id"]},"kind":"datasource_refresh_failed"' in lines[0]


def test_notification_fits_whatever_the_names(ciflow_db, clean, emulator, listener):
    poll(ciflow_db)
    long_name = "Ä" * 6000 + "\u0001" * 1000
    set_datasource(emulator, "RetailPos", name=long_name, refreshState="updateFailed",
                   lastRefresh="now")
    new = poll(ciflow_db)
    assert new[0]["payload"]["name"] == long_name
    got = listener.drain()
    assert len(got) == 2
    for _, note, size in got:
        assert size <= 7900
        assert note["truncated"] is True
        assert note["id"] == new[0]["id"] and note["subject"] == RETAIL_POS
        assert long_name.startswith(note["name"])


def test_trim_events(ciflow_db, clean, emulator):
    poll(ciflow_db)
    for _ in range(3):
        set_datasource(emulator, "RetailPos", refreshState="updated", lastRefresh="now")
        poll(ciflow_db)
    ids = [e["id"] for e in events(ciflow_db)]
    assert len(ids) == 3
    ciflow_db.sql("UPDATE ciflow.events SET created_at = now() - interval '31 days'"
                  " WHERE id = ANY(%s)", (ids[:2],))
    assert ciflow_db.sql("SELECT ciflow.trim_events()") == [(2,)]
    assert [e["id"] for e in events(ciflow_db)] == ids[2:]
    conn = ciflow_db.connect()
    with conn.cursor() as cur:
        cur.execute("SET ciflow.event_retention = '1s'")
        cur.execute("SELECT pg_sleep(1.1), ciflow.trim_events()")
        assert cur.fetchone()[1] == 1
        cur.execute("SHOW ciflow.event_retention")
    conn.close()
    assert events(ciflow_db) == []
    # The batch finds the expired rows through the created_at index.
    with session(ciflow_db, {"enable_seqscan": "off"}) as conn, conn.cursor() as cur:
        cur.execute("EXPLAIN SELECT id FROM ciflow.events WHERE created_at"
                    " < now() - interval '30 days' ORDER BY created_at LIMIT 10000")
        plan = "\n".join(r[0] for r in cur.fetchall())
    assert "events_created_at" in plan


def test_every_ciflow_object_has_a_comment(ciflow_db):
    missing = ciflow_db.sql("""
        SELECT c.oid::regclass::text FROM pg_class c
         WHERE c.relnamespace = 'ciflow'::regnamespace AND c.relkind IN ('r', 'v')
           AND obj_description(c.oid, 'pg_class') IS NULL
        UNION ALL
        SELECT p.oid::regprocedure::text FROM pg_proc p
         WHERE p.pronamespace = 'ciflow'::regnamespace
           AND obj_description(p.oid, 'pg_proc') IS NULL""")
    assert missing == []


def test_privileges(ciflow_db, pg_cluster, clean, emulator):
    poll(ciflow_db)
    set_datasource(emulator, "RetailPos", refreshState="updateFailed", lastRefresh="now")
    poll(ciflow_db)
    pg_cluster.sql("DROP ROLE IF EXISTS ev_reader")
    pg_cluster.create_role("ev_reader")
    try:
        reader = pg_cluster.connect(dbname=ciflow_db.name, user="ev_reader")
        with reader.cursor() as cur:
            for q in ("SELECT * FROM ciflow.events", "SELECT * FROM ciflow.refresh_states",
                      "SELECT * FROM ciflow.thresholds", "SELECT * FROM ciflow.poll('emu')",
                      "SELECT ciflow.trim_events()"):
                with raises_sqlstate("42501"):
                    cur.execute(q)
        ciflow_db.sql("GRANT SELECT ON ciflow.events, ciflow.refresh_states TO ev_reader")
        ciflow_db.sql("GRANT EXECUTE ON FUNCTION ciflow.poll(text) TO ev_reader")
        with reader.cursor() as cur:
            # Granted the tables, but not the connection: sees none of its rows.
            cur.execute("SELECT count(*) FROM ciflow.events")
            assert cur.fetchone() == (0,)
            cur.execute("SELECT count(*) FROM ciflow.refresh_states")
            assert cur.fetchone() == (0,)
            with raises_sqlstate("42501"):
                cur.execute("SELECT * FROM ciflow.poll('emu')")
        ciflow_db.sql("SELECT ciflow.grant_connection('emu', 'ev_reader')")
        with reader.cursor() as cur:
            cur.execute("SELECT kind FROM ciflow.events")
            assert cur.fetchall() == [("datasource_refresh_failed",)]
            cur.execute("SELECT count(*) FROM ciflow.poll('emu')")
            assert cur.fetchone() == (0,)
        reader.close()
    finally:
        ciflow_db.sql("REVOKE ALL ON ciflow.events, ciflow.refresh_states FROM ev_reader")
        ciflow_db.sql("REVOKE ALL ON FUNCTION ciflow.poll(text) FROM ev_reader")
        ciflow_db.sql("SELECT ciflow.revoke_connection('emu', 'ev_reader')")
        pg_cluster.sql("DROP ROLE IF EXISTS ev_reader")


def test_a_server_restart_fires_no_duplicate(private_ciflow, emulator):
    pg = private_ciflow
    assert [r[0] for r in pg.sql("SELECT kind FROM ciflow.events")] == ["sync_succeeded"]
    assert pg.sql("SELECT count(*) FROM ciflow.poll('emu')") == [(0,)]
    set_datasource(emulator, "RetailPos", refreshState="updateFailed", lastRefresh="now")
    assert pg.sql("SELECT kind FROM ciflow.poll('emu')") == [("datasource_refresh_failed",)]
    pg.restart()
    assert pg.sql("SELECT count(*) FROM ciflow.poll('emu')") == [(0,)]
    assert pg.sql("SELECT kind FROM ciflow.events ORDER BY id") == [
        ("sync_succeeded",), ("datasource_refresh_failed",)]


def test_documented_addresses_are_the_fallback_on_404(ciflow_db, clean, emulator, listener):
    """E6 and E7: where the first address answers 404, the docs' form is asked
    (datasources/v2, manage/workflows/main), and the pass goes on as usual."""
    for path in (r"/manage/datasources$", r"/instances/[^/]+/workflows/main/jobs$"):
        emulator.add_fault({"method": "GET", "path": path}, {"status": 404})
    poll(ciflow_db)
    set_datasource(emulator, "RetailPos", refreshState="updateFailed", lastRefresh="now")
    since = emulator.log()[-1]["seq"]
    new = poll(ciflow_db)
    assert [(e["kind"], e["subject"]) for e in new] == [("datasource_refresh_failed", RETAIL_POS)]
    assert_notified(listener, new)
    paths = [(e["path"].split("/instances/", 1)[-1], e["status"]) for e in emulator.log(since)
             if "/instances/" in e["path"]]
    refused = sorted(p.split("/", 1)[1] for p, s in paths if s == 404)
    assert refused == ["manage/datasources", "workflows/main/jobs"], paths
    assert any(p.endswith("/manage/datasources/v2") and s == 200 for p, s in paths), paths
    assert any("/manage/workflows/main/jobs" in p and s == 200 for p, s in paths), paths


def test_a_404_without_a_fallback_fails_the_pass(ciflow_db, clean, emulator):
    poll(ciflow_db)
    for path in (r"/manage/datasources(/v2)?$",):
        emulator.add_fault({"method": "GET", "path": path}, {"status": 404})
    with raises_sqlstate("42704") as e:
        poll(ciflow_db)
    assert "HTTP status 404" in e.detail
    assert events(ciflow_db) == []
