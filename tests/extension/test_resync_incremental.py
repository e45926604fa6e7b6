"""mode => 'incremental' (issue 7 item 7; sql-api.md section 3, E2, E4 rule 6).

* A system entity with an incrementalAttribute: the first run pulls all
  and stores {"attribute", "value"} (the largest value pulled); the next
  asks $filter=<attr> ge <value>, upserts (no deletes), advances the
  watermark; a failed run never advances it.
* A source entity: nothing fetched (0 pages, succeeded) while refreshTime
  is unchanged; a changed refreshTime means a full pull, deletes included.
* No incrementalAttribute: a full pull every time.
* The emulator refuses $filter on source entities (400).
* History and watermarks survive pg_dump/pg_restore.
"""

import os
import subprocess

import pytest

from extension.cihelpers import (data_requests, last_seq, query_of, raises_sqlstate, sync)

EVENTS = {"entityType": "activity", "dataSourceName": None,
          "attributes": [{"name": "EventId", "dataType": "Edm.String"},
                         {"name": "Kind", "dataType": "Edm.String"},
                         {"name": "ModifiedOn", "dataType": "Edm.DateTimeOffset"}],
          "keys": [["EventId"]], "incrementalAttribute": "ModifiedOn"}


def event(i, day, kind="a"):
    return {"EventId": f"e{i}", "Kind": kind, "ModifiedOn": f"2025-03-{day:02d}T10:00:00.1234567Z"}


def watermark(db, run_id):
    return db.sql("SELECT watermark FROM ciflow.sync_runs WHERE id = %s", (run_id,))[0][0]


@pytest.fixture
def events(ci_connection, emulator):
    emulator.set_entity("Events", EVENTS, rows=[event(i, 1 + i) for i in range(5)])
    return emulator


def test_system_entity_filters_on_the_watermark(ciflow_db, events):
    first = sync(ciflow_db, "emu", "Events", mode="incremental")
    assert first["inserted"] == 5
    wm = watermark(ciflow_db, first["id"])
    assert wm["attribute"] == "ModifiedOn" and wm["value"] == "2025-03-05T10:00:00.123456Z", wm

    events.control("POST", "entities/Events/rows", {"mode": "upsert", "rows": [
        event(4, 5, kind="b"), event(2, 9, kind="c"), event(7, 8)]})
    events.control("DELETE", "entities/Events/rows/e0")
    seq = last_seq(events)
    run = sync(ciflow_db, "emu", "Events", mode="incremental")
    filters = {query_of(c).get("$filter") for c in data_requests(events, "Events", seq)}
    assert filters == {"ModifiedOn ge 2025-03-05T10:00:00.123456Z"}, filters
    # ge re-reads e4 (same instant, changed), e2 and e7; e0's deletion is not seen.
    assert (run["rows"], run["inserted"], run["updated"], run["deleted"]) == (3, 1, 2, 0)
    assert ciflow_db.sql("SELECT event_id, kind FROM emu.events ORDER BY 1") == [
        ("e0", "a"), ("e1", "a"), ("e2", "c"), ("e3", "a"), ("e4", "b"), ("e7", "a")]
    assert watermark(ciflow_db, run["id"])["value"] == "2025-03-09T10:00:00.123456Z"

    # A failed run leaves the watermark where it was.
    events.add_fault({"method": "GET", "path": "/data/Events$", "every": 1},
                     {"status": 400, "body": "odata"})
    with raises_sqlstate("22023"):
        sync(ciflow_db, "emu", "Events", mode="incremental")
    events.clear_faults()
    seq = last_seq(events)
    sync(ciflow_db, "emu", "Events", mode="incremental")
    filters = {query_of(c).get("$filter") for c in data_requests(events, "Events", seq)}
    assert filters == {"ModifiedOn ge 2025-03-09T10:00:00.123456Z"}, filters


def test_user_filter_is_combined(ciflow_db, events):
    sync(ciflow_db, "emu", "Events", mode="incremental", filter="Kind eq 'a'")
    seq = last_seq(events)
    sync(ciflow_db, "emu", "Events", mode="incremental", filter="Kind eq 'a'")
    filters = {query_of(c).get("$filter") for c in data_requests(events, "Events", seq)}
    assert filters == {"(Kind eq 'a') and ModifiedOn ge 2025-03-05T10:00:00.123456Z"}, filters


SOURCE = {"entityType": "activity", "dataSourceName": "Shop",
          "attributes": [{"name": "SaleId", "dataType": "Edm.String"},
                         {"name": "Amount", "dataType": "Edm.Int32"}],
          "keys": [["SaleId"]]}


def test_source_entity_skipped_while_refresh_time_is_unchanged(ciflow_db, ci_connection,
                                                               emulator):
    emulator.set_entity("Shop_Sales", SOURCE, rows=[{"SaleId": f"s{i}", "Amount": i}
                                                    for i in range(4)])
    first = sync(ciflow_db, "emu", "Shop_Sales", mode="incremental")
    assert first["inserted"] == 4 and watermark(ciflow_db, first["id"])["refresh_time"]
    seq = last_seq(emulator)
    skipped = sync(ciflow_db, "emu", "Shop_Sales", mode="incremental")
    assert (skipped["status"], skipped["pages"], skipped["rows"]) == ("succeeded", 0, 0)
    assert data_requests(emulator, "Shop_Sales", seq) == []
    # Control-made changes move refreshTime: a full pull, deletions included.
    emulator.control("POST", "entities/Shop_Sales/rows", {"mode": "replace", "rows": [
        {"SaleId": f"s{i}", "Amount": i} for i in range(1, 4)]})
    run = sync(ciflow_db, "emu", "Shop_Sales", mode="incremental")
    assert (run["deleted"], run["rows"]) == (1, 3)
    filters = [query_of(c).get("$filter") for c in data_requests(emulator, "Shop_Sales", seq)]
    assert set(filters) == {None}


def test_emulator_refuses_filter_on_source_entities(ciflow_db, ci_connection, emulator):
    emulator.set_entity("Shop_Sales", SOURCE, rows=[{"SaleId": "s1", "Amount": 1}])
    with raises_sqlstate("22023") as err:
        sync(ciflow_db, "emu", "Shop_Sales", filter="Amount gt 0")
    assert "HTTP status 400" in err.detail


def test_no_incremental_attribute_means_full_pulls(ciflow_db, ci_connection, emulator):
    plain = dict(EVENTS, incrementalAttribute=None)
    emulator.set_entity("Plain", plain, rows=[event(i, 1 + i) for i in range(3)])
    sync(ciflow_db, "emu", "Plain", mode="incremental")
    emulator.control("DELETE", "entities/Plain/rows/e1")
    run = sync(ciflow_db, "emu", "Plain", mode="incremental")
    assert (run["status"], run["deleted"]) == ("succeeded", 1)


def test_history_and_watermarks_survive_dump_and_restore(ciflow_db, pg_cluster, events):
    first = sync(ciflow_db, "emu", "Events", mode="incremental")
    dump = os.path.join(pg_cluster.basedir, "runs.dump")
    restored = ciflow_db.name + "_restored"
    env = pg_cluster.psql_env(dbname=ciflow_db.name)
    subprocess.run([os.path.join(pg_cluster.bindir, "pg_dump"), "-Fc", "-f", dump,
                    ciflow_db.name], env=env, check=True, capture_output=True)
    pg_cluster.drop_database(restored)
    pg_cluster.create_database(restored, template="template0")
    try:
        subprocess.run([os.path.join(pg_cluster.bindir, "pg_restore"), "-d", restored, dump],
                       env=env, check=True, capture_output=True)
        query = "SELECT id, target, status, watermark FROM ciflow.sync_runs ORDER BY id"
        assert pg_cluster.sql(query, dbname=restored) == ciflow_db.sql(query)
        assert pg_cluster.sql("SELECT watermark FROM ciflow.sync_runs WHERE id = %s",
                              (first["id"],), dbname=restored) == [(watermark(ciflow_db, first["id"]),)]
        assert pg_cluster.sql("SELECT count(*) FROM emu.events", dbname=restored) == [(5,)]
    finally:
        pg_cluster.drop_database(restored)
