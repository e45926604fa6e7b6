"""Issue 8: thresholds on segments and measures, the cost of a pass, and a
pass that fails midway (customer-insights-api.md B.1, B.2).

Defaults: segment HighValue has 43 members, Churners 21; measure
TotalRevenue is 7434.10 (scalar), RevenueByCountry has a dimension."""

from decimal import Decimal

import pytest

from extension.cihelpers import dict_rows, raises_sqlstate
from extension.eventhelpers import (RETAIL_POS, api_calls_of, assert_notified, events,
                                    finish_job, new_job, poll, set_datasource, set_measure,
                                    set_segment)
from extension.eventhelpers import clean, listener  # noqa: F401 - fixtures


def add(db, kind, name, above, value_key=None):
    return db.sql("SELECT ciflow.add_threshold('emu', %s, %s, above => %s, value_key => %s)",
                  (kind, name, above, value_key))[0][0]


def kinds(rows):
    return [(r["kind"], r["subject"]) for r in rows]


def test_segment_above_below_above_fires_twice(ciflow_db, clean, emulator, listener):
    tid = add(ciflow_db, "segment", "HighValue", 50)
    row = dict_rows(ciflow_db, "SELECT * FROM ciflow.thresholds WHERE id = %s", (tid,))[0]
    assert (row["kind"], row["subject"], row["above"], row["last_value"]) == \
        ("segment", "HighValue", 50, 43)
    poll(ciflow_db)
    first = set_segment(emulator, "HighValue", 60)
    new = poll(ciflow_db)
    assert kinds(new) == [("segment_threshold_exceeded", "HighValue")]
    assert new[0]["payload"] == {
        "threshold_id": tid, "threshold": 50, "previous": 43, "value": 60,
        "evaluated_at": first["evaluationStatus"]["evaluationDate"]}
    assert_notified(listener, new)
    set_segment(emulator, "HighValue", 70)          # still above: nothing
    assert poll(ciflow_db) == []
    set_segment(emulator, "HighValue", 50)          # at the threshold: re-armed
    assert poll(ciflow_db) == []
    set_segment(emulator, "HighValue", 51)
    new = poll(ciflow_db)
    assert [(e["payload"]["previous"], e["payload"]["value"]) for e in new] == [(50, 51)]
    assert_notified(listener, new)
    assert poll(ciflow_db) == []
    st = dict_rows(ciflow_db, "SELECT state, value FROM ciflow.refresh_states"
                              " WHERE kind = 'segment' AND subject = 'HighValue'")
    assert st == [{"state": "CompletedSuccess", "value": 51}]
    assert dict_rows(ciflow_db, "SELECT last_value FROM ciflow.thresholds WHERE id = %s",
                     (tid,)) == [{"last_value": 51}]


def test_a_new_threshold_starts_from_a_baseline(ciflow_db, clean, emulator):
    poll(ciflow_db)
    set_segment(emulator, "HighValue", 100)
    add(ciflow_db, "segment", "HighValue", 50)      # already above when added
    assert poll(ciflow_db) == []


def test_segment_observations_not_accepted(ciflow_db, clean, emulator):
    add(ciflow_db, "segment", "HighValue", 50)
    poll(ciflow_db)
    set_segment(emulator, "HighValue", 90, status="Running")
    assert poll(ciflow_db) == []
    set_segment(emulator, "HighValue", 90, date="2024-01-01T00:00:00Z")   # older
    assert poll(ciflow_db) == []
    set_segment(emulator, "HighValue", 90)
    assert kinds(poll(ciflow_db)) == [("segment_threshold_exceeded", "HighValue")]


def test_measure_threshold(ciflow_db, clean, emulator, listener):
    tid = add(ciflow_db, "measure", "TotalRevenue", 8000)
    poll(ciflow_db)
    set_measure(emulator, "TotalRevenue", {"TotalRevenue": "not a number"})
    assert poll(ciflow_db) == []
    set_measure(emulator, "TotalRevenue", {"TotalRevenue": "9000"}, state="running")
    assert poll(ciflow_db) == []
    m = set_measure(emulator, "TotalRevenue", {"TotalRevenue": "8000.01"})
    new = poll(ciflow_db)
    assert new[0]["kind"] == "measure_threshold_exceeded"
    assert new[0]["payload"] == {
        "threshold_id": tid, "value_key": "TotalRevenue", "threshold": "8000",
        "previous": "7434.10", "value": "8000.01",
        "evaluated_at": m["output"]["evaluationTime"]}
    assert_notified(listener, new)
    st = dict_rows(ciflow_db, "SELECT state, value, details FROM ciflow.refresh_states"
                              " WHERE kind = 'measure' AND subject = 'TotalRevenue'")
    assert st == [{"state": "completed", "value": Decimal("8000.01"),
                   "details": {"values": {"TotalRevenue": "8000.01"}}}]


def test_measure_with_several_values_needs_value_key(ciflow_db, clean, emulator):
    set_measure(emulator, "TotalRevenue", {"Gross": "10", "Net": "5"})
    with raises_sqlstate("42P08") as e:
        add(ciflow_db, "measure", "TotalRevenue", 100)
    assert "Gross, Net" in e.detail and "value_key" in e.hint
    with raises_sqlstate("22023") as e:
        add(ciflow_db, "measure", "TotalRevenue", 100, value_key="Tax")
    assert e.hint
    tid = add(ciflow_db, "measure", "TotalRevenue", 7, value_key="Net")
    poll(ciflow_db)
    set_measure(emulator, "TotalRevenue", {"Gross": "20", "Net": "8"})
    new = poll(ciflow_db)
    assert [(e["payload"]["threshold_id"], e["payload"]["value_key"], e["payload"]["value"])
            for e in new] == [(tid, "Net", "8")]


def test_threshold_errors(ciflow_db, clean, emulator):
    with raises_sqlstate("42704") as e:
        add(ciflow_db, "segment", "NoSuchSegment", 1)
    assert "HighValue" in e.hint
    with raises_sqlstate("42704") as e:
        add(ciflow_db, "measure", "NoSuchMeasure", 1)
    assert "TotalRevenue" in e.hint
    with raises_sqlstate("42809") as e:
        add(ciflow_db, "measure", "RevenueByCountry", 1)
    assert e.message == "thresholds need a measure without dimensions" and e.hint
    with raises_sqlstate("22023") as e:
        add(ciflow_db, "table", "HighValue", 1)
    assert e.hint
    with raises_sqlstate("22023"):
        add(ciflow_db, "segment", "HighValue", "NaN")
    with raises_sqlstate("22023"):
        add(ciflow_db, "segment", "HighValue", 1, value_key="x")
    with raises_sqlstate("42704"):
        ciflow_db.sql("SELECT ciflow.drop_threshold(424242)")
    assert ciflow_db.sql("SELECT count(*) FROM ciflow.thresholds") == [(0,)]


def test_drop_threshold(ciflow_db, clean, emulator):
    tid = add(ciflow_db, "segment", "HighValue", 50)
    ciflow_db.sql("SELECT ciflow.drop_threshold(%s)", (tid,))
    set_segment(emulator, "HighValue", 60)
    assert poll(ciflow_db) == []


def test_measure_gaining_dimensions_disables_its_threshold(ciflow_db, clean, emulator):
    tid = add(ciflow_db, "measure", "TotalRevenue", 8000)
    set_measure(emulator, "TotalRevenue", {"TotalRevenue": "9000"},
                definition={"isScalar": False, "dimensions": [{"name": "Country"}]})
    conn = ciflow_db.connect()
    assert poll(ciflow_db, conn) == []
    assert any("disabled" in n for n in conn.notices)
    conn.close()
    assert ciflow_db.sql("SELECT enabled FROM ciflow.thresholds WHERE id = %s", (tid,)) == \
        [(False,)]


def test_a_pass_costs_at_most_five_calls(ciflow_db, clean, emulator):
    assert len(api_calls_of(emulator, lambda: poll(ciflow_db))) == 2
    for name in ("HighValue", "Churners"):
        for above in (10, 100, 1000):
            add(ciflow_db, "segment", name, above)
    add(ciflow_db, "measure", "TotalRevenue", 1)
    add(ciflow_db, "measure", "TotalRevenue", 2)
    calls = api_calls_of(emulator, lambda: poll(ciflow_db))
    assert sorted(c["path"].rsplit("/", 2)[-1] for c in calls) == \
        ["datasources", "jobs", "measures", "segments"]


def test_a_pass_whose_third_call_fails_records_nothing(ciflow_db, clean, emulator, listener):
    add(ciflow_db, "segment", "HighValue", 50)
    poll(ciflow_db)
    before = dict_rows(ciflow_db, "SELECT * FROM ciflow.refresh_states ORDER BY kind, subject")
    set_datasource(emulator, "RetailPos", refreshState="updateFailed", lastRefresh="now")
    job = new_job(emulator, operationType="all", submissionKind="scheduled")
    finish_job(emulator, job, "failed")
    set_segment(emulator, "HighValue", 60)
    # The segments call is the pass's third; it fails every attempt.
    emulator.add_fault({"method": "GET", "path": "/manage/segments$"},
                       {"status": 503, "body": "gateway"})
    with raises_sqlstate("08006") as e:
        poll(ciflow_db)
    assert "emu" in e.message
    assert events(ciflow_db) == []
    assert listener.drain() == []
    assert dict_rows(ciflow_db, "SELECT * FROM ciflow.refresh_states ORDER BY kind, subject") \
        == before
    emulator.clear_faults()
    new = poll(ciflow_db)
    assert kinds(new) == [("datasource_refresh_failed", RETAIL_POS),
                          ("full_refresh_completed", job),
                          ("unification_refresh_completed", job),
                          ("segment_threshold_exceeded", "HighValue")]
    assert_notified(listener, new)
    assert poll(ciflow_db) == []


def test_status_fallback_when_jobs_carry_no_tasks(ciflow_db, clean, emulator, listener):
    """B.2's fallback: jobs without tasks make the pass read .../status (its
    fifth call at most) and report a unification from the merge node."""
    no_tasks = ('[{"jobId":"job-without-tasks","jobType":"full","jobSubmissionKind":"scheduled",'
                '"jobStatus":"running","operationType":"all",'
                '"submittedTimestamp":"2025-03-02T00:00:00.0000000Z","endTimestamp":null}]')
    emulator.add_fault({"method": "GET", "path": "/workflows/main/jobs$"},
                       {"status": 200, "body": "raw", "message": no_tasks})
    calls = api_calls_of(emulator, lambda: poll(ciflow_db))
    assert [c["path"].rsplit("/", 1)[-1] for c in calls] == ["datasources", "jobs", "status"]
    job = new_job(emulator, operationType="all", submissionKind="scheduled")
    done = finish_job(emulator, job)
    merge = [t for t in done["tasks"] if t["operationType"] == "merge"][0]
    new = [e for e in poll(ciflow_db) if e["kind"] == "unification_refresh_completed"]
    assert [(e["subject"], e["payload"]) for e in new] == [
        ("Merge", {"operation_type": "merge", "status": "successful",
                   "steps": {"map": "successful", "match": "successful", "merge": "successful"},
                   "submission_kind": None, "ended": merge["endTimestamp"]})]
    assert poll(ciflow_db) == []


def test_readme_joins_of_events_with_synced_tables(ciflow_db, clean, emulator):
    """The two joins of the README's Events section, run as printed there."""
    for entity in ("Customer", "HighValue", "RetailPos_Transactions"):
        ciflow_db.sql("SELECT * FROM ciflow.sync('emu', %s)", (entity,))
    add(ciflow_db, "segment", "HighValue", 50)
    poll(ciflow_db)
    set_segment(emulator, "HighValue", 60)
    emulator.control("POST", "datasources/RetailPos",
                     {"refreshState": "updateFailed", "lastRefresh": "now"})
    poll(ciflow_db)
    members = ciflow_db.sql("""
        SELECT e.created_at, e.payload ->> 'value' AS members, c.full_name, c.email
          FROM ciflow.events e
          JOIN emu.high_value h ON e.subject = 'HighValue'
          JOIN emu.customer c USING (customer_id)
         WHERE e.kind = 'segment_threshold_exceeded' AND e.id > 0""")
    assert len(members) == 43 and {m[1] for m in members} == {"60"}, members[:3]
    failed = ciflow_db.sql("""
        SELECT e.payload ->> 'name' AS source, e.payload ->> 'last_refresh' AS failed_at,
               max(t.transaction_time) AS newest_row
          FROM ciflow.events e
          JOIN emu.retail_pos_transactions t ON e.payload ->> 'name' = 'RetailPos'
         WHERE e.kind = 'datasource_refresh_failed'
         GROUP BY 1, 2""")
    assert len(failed) == 1 and failed[0][0] == "RetailPos" and failed[0][2] is not None
