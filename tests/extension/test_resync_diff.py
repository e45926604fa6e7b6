"""Re-sync as the difference (issue 7, sql-api.md section 3).

A re-sync is one ordinary transaction of INSERTs, UPDATEs and DELETEs:

* the emulator mutates, deletes and adds rows; the run reports exactly
  that many inserted/updated/deleted, and the table equals the emulator's;
* a re-sync where nothing changed writes no row (n_tup_* unchanged, every
  row keeps its xmin) and a small fraction of the table's size in WAL;
* row triggers see exactly the changed rows; foreign keys with CASCADE
  cascade, with NO ACTION fail the sync cleanly (target unchanged);
* a REPEATABLE READ snapshot taken before a re-sync keeps every old row,
  and a reader with lock_timeout = 200ms never times out during one;
* duplicates in a pull with a composite key: last version wins per full key;
* n_live_tup is the row count after a first sync (not doubled);
* errors of the apply show no statement of ciflow's.

Assertions are on data, counts and states, never on timing.
"""

import threading

import psycopg2
import pytest

from extension.cihelpers import (assert_table_matches_emulator, raises_sqlstate, run_row,
                                 session, sync, table_md5)

ENTITY = "Person"
TABLE = "emu.person"
PERSON = {"entityType": "profile",
          "attributes": [{"name": "PersonId", "dataType": "Edm.String"},
                         {"name": "FullName", "dataType": "Edm.String"},
                         {"name": "Score", "dataType": "Edm.Int32"},
                         {"name": "Note", "dataType": "Edm.String"}],
          "keys": [["PersonId"]]}


def person(i, score=None, note="n"):
    return {"PersonId": f"p{i:03d}", "FullName": f"Person {i}",
            "Score": i if score is None else score, "Note": note}


def upsert(emu, rows, entity=ENTITY):
    emu.control("POST", f"entities/{entity}/rows", {"mode": "upsert", "rows": rows})


def delete(emu, key, entity=ENTITY):
    emu.control("DELETE", f"entities/{entity}/rows/{key}")


def staging_tables(db):
    return db.sql("SELECT relname FROM pg_class WHERE relname LIKE 'ciflow\\_stage\\_%'")


def table_stats(db, table=TABLE):
    conn = db.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_stat_clear_snapshot()")
            cur.execute("SELECT n_tup_ins, n_tup_upd, n_tup_del, n_live_tup"
                        " FROM pg_stat_user_tables WHERE relid = %s::regclass", (table,))
            return cur.fetchone()
    finally:
        conn.close()


@pytest.fixture
def people(ciflow_db, ci_connection, emulator):
    """20 people synced into emu.person."""
    emulator.set_entity(ENTITY, PERSON, rows=[person(i) for i in range(20)])
    run = sync(ciflow_db, "emu", ENTITY)
    assert (run["inserted"], run["updated"], run["deleted"]) == (20, 0, 0)
    return run


def mutate(emu):
    """2 changed (one to NULL), 3 deleted, 4 added."""
    upsert(emu, [person(1, score=100), dict(person(2), Note=None)])
    for i in (5, 6, 7):
        delete(emu, f"p{i:03d}")
    upsert(emu, [person(i) for i in range(20, 24)])


def test_resync_applies_exactly_the_difference(ciflow_db, emulator, people):
    mutate(emulator)
    run = sync(ciflow_db, "emu", ENTITY)
    assert run["status"] == "succeeded"
    assert (run["inserted"], run["updated"], run["deleted"], run["rows"]) == (4, 2, 3, 21)
    assert run_row(ciflow_db, run["id"])["updated"] == 2
    assert_table_matches_emulator(ciflow_db, TABLE, emulator, ENTITY)
    assert staging_tables(ciflow_db) == []


def test_no_change_resync_writes_no_row(ciflow_db, make_connection, emulator):
    emulator.set_entity("Bulk", {"entityType": "profile"},
                        generate={"schema": "customer", "rows": 5000, "seed": 3})
    make_connection("emu", emulator, page_size=1000)
    sync(ciflow_db, "emu", "Bulk")
    before_rows = ciflow_db.sql("SELECT customer_id, xmin::text, ctid::text FROM emu.bulk"
                                " ORDER BY 1")
    before_stats = table_stats(ciflow_db, "emu.bulk")
    size = ciflow_db.sql("SELECT pg_total_relation_size('emu.bulk')")[0][0]
    lsn0 = ciflow_db.sql("SELECT pg_current_wal_lsn()")[0][0]
    run = sync(ciflow_db, "emu", "Bulk")
    wal = ciflow_db.sql("SELECT pg_current_wal_lsn() - %s::pg_lsn", (lsn0,))[0][0]
    assert (run["inserted"], run["updated"], run["deleted"], run["rows"]) == (0, 0, 0, 5000)
    after_stats = table_stats(ciflow_db, "emu.bulk")
    assert after_stats[:3] == before_stats[:3], (before_stats, after_stats)
    assert ciflow_db.sql("SELECT customer_id, xmin::text, ctid::text FROM emu.bulk"
                         " ORDER BY 1") == before_rows
    # The staging heap is unlogged: only catalog and run bookkeeping reach WAL.
    assert wal < size / 10, f"{wal} bytes of WAL for a {size}-byte table"


def test_first_sync_counts_live_rows_once(ciflow_db, people):
    assert table_stats(ciflow_db)[3] == 20


def test_row_triggers_see_exactly_the_changed_rows(ciflow_db, emulator, people):
    ciflow_db.sql("CREATE TABLE public.audit (op text, key text)")
    ciflow_db.sql("""CREATE FUNCTION public.audit_person() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO public.audit VALUES (TG_OP, CASE TG_OP WHEN 'DELETE' THEN OLD.person_id
                                                              ELSE NEW.person_id END);
            RETURN NULL;
        END $$""")
    ciflow_db.sql(f"CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON {TABLE}"
                  " FOR EACH ROW EXECUTE FUNCTION public.audit_person()")
    try:
        mutate(emulator)
        sync(ciflow_db, "emu", ENTITY)
        assert sorted(ciflow_db.sql("SELECT op, key FROM public.audit")) == sorted(
            [("UPDATE", "p001"), ("UPDATE", "p002"), ("DELETE", "p005"), ("DELETE", "p006"),
             ("DELETE", "p007"), ("INSERT", "p020"), ("INSERT", "p021"), ("INSERT", "p022"),
             ("INSERT", "p023")])
    finally:
        ciflow_db.sql(f"DROP TABLE IF EXISTS public.audit; DROP TRIGGER IF EXISTS audit ON {TABLE};"
                      " DROP FUNCTION IF EXISTS public.audit_person()")


def make_child(db, on_delete):
    db.sql(f"CREATE TABLE public.child (id int PRIMARY KEY, person_id text"
           f" REFERENCES {TABLE} ON DELETE {on_delete})")
    db.sql("INSERT INTO public.child VALUES (1, 'p005'), (2, 'p006'), (3, 'p010')")


def test_foreign_key_cascade_is_cascaded(ciflow_db, emulator, people):
    make_child(ciflow_db, "CASCADE")
    try:
        mutate(emulator)
        assert sync(ciflow_db, "emu", ENTITY)["deleted"] == 3
        assert ciflow_db.sql("SELECT id FROM public.child") == [(3,)]
    finally:
        ciflow_db.sql("DROP TABLE IF EXISTS public.child")


def test_foreign_key_no_action_fails_cleanly(ciflow_db, emulator, people):
    make_child(ciflow_db, "NO ACTION")
    try:
        before = table_md5(ciflow_db, TABLE)
        mutate(emulator)
        with raises_sqlstate("23503") as err:
            sync(ciflow_db, "emu", ENTITY)
        assert "child" in err.detail and "publishing" in err.detail, err
        # ciflow's own statement never shows, neither in DETAIL nor in CONTEXT.
        assert "EXCEPT" not in (err.detail or "") + (err.context or ""), err
        assert table_md5(ciflow_db, TABLE) == before
        assert ciflow_db.sql("SELECT count(*) FROM public.child") == [(3,)]
        last = ciflow_db.sql("SELECT status, error FROM ciflow.sync_runs ORDER BY id DESC LIMIT 1")
        assert last[0][0] == "failed" and "child" in last[0][1]
        assert staging_tables(ciflow_db) == []
    finally:
        ciflow_db.sql("DROP TABLE IF EXISTS public.child")


def test_repeatable_read_snapshot_keeps_every_old_row(ciflow_db, emulator, people):
    reader = ciflow_db.connect(autocommit=False)
    try:
        with reader.cursor() as cur:
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            cur.execute(f"SELECT person_id, score, note FROM {TABLE} ORDER BY 1")
            old = cur.fetchall()
            mutate(emulator)
            sync(ciflow_db, "emu", ENTITY)
            cur.execute(f"SELECT person_id, score, note FROM {TABLE} ORDER BY 1")
            assert cur.fetchall() == old
        reader.rollback()
        with reader.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {TABLE}")
            assert cur.fetchone() == (21,)
    finally:
        reader.close()


def test_reader_with_lock_timeout_never_times_out(ciflow_db, emulator, people):
    mutate(emulator)
    emulator.add_fault({"method": "GET", "path": "/data/Person$", "every": 1}, {"delay_ms": 300})
    errors, counts, done = [], [], threading.Event()

    def read():
        with session(ciflow_db, {"lock_timeout": "200ms"}) as conn, conn.cursor() as cur:
            while not done.is_set():
                try:
                    cur.execute(f"SELECT count(*) FROM {TABLE}")
                    counts.append(cur.fetchone()[0])
                except psycopg2.Error as exc:
                    errors.append(exc)
    thread = threading.Thread(target=read)
    thread.start()
    try:
        run = sync(ciflow_db, "emu", ENTITY)
    finally:
        done.set()
        thread.join()
    assert run["status"] == "succeeded"
    assert not errors, errors[:3]
    assert counts and set(counts) <= {20, 21}, set(counts)


ORDER_LINE = {"entityType": "activity",
              "attributes": [{"name": "OrderId", "dataType": "Edm.String"},
                             {"name": "LineNo", "dataType": "Edm.Int32"},
                             {"name": "Qty", "dataType": "Edm.Int32"}],
              "keys": [["OrderId", "LineNo"]]}


def test_composite_key_duplicates_keep_last_version(ciflow_db, ci_connection, emulator):
    rows = [{"OrderId": "o1", "LineNo": 1, "Qty": 1}, {"OrderId": "o1", "LineNo": 2, "Qty": 2},
            {"OrderId": "o2", "LineNo": 1, "Qty": 3}, {"OrderId": "o1", "LineNo": 1, "Qty": 10},
            {"OrderId": "o2", "LineNo": 2, "Qty": 4}, {"OrderId": "o2", "LineNo": 1, "Qty": 30},
            {"OrderId": "o1", "LineNo": 1, "Qty": 100}]
    emulator.set_entity("OrderLine", ORDER_LINE, rows=rows)
    run = sync(ciflow_db, "emu", "OrderLine")
    assert run["rows"] == 7 and run["inserted"] == 4
    expected = [("o1", 1, 100), ("o1", 2, 2), ("o2", 1, 30), ("o2", 2, 4)]
    assert ciflow_db.sql("SELECT order_id, line_no, qty FROM emu.order_line ORDER BY 1, 2") == \
        expected
    # A re-sync of the same pull changes nothing: the duplicates are dropped first.
    run = sync(ciflow_db, "emu", "OrderLine")
    assert (run["inserted"], run["updated"], run["deleted"]) == (0, 0, 0)
    emulator.set_entity("OrderLine", ORDER_LINE, rows=rows[:3] + [
        {"OrderId": "o1", "LineNo": 2, "Qty": 20}, {"OrderId": "o3", "LineNo": 1, "Qty": 5}])
    run = sync(ciflow_db, "emu", "OrderLine")
    assert (run["inserted"], run["updated"], run["deleted"]) == (1, 3, 1)
    assert ciflow_db.sql("SELECT order_id, line_no, qty FROM emu.order_line ORDER BY 1, 2") == \
        [("o1", 1, 1), ("o1", 2, 20), ("o2", 1, 3), ("o3", 1, 5)]


def test_duplicates_warn_the_caller(ciflow_db, ci_connection, emulator):
    emulator.set_entity("OrderLine", ORDER_LINE, rows=[
        {"OrderId": "o1", "LineNo": 1, "Qty": 1}, {"OrderId": "o1", "LineNo": 1, "Qty": 2}])
    conn = ciflow_db.connect()
    try:
        sync(ciflow_db, "emu", "OrderLine", conn=conn)
        assert any("1 duplicate rows" in n for n in conn.notices), conn.notices
    finally:
        conn.close()


def test_lock_wait_is_bounded_and_reported(ciflow_db, pg_cluster, emulator, people):
    """A session holding a lock the apply needs: the wait ends at lock_timeout
    (here the database's setting) with 55P03 and a HINT; the target is unchanged."""
    before = table_md5(ciflow_db, TABLE)
    mutate(emulator)
    ciflow_db.sql(f"ALTER DATABASE {ciflow_db.name} SET lock_timeout = '300ms'")
    holder = ciflow_db.connect(autocommit=False)
    try:
        with holder.cursor() as cur:
            cur.execute(f"LOCK TABLE {TABLE} IN SHARE MODE")
        with raises_sqlstate("55P03") as err:
            sync(ciflow_db, "emu", ENTITY)
        assert err.hint and "lock_timeout" in err.hint and "publishing" in err.detail, err
    finally:
        holder.rollback()
        holder.close()
        ciflow_db.sql(f"ALTER DATABASE {ciflow_db.name} RESET lock_timeout")
    assert table_md5(ciflow_db, TABLE) == before
    assert staging_tables(ciflow_db) == []


def test_fields_limit_what_a_resync_writes(ciflow_db, emulator, people):
    upsert(emulator, [person(1, score=500, note="changed"), person(2, note="changed too")])
    run = sync(ciflow_db, "emu", ENTITY, fields="PersonId, Score")
    assert (run["inserted"], run["updated"], run["deleted"]) == (0, 1, 0)
    assert ciflow_db.sql(f"SELECT person_id, score, note FROM {TABLE}"
                         " WHERE person_id IN ('p001', 'p002') ORDER BY 1") == \
        [("p001", 500, "n"), ("p002", 2, "n")]
