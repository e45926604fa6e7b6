"""A first sync writes every row once, into the table that becomes the target.

The pages go into a table under the hidden staging name that already has the
target's columns and comments; publish renames it and builds the primary key
once (issue 12: "as COPY into an empty table, then index").

* WAL of a first sync is at most one copy of the table (heap and key), and its
  rows are those the page transactions inserted, not copies made at publish
  (the former unlogged staging heap + INSERT ... SELECT wrote every row twice);
* the new table has no trace of its load: no extra or dropped columns, no
  reloptions (autovacuum back to its default), its comments and primary key;
* duplicate keys across pages keep the last version received, with the
  caller's WARNING;
* a first sync that fails, is cancelled, or whose name is taken meanwhile
  leaves no table (neither the target nor the hidden one) and a failed run;
* a worker killed mid-pull leaves the hidden table, which the next sync of the
  target sweeps;
* where a FOR ALL TABLES publication would see the hidden name, the target is
  created at publish as before (logical replication sees the target's name).
"""

import threading

import pytest

from harness import wait_for
from extension.cihelpers import primary_key_columns, raises_sqlstate, session, sync
from extension.test_resync_diff import ENTITY, PERSON, person
from extension.test_sync_interrupts import (SLOW_MATCH, SLOW_PAGE, kill_after_two_pages,
                                            sync_workers, two_pages_loaded)

TABLE = "emu.person"


def hidden_tables(db):
    return db.sql("SELECT relname, relpersistence FROM pg_class"
                  " WHERE relname LIKE 'ciflow\\_stage\\_%' ORDER BY 1")


def last_run(db):
    return db.sql("SELECT status, error, staging_relid FROM ciflow.sync_runs"
                  " ORDER BY id DESC LIMIT 1")[0]


def test_first_sync_writes_each_row_once(ciflow_db, make_connection, emulator):
    n = 5000
    emulator.set_entity("Bulk", {"entityType": "profile"},
                        generate={"schema": "customer", "rows": n, "seed": 5})
    make_connection("emu", emulator, page_size=1000)
    # Full-page images of the catalog pages the sync touches, whatever the
    # last checkpoint was: the figures do not depend on when it ran.
    ciflow_db.sql("CHECKPOINT")
    lsn0 = ciflow_db.sql("SELECT pg_current_wal_lsn()")[0][0]
    run = sync(ciflow_db, "emu", "Bulk")
    wal = ciflow_db.sql("SELECT pg_current_wal_lsn() - %s::pg_lsn", (lsn0,))[0][0]
    assert run["status"] == "succeeded" and run["inserted"] == n, run
    heap, total = ciflow_db.sql("SELECT pg_relation_size('emu.bulk'),"
                                " pg_total_relation_size('emu.bulk')")[0]
    print(f"first sync of {n} rows: {wal} bytes of WAL, heap {heap}, heap+index {total},"
          f" WAL/total {wal / total:.2f}")
    # One copy of the heap (multi-insert records) and one of the index reach
    # WAL, plus bookkeeping: 0.92 of the table here.  Staging unlogged and
    # copying with INSERT ... SELECT (a record per row) wrote 1.10.
    assert wal < 1.0 * total, f"{wal} bytes of WAL for a {total}-byte table"

    # The rows are those the page transactions inserted (one xmin per page),
    # not copies made by the publish (one xmin for all).
    pages = ciflow_db.sql("SELECT pages FROM ciflow.sync_runs ORDER BY id DESC LIMIT 1")[0][0]
    xmins = ciflow_db.sql("SELECT count(DISTINCT xmin::text) FROM emu.bulk")[0][0]
    assert pages > 2 and xmins >= pages - 1, (xmins, pages)  # the last page may be empty


def test_new_table_has_no_trace_of_its_load(ciflow_db, ci_connection, emulator):
    emulator.set_entity(ENTITY, PERSON, rows=[person(i) for i in range(20)])
    run = sync(ciflow_db, "emu", ENTITY)
    assert run["status"] == "succeeded" and run["inserted"] == 20, run
    relid = ciflow_db.sql("SELECT %s::regclass::oid", (TABLE,))[0][0]
    assert ciflow_db.sql("SELECT relpersistence, reloptions FROM pg_class WHERE oid = %s",
                         (relid,)) == [("p", None)]
    attrs = ciflow_db.sql("SELECT attname, attisdropped, col_description(attrelid, attnum)"
                          " FROM pg_attribute WHERE attrelid = %s AND attnum > 0"
                          " ORDER BY attnum", (relid,))
    assert attrs == [("person_id", False, "PersonId"), ("full_name", False, "FullName"),
                     ("score", False, "Score"), ("note", False, "Note")], attrs
    assert primary_key_columns(ciflow_db, "emu", "person") == ["person_id"]
    assert ciflow_db.sql("SELECT conname FROM pg_constraint WHERE conrelid = %s"
                         " AND contype = 'p'", (relid,)) == [("person_pkey",)]
    assert ciflow_db.sql(f"SELECT count(*), count(DISTINCT person_id) FROM {TABLE}") == [(20, 20)]
    assert hidden_tables(ciflow_db) == []
    assert last_run(ciflow_db)[0] == "succeeded" and last_run(ciflow_db)[2] is None
    # The table is the target from now on: a re-sync of the same data changes nothing.
    run = sync(ciflow_db, "emu", ENTITY)
    assert (run["inserted"], run["updated"], run["deleted"]) == (0, 0, 0)
    assert ciflow_db.sql("SELECT %s::regclass::oid", (TABLE,))[0][0] == relid


def test_duplicates_across_pages_keep_the_last_version(ciflow_db, make_connection, emulator):
    rows = [person(i) for i in range(30)]
    rows[14] = person(3, score=300)      # p003 again on page 2
    rows[27] = person(3, score=3000)     # ... and on page 3: the last wins
    rows[25] = person(10, note="late")   # p010 again on page 3
    emulator.set_entity(ENTITY, PERSON, rows=rows)
    make_connection("emu", emulator, page_size=10)
    conn = ciflow_db.connect()
    try:
        run = sync(ciflow_db, "emu", ENTITY, conn=conn)
        warnings = [n for n in conn.notices if n.startswith("WARNING")]
    finally:
        conn.close()
    assert run["status"] == "succeeded" and run["rows"] == 30 and run["inserted"] == 27, run
    assert any('delivered 3 duplicate rows; the last version of each key was kept' in w
               for w in warnings), warnings
    assert ciflow_db.sql(f"SELECT score, note FROM {TABLE} WHERE person_id = 'p003'") == \
        [(3000, "n")]
    assert ciflow_db.sql(f"SELECT note FROM {TABLE} WHERE person_id = 'p010'") == [("late",)]
    assert ciflow_db.sql(f"SELECT count(*), count(DISTINCT person_id) FROM {TABLE}") == [(27, 27)]
    assert primary_key_columns(ciflow_db, "emu", "person") == ["person_id"]
    assert hidden_tables(ciflow_db) == []


def assert_nothing_left(db, table="person"):
    assert db.sql("SELECT to_regclass(%s)", (f"emu.{table}",)) == [(None,)]
    assert hidden_tables(db) == []
    status, error, staging = last_run(db)
    assert status == "failed" and staging is None, (status, error)
    return error


def test_failed_first_sync_leaves_no_table(ciflow_db, make_connection, emulator):
    emulator.set_entity(ENTITY, PERSON, rows=[person(i) for i in range(30)])
    make_connection("emu", emulator, page_size=10)
    emulator.add_fault({"method": "GET", "path": f"/data/{ENTITY}$",
                        "query": r"(\$|%24)skip=20(&|$)", "every": 1},
                       {"status": 500, "body": "apierror"})
    with raises_sqlstate("08006"):
        sync(ciflow_db, "emu", ENTITY)
    assert_nothing_left(ciflow_db)
    # The next run creates the table afresh.
    emulator.clear_faults()
    assert sync(ciflow_db, "emu", ENTITY)["inserted"] == 30


def test_cancelled_first_sync_leaves_no_table(ciflow_db, ci_connection, emulator):
    emulator.add_fault(SLOW_MATCH, SLOW_PAGE)
    with session(ciflow_db, {"statement_timeout": "1500ms"}) as conn, conn.cursor() as cur:
        with raises_sqlstate("57014"):
            cur.execute("SELECT * FROM ciflow.sync('emu', 'Customer')")
    wait_for(lambda: not sync_workers(ciflow_db), timeout=10, what="the worker to exit")
    assert "cancel" in assert_nothing_left(ciflow_db, "customer")


def test_target_created_meanwhile_is_refused_and_kept(ciflow_db, ci_connection, emulator):
    with two_pages_loaded(ciflow_db, emulator, 2000) as result:
        ciflow_db.sql("CREATE TABLE emu.customer (mine int)")
        ciflow_db.sql("INSERT INTO emu.customer VALUES (1)")
    err = result[0]
    assert getattr(err, "pgcode", None) == "42P07", err
    assert "was created while the sync ran" in str(err)
    assert ciflow_db.sql("SELECT * FROM emu.customer") == [(1,)]
    assert hidden_tables(ciflow_db) == []
    assert last_run(ciflow_db)[0] == "failed"


def test_killed_first_sync_leaves_the_hidden_table_to_the_next_run(private_ciflow, emulator):
    pg = private_ciflow
    kill_after_two_pages(pg, emulator, "SELECT * FROM ciflow.sync('emu', 'Customer',"
                                       " target => 'emu.fresh')")

    # A logged hidden table survives the crash with the pages whose commit
    # reached the disk (page transactions may commit asynchronously); no target.
    assert pg.sql("SELECT status FROM ciflow.sync_runs ORDER BY id") == [("succeeded",),
                                                                      ("running",)]
    hidden = hidden_tables(pg)
    assert [h[1] for h in hidden] == ["p"], hidden
    assert pg.sql(f"SELECT count(*) FROM emu.{hidden[0][0]}")[0][0] <= 200
    assert pg.sql("SELECT to_regclass('emu.fresh')") == [(None,)]

    emulator.clear_faults()
    run = dict(zip(("status", "rows", "inserted"), pg.sql(
        "SELECT status, rows, inserted FROM ciflow.sync('emu', 'Customer', target => 'emu.fresh')")[0]))
    assert run == {"status": "succeeded", "rows": 250, "inserted": 250}, run
    statuses = pg.sql("SELECT status, error FROM ciflow.sync_runs ORDER BY id")
    assert statuses[1][0] == "failed" and "interrupted" in statuses[1][1], statuses
    assert hidden_tables(pg) == []
    assert pg.sql("SELECT count(*) FROM emu.fresh") == [(250,)]


@pytest.fixture
def all_tables_publication(ciflow_db):
    ciflow_db.sql("CREATE PUBLICATION ciflow_test_all FOR ALL TABLES")
    yield
    ciflow_db.sql("DROP PUBLICATION ciflow_test_all")


def test_first_sync_under_a_publication_of_every_table(ciflow_db, ci_connection, emulator,
                                                       all_tables_publication):
    """A FOR ALL TABLES publication would send the pages as rows of the hidden
    name: the target is then created at publish, and the staging heap is
    unlogged (never published)."""
    rows = [person(i) for i in range(20)] + [person(4, score=44)]
    emulator.set_entity(ENTITY, PERSON, rows=rows)
    emulator.add_fault({"method": "GET", "path": f"/data/{ENTITY}$"}, {"delay_ms": 1500})
    result = []
    thread = threading.Thread(target=lambda: result.append(sync(ciflow_db, "emu", ENTITY)))
    thread.start()
    try:
        wait_for(lambda: hidden_tables(ciflow_db), timeout=15, what="the staging heap")
        assert [h[1] for h in hidden_tables(ciflow_db)] == ["u"]
    finally:
        thread.join(30)
    assert result and result[0]["inserted"] == 20, result
    assert ciflow_db.sql(f"SELECT score FROM {TABLE} WHERE person_id = 'p004'") == [(44,)]
    assert primary_key_columns(ciflow_db, "emu", "person") == ["person_id"]
    assert ciflow_db.sql("SELECT col_description(%s::regclass, 1)", (TABLE,)) == [("PersonId",)]
    assert hidden_tables(ciflow_db) == []


def test_statistics_are_autovacuums_unless_asked_for(ciflow_db, make_connection, emulator):
    """As after COPY, a sync leaves ANALYZE to autovacuum; ciflow.analyze_after_sync runs it."""
    emulator.set_entity("Stats", {"entityType": "profile"},
                        generate={"schema": "customer", "rows": 300, "seed": 3})
    make_connection("emu", emulator, page_size=100)

    def analyzed(table):
        ciflow_db.sql("SELECT pg_stat_clear_snapshot()")
        return ciflow_db.sql("SELECT count(*) FROM pg_stats WHERE schemaname = 'emu'"
                             " AND tablename = %s", (table,))[0][0] > 0

    sync(ciflow_db, "emu", "Stats")
    assert not analyzed("stats")
    with session(ciflow_db, {"ciflow.analyze_after_sync": "on"}) as conn:
        sync(ciflow_db, "emu", "Stats", target="emu.stats_analyzed", conn=conn)
    assert analyzed("stats_analyzed")
    # ANALYZE's count replaces the publish's, never adds to it.
    assert ciflow_db.sql("SELECT reltuples FROM pg_class WHERE oid = 'emu.stats_analyzed'"
                         "::regclass")[0][0] == 300


def test_repeatable_read_snapshot_taken_mid_load_sees_no_partial_table(ciflow_db, ci_connection,
                                                                       emulator):
    """A snapshot taken after two pages committed, read after the publish: the
    new table whole (or nothing), never the two pages that came before it."""
    total = emulator.stats("Customer")["row_count"]
    reader = ciflow_db.connect()
    try:
        with two_pages_loaded(ciflow_db, emulator, 2000) as result:
            with reader.cursor() as cur:
                cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
                cur.execute("SELECT pg_catalog.count(*) FROM pg_catalog.pg_class")  # the snapshot
        assert isinstance(result[0], dict), result
        with reader.cursor() as cur:
            cur.execute("SELECT pg_catalog.count(*) FROM emu.customer")
            seen = cur.fetchone()[0]
            cur.execute("COMMIT")
    finally:
        reader.close()
    assert seen in (0, total), f"a snapshot from mid-load saw {seen} of {total} rows"
    # The frozen rows and their visibility map are what PostgreSQL's own checks expect.
    ciflow_db.sql("CREATE EXTENSION IF NOT EXISTS amcheck")
    ciflow_db.sql("CREATE EXTENSION IF NOT EXISTS pg_visibility")
    assert ciflow_db.sql("SELECT * FROM verify_heapam('emu.customer')") == []
    assert ciflow_db.sql("SELECT * FROM pg_check_frozen('emu.customer')") == []
    assert ciflow_db.sql("SELECT * FROM pg_check_visible('emu.customer')") == []
    ciflow_db.sql("SELECT bt_index_check('emu.customer_pkey', true)")
    ciflow_db.sql("VACUUM emu.customer")
    assert ciflow_db.sql("SELECT count(*) FROM emu.customer") == [(total,)]


def test_terminated_worker_leaves_no_table_and_the_next_sync_succeeds(ciflow_db, ci_connection,
                                                                      emulator):
    """pg_terminate_backend of the sync worker itself, mid-load (a FATAL, not an
    ERROR): the caller gets an error, and nothing is left that a later sync
    trips over; the next first sync builds the whole table."""
    total = emulator.stats("Customer")["row_count"]
    with two_pages_loaded(ciflow_db, emulator, 3000) as result:
        (pid,), = sync_workers(ciflow_db)
        ciflow_db.sql("SELECT pg_terminate_backend(%s)", (pid,))
    assert isinstance(result[0], Exception), result
    wait_for(lambda: not sync_workers(ciflow_db), timeout=10, what="the worker to exit")
    assert ciflow_db.sql("SELECT to_regclass('emu.customer')") == [(None,)]
    emulator.clear_faults()
    run = sync(ciflow_db, "emu", "Customer")
    assert run["status"] == "succeeded" and run["inserted"] == total, run
    assert hidden_tables(ciflow_db) == []
    statuses = ciflow_db.sql("SELECT status FROM ciflow.sync_runs WHERE target = 'emu.customer'"
                             " ORDER BY id DESC LIMIT 2")
    assert statuses == [("succeeded",), ("failed",)], statuses
