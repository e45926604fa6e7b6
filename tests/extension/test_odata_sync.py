"""ciflow.sync for the `odata` and `dataverse` flavours (issue 10, items 3
and 4): the shape from CSDL $metadata (typed columns, key, comments), every
row of every page (the exact row set), each flavour's paging (Dataverse:
Prefer odata.maxpagesize on every page, never $skip, nextLinks verbatim,
OData-Version headers, annotations ignored; generic OData: relative
nextLinks or $top/$skip), and Dataverse change tracking: the delta link as
the watermark, updates and deletions applied, an expired token pulled again
in full.
"""

import json
import uuid

import pytest

from extension.cihelpers import (api_requests, assert_table_matches_emulator, dict_rows,
                                 primary_key_columns, query_of, run_row, sync, table_columns)

# Types of section 3 that both flavours carry, a lookup-like Guid, a
# DateTimeOffset with an offset; keyed by an Int32.
THING_ATTRS = [("ThingId", "Edm.Int32"), ("Name", "Edm.String"), ("Small", "Edm.Int16"),
               ("Ratio", "Edm.Single"), ("Amount", "Edm.Decimal"), ("Big", "Edm.Int64"),
               ("Seen", "Edm.DateTimeOffset"), ("Opens", "Edm.TimeOfDay"),
               ("Blob", "Edm.Binary"), ("Ref", "Edm.Guid"), ("Active", "Edm.Boolean"),
               ("Day", "Edm.Date")]
THING = {"entityType": "activity",
         "attributes": [{"name": n, "dataType": t} for n, t in THING_ATTRS],
         "keys": [["ThingId"]]}
PG = {"ThingId": "integer", "Name": "text", "Small": "smallint", "Ratio": "real",
      "Amount": "numeric", "Big": "bigint", "Seen": "timestamp with time zone",
      "Opens": "time without time zone", "Blob": "bytea", "Ref": "uuid", "Active": "boolean",
      "Day": "date"}


def thing(i, name=None):
    return {"ThingId": i, "Name": name or "thing %d" % i, "Small": -i, "Ratio": i / 4,
            "Amount": "%d.05" % i, "Big": 9007199254740993 + i,
            "Seen": "2025-03-01T10:%02d:00.1234567+02:00" % (i % 60),
            "Opens": "08:%02d:30.5" % (i % 60), "Blob": "AAEC_w" if i % 2 else "AAEC/w==",
            "Ref": str(uuid.UUID(int=i)), "Active": i % 3 == 0,
            "Day": "2024-02-%02d" % (i % 28 + 1)}


ROWS = [thing(i) for i in range(1, 24)]


@pytest.fixture
def dv(make_connection, dataverse):
    dataverse.set_entity("Thing", dict(THING, entitySet="new_things"), rows=ROWS)
    dataverse.clear_log()
    return make_connection("dv", dataverse, flavor="dataverse", instance_id=None, scope=None,
                           subscription_key=None, page_size=5)


@pytest.fixture
def od(make_connection, emulator):
    import emulator_client as ec
    emulator.set_entity("Thing", THING, rows=ROWS)
    emulator.clear_log()
    return make_connection("od", emulator, flavor="odata", instance_id=None, page_size=5,
                           base_url=f"{emulator.base_url}/instances/{ec.INSTANCE_ID}/data")


def page_calls(emu, entity_set):
    return [c for c in api_requests(emu) if c["path"].endswith("/" + entity_set)]


def assert_thing_table(db, schema, table, emu):
    """Typed columns, comments and key from $metadata; exactly the emulator's rows."""
    cols = table_columns(db, schema, table)
    assert [(c, t, comment) for c, t, comment in cols] == \
        [(n.lower() if n != "ThingId" else "thing_id", PG[n], n) for n, _ in THING_ATTRS]
    assert primary_key_columns(db, schema, table) == ["thing_id"]
    assert_table_matches_emulator(db, f"{schema}.{table}", emu, "Thing", metadata=THING)


# ---------------------------------------------------------------------------
# Full syncs

def test_dataverse_sync_typed_table_and_paging(ciflow_db, dv, dataverse):
    run = sync(ciflow_db, dv, "new_things")
    assert (run["status"], run["rows"], run["pages"], run["inserted"]) == ("succeeded", 23, 5, 23)
    assert_thing_table(ciflow_db, "dv", "new_things", dataverse)
    calls = page_calls(dataverse, "new_things")
    assert len(calls) == 5 and run["api_calls"] == 6          # $metadata + 5 pages
    # Every page asks the page size by preference, never $skip, and follows
    # the service's link byte for byte.
    assert [c["prefer"] for c in calls] == ["odata.maxpagesize=5"] * 5
    assert all("$skip" not in query_of(c) and "$orderby" not in query_of(c) for c in calls)
    assert all("$skiptoken" in query_of(c) for c in calls[1:])
    # A re-sync where nothing changed writes nothing.
    again = sync(ciflow_db, dv, "new_things")
    assert (again["inserted"], again["updated"], again["deleted"]) == (0, 0, 0)


def test_dataverse_sends_odata_version_headers(ciflow_db, dv, dataverse):
    run = sync(ciflow_db, dv, "new_things")
    assert run["status"] == "succeeded"
    calls = api_requests(dataverse)
    assert len(calls) == 6
    assert all((c["odata_version"], c["odata_maxversion"]) == ("4.0", "4.0") for c in calls)


def test_dataverse_next_links_are_followed_byte_for_byte(ciflow_db, dv, dataverse):
    """A doubly encoded paging cookie, as Dataverse sends: requested as sent,
    neither decoded nor encoded again (the log shows the query decoded once)."""
    cookie = "%253Ccookie%2520page%253D%25222%2522%253E"
    link = dataverse.root + "/api/data/v9.2/new_things?$skiptoken=" + cookie
    dataverse.add_fault({"path": "/new_things$", "nth": 1},
                        {"status": 200, "body": "raw", "headers": {"Content-Type": "application/json"},
                         "raw": json.dumps({"value": [thing(1)], "@odata.nextLink": link})})
    dataverse.add_fault({"path": "/new_things$", "query": "skiptoken"},
                        {"status": 200, "body": "raw", "headers": {"Content-Type": "application/json"},
                         "raw": json.dumps({"value": [thing(2)]})})
    run = sync(ciflow_db, dv, "new_things")
    assert (run["status"], run["rows"], run["pages"]) == ("succeeded", 2, 2), run
    calls = page_calls(dataverse, "new_things")
    assert query_of(calls[1]) == {"$skiptoken": "%3Ccookie%20page%3D%222%22%3E"}
    assert [c["prefer"] for c in calls] == ["odata.maxpagesize=5"] * 2


def test_dataverse_annotations_are_ignored(ciflow_db, dv, dataverse):
    page = {"@odata.context": "x", "value": [
        dict(thing(1), **{"@odata.etag": 'W/"1"',
                          "Name@OData.Community.Display.V1.FormattedValue": "Thing One",
                          "Active@OData.Community.Display.V1.FormattedValue": "No"})]}
    dataverse.add_fault({"path": "/new_things$", "nth": 1},
                        {"status": 200, "body": "raw", "raw": json.dumps(page),
                         "headers": {"Content-Type": "application/json"}})
    run = sync(ciflow_db, dv, "new_things")
    assert (run["status"], run["rows"]) == ("succeeded", 1), run
    assert ciflow_db.sql("SELECT thing_id, name, active FROM dv.new_things") == [(1, "thing 1", False)]


def test_odata_sync_by_top_and_skip(ciflow_db, od, emulator):
    run = sync(ciflow_db, od, "Thing")
    assert (run["status"], run["rows"]) == ("succeeded", 23), run
    assert_thing_table(ciflow_db, "od", "thing", emulator)
    calls = page_calls(emulator, "Thing")
    # 4 full pages and one of 3 rows, then the empty one that ends a $skip pull.
    assert [(query_of(c)["$top"], query_of(c)["$skip"]) for c in calls] == \
        [("5", str(s)) for s in (0, 5, 10, 15, 20, 23)]
    assert all(query_of(c)["$orderby"] == "ThingId" for c in calls)
    assert all(c["prefer"] is None for c in calls)


def test_odata_sync_follows_relative_next_links(ciflow_db, od, emulator):
    emulator.settings(nextlink="relative")
    run = sync(ciflow_db, od, "Thing")
    assert (run["status"], run["rows"], run["pages"]) == ("succeeded", 23, 5), run
    assert_thing_table(ciflow_db, "od", "thing", emulator)
    calls = page_calls(emulator, "Thing")
    assert "$skip" in query_of(calls[0]) and all("$skiptoken" in query_of(c) for c in calls[1:])
    # The links carry $top (the page size) and are not re-encoded.
    assert all(query_of(c)["$top"] == "5" for c in calls)


def test_odata_sync_fields_and_filter(ciflow_db, od, emulator):
    run = sync(ciflow_db, od, "Thing", filter="ThingId le 4", fields="Name")
    assert (run["status"], run["rows"]) == ("succeeded", 4), run
    assert ciflow_db.sql("SELECT thing_id, name, small FROM od.thing ORDER BY 1") == \
        [(i, "thing %d" % i, None) for i in range(1, 5)]
    q = query_of(page_calls(emulator, "Thing")[0])
    assert (q["$filter"], q["$select"]) == ("ThingId le 4", "Name,ThingId")


def test_odata_incremental_is_a_full_pull_with_a_notice(ciflow_db, od, emulator):
    sync(ciflow_db, od, "Thing")
    conn = ciflow_db.connect()
    try:
        run = sync(ciflow_db, od, "Thing", conn=conn, mode="incremental")
        notices = "".join(conn.notices)
    finally:
        conn.close()
    assert run["status"] == "succeeded" and "pulls every row" in notices, notices


def test_unknown_entity_set_fails_before_any_page(ciflow_db, dv, dataverse):
    from extension.cihelpers import raises_sqlstate
    with raises_sqlstate("42704"):
        sync(ciflow_db, dv, "new_nothing")
    assert page_calls(dataverse, "new_nothing") == []
    assert dict_rows(ciflow_db, "SELECT status FROM ciflow.sync_runs WHERE connection = 'dv'"
                     " ORDER BY id DESC LIMIT 1") == [{"status": "failed"}]


# ---------------------------------------------------------------------------
# Dataverse change tracking

def incremental(db, connection):
    conn = db.connect()
    try:
        run = sync(db, connection, "new_things", conn=conn, mode="incremental")
        return run, "".join(conn.notices)
    finally:
        conn.close()


def test_dataverse_delta_cycle(ciflow_db, dv, dataverse):
    first, notices = incremental(ciflow_db, dv)
    assert (first["status"], first["rows"], first["inserted"]) == ("succeeded", 23, 23)
    assert "target does not exist yet" in notices
    calls = page_calls(dataverse, "new_things")
    assert [c["prefer"] for c in calls] == ["odata.track-changes, odata.maxpagesize=5"] * 5
    link = first["watermark"]["delta_link"]
    assert "$deltatoken=" in link and link.startswith(dataverse.root)

    # Nothing changed: one call of the stored link, nothing written.
    dataverse.clear_log()
    quiet, notices = incremental(ciflow_db, dv)
    assert (quiet["status"], quiet["rows"], quiet["inserted"], quiet["updated"],
            quiet["deleted"]) == ("succeeded", 0, 0, 0, 0)
    assert notices == ""
    [call] = page_calls(dataverse, "new_things")
    assert dataverse.root + call["path"] + "?" in link and "$deltatoken" in query_of(call)
    link = quiet["watermark"]["delta_link"]

    # Updates, an insert and deletions: applied as upserts and deletes.
    dataverse.control("POST", "entities/Thing/rows", {"mode": "upsert", "rows": [
        thing(2, "renamed"), thing(40), thing(7, "short-lived"), thing(41)]})
    dataverse.control("DELETE", "entities/Thing/rows/7")
    dataverse.control("DELETE", "entities/Thing/rows/41")     # never in the table
    dataverse.control("DELETE", "entities/Thing/rows/3")
    delta, _ = incremental(ciflow_db, dv)
    assert (delta["status"], delta["inserted"], delta["updated"], delta["deleted"]) == \
        ("succeeded", 1, 1, 2), delta
    assert delta["watermark"]["delta_link"] != link
    assert_thing_table(ciflow_db, "dv", "new_things", dataverse)
    assert ciflow_db.sql("SELECT name FROM dv.new_things WHERE thing_id = 2") == [("renamed",)]

    # A deleted row that comes back is inserted again.
    dataverse.control("POST", "entities/Thing/rows", {"mode": "upsert", "rows": [thing(3)]})
    back, _ = incremental(ciflow_db, dv)
    assert (back["inserted"], back["deleted"]) == (1, 0)
    assert_thing_table(ciflow_db, "dv", "new_things", dataverse)


def test_dataverse_expired_delta_token_pulls_everything(ciflow_db, dv, dataverse):
    first, _ = incremental(ciflow_db, dv)
    assert first["status"] == "succeeded"
    # A replace of the rows expires every token (emulator, C.7).
    dataverse.control("POST", "entities/Thing/rows", {"mode": "replace",
                                                       "rows": [thing(i) for i in range(5, 30)]})
    dataverse.clear_log()
    run, notices = incremental(ciflow_db, dv)
    assert run["status"] == "succeeded", run
    assert "refused the stored delta link" in notices and "400" in notices, notices
    # The full pull applies the whole difference, deletions included.
    assert (run["inserted"], run["deleted"]) == (6, 4), run
    assert_thing_table(ciflow_db, "dv", "new_things", dataverse)
    calls = page_calls(dataverse, "new_things")
    assert calls[0]["status"] == 400 and "$deltatoken" in query_of(calls[0])
    assert all("$deltatoken" not in query_of(c) for c in calls[1:])
    assert all(c["prefer"] == "odata.track-changes, odata.maxpagesize=5" for c in calls)
    # Recorded: the run's watermark says why, and holds a fresh delta link.
    stored = run_row(ciflow_db, run["id"])["watermark"]
    assert "refused" in stored["full_pull"] and "$deltatoken=" in stored["delta_link"]
    # ... which the next run uses.
    dataverse.clear_log()
    nxt, notices = incremental(ciflow_db, dv)
    assert (nxt["status"], nxt["rows"]) == ("succeeded", 0) and notices == ""


def test_dataverse_incremental_with_a_filter_is_a_full_pull(ciflow_db, dv, dataverse):
    sync(ciflow_db, dv, "new_things")
    conn = ciflow_db.connect()
    try:
        run = sync(ciflow_db, dv, "new_things", conn=conn, mode="incremental",
                   filter="ThingId le 3")
        notices = "".join(conn.notices)
    finally:
        conn.close()
    assert run["status"] == "succeeded" and "refuses a filter" in notices, notices
    assert ciflow_db.sql("SELECT count(*) FROM dv.new_things") == [(3,)]
    assert all("track-changes" not in (c["prefer"] or "") for c in page_calls(dataverse, "new_things"))


# ---------------------------------------------------------------------------
# Guards hold for these flavours too

def test_dataverse_paging_guards(ciflow_db, dv, dataverse):
    from extension.cihelpers import raises_sqlstate, session, table_md5
    sync(ciflow_db, dv, "new_things")
    md5 = table_md5(ciflow_db, "dv.new_things")
    with session(ciflow_db, {"ciflow.max_pages": 2}) as conn, conn.cursor() as cur:
        with raises_sqlstate("54000") as err:
            cur.execute("SELECT * FROM ciflow.sync('dv', 'new_things')")
    assert "ciflow.max_pages" in err.detail, err
    # A nextLink to another host is not followed (nor sent credentials).
    dataverse.add_fault({"path": "/new_things$", "nth": 1},
                        {"status": 200, "body": "raw", "headers": {"Content-Type": "application/json"},
                         "raw": json.dumps({"value": [thing(1)],
                                            "@odata.nextLink": "https://evil.example/x"})})
    with raises_sqlstate("42501") as err:
        sync(ciflow_db, dv, "new_things")
    assert "evil.example" in err.detail, err
    assert table_md5(ciflow_db, "dv.new_things") == md5


def test_dataverse_failed_delta_run_keeps_the_watermark(ciflow_db, dv, dataverse):
    from extension.cihelpers import raises_sqlstate
    first, _ = incremental(ciflow_db, dv)
    link = first["watermark"]["delta_link"]
    dataverse.control("POST", "entities/Thing/rows", {"mode": "upsert", "rows": [thing(2, "x")]})
    # A 500 on the delta link is not a refusal: retried, then the run fails.
    dataverse.add_fault({"path": "/new_things$", "query": "deltatoken"}, {"status": 500})
    with raises_sqlstate("08006"):
        incremental(ciflow_db, dv)
    dataverse.clear_faults()
    run, notices = incremental(ciflow_db, dv)
    assert (run["status"], run["updated"], notices) == ("succeeded", 1, ""), run
    # The failed run asked the stored link, and so did the next one.
    delta_calls = [c for c in page_calls(dataverse, "new_things") if "$deltatoken" in query_of(c)]
    statuses = [c["status"] for c in delta_calls]
    assert set(statuses[:-1]) == {500} and statuses[-1] == 200, statuses
    assert len({query_of(c)["$deltatoken"] for c in delta_calls}) == 1
    assert link.startswith(dataverse.root)
    assert ciflow_db.sql("SELECT name FROM dv.new_things WHERE thing_id = 2") == [("x",)]
