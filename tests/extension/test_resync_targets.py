"""The target's rules (issue 7 items 5, 6 and 8; sql-api.md section 3).

* User-created targets: plain (columns in another order, columns of the
  user's own with defaults, a generated column, a CHECK) and partitioned
  (HASH, RANGE) tables are filled and kept; user columns get their default
  on inserted rows and keep their values on updated ones; a CHECK violation
  fails the sync with the constraint's error and leaves the target as it was.
* A missing attribute column is added, an incompatible one refused with a
  HINT, both before any page is fetched; a dropped attribute's column stays,
  filled with NULL.
* Never in ciflow, pg_catalog, information_schema or a pg_ schema; a
  non-empty table no run has filled needs adopt => true; a role without
  CREATE on the database or the schema fails with 42501 and the GRANT.
* Concurrent first syncs into one new schema all succeed.
* publish => 'swap' works where it is safe and is refused with a HINT where
  it would break something.
"""

import threading

import psycopg2
import pytest

from extension.cihelpers import (data_requests, last_seq, qident, raises_sqlstate, sync,
                                 table_md5)
from extension.test_resync_diff import ENTITY, PERSON, delete, person, upsert


@pytest.fixture
def persons(ciflow_db, ci_connection, emulator):
    emulator.set_entity(ENTITY, PERSON, rows=[person(i) for i in range(10)])
    ciflow_db.sql("CREATE SCHEMA IF NOT EXISTS crm")
    yield emulator
    ciflow_db.sql("DROP SCHEMA IF EXISTS crm CASCADE")


def no_data_call_since(emu, seq):
    assert data_requests(emu, ENTITY, seq) == [], "a page was fetched"


def test_user_table_with_own_columns_is_filled_and_kept(ciflow_db, persons):
    ciflow_db.sql("""CREATE TABLE crm.people (
        note text, local_flag text NOT NULL DEFAULT 'new',
        score integer CHECK (score >= 0), person_id text PRIMARY KEY,
        doubled integer GENERATED ALWAYS AS (score * 2) STORED, full_name text)""")
    run = sync(ciflow_db, "emu", ENTITY, target="crm.people")
    assert run["inserted"] == 10
    ciflow_db.sql("UPDATE crm.people SET local_flag = 'mine' WHERE person_id IN ('p001', 'p002')")
    upsert(persons, [person(1, score=50), person(11)])
    run = sync(ciflow_db, "emu", ENTITY, target="crm.people")
    assert (run["inserted"], run["updated"], run["deleted"]) == (1, 1, 0)
    rows = dict((r[0], r[1:]) for r in ciflow_db.sql(
        "SELECT person_id, local_flag, score, doubled FROM crm.people"))
    assert rows["p001"] == ("mine", 50, 100)     # updated: own column kept
    assert rows["p002"] == ("mine", 2, 4)
    assert rows["p011"] == ("new", 11, 22)       # inserted: own column's default

    before = table_md5(ciflow_db, "crm.people")
    upsert(persons, [person(3, score=-1)])
    with raises_sqlstate("23514") as err:
        sync(ciflow_db, "emu", ENTITY, target="crm.people")
    assert "people_score_check" in err.detail, err
    assert table_md5(ciflow_db, "crm.people") == before


@pytest.mark.parametrize("partitioning", [
    "PARTITION BY HASH (person_id)",
    "PARTITION BY RANGE (score)",
])
def test_partitioned_target(ciflow_db, persons, partitioning):
    key = "PRIMARY KEY (person_id)" if "HASH" in partitioning else "PRIMARY KEY (person_id, score)"
    ciflow_db.sql(f"CREATE TABLE crm.people (person_id text, full_name text, score int,"
                  f" note text, {key}) {partitioning}")
    if "HASH" in partitioning:
        for r in range(3):
            ciflow_db.sql(f"CREATE TABLE crm.people_{r} PARTITION OF crm.people"
                          f" FOR VALUES WITH (MODULUS 3, REMAINDER {r})")
    else:
        ciflow_db.sql("CREATE TABLE crm.people_low PARTITION OF crm.people FOR VALUES FROM (MINVALUE) TO (5)")
        ciflow_db.sql("CREATE TABLE crm.people_high PARTITION OF crm.people FOR VALUES FROM (5) TO (MAXVALUE)")
    assert sync(ciflow_db, "emu", ENTITY, target="crm.people")["inserted"] == 10
    upsert(persons, [person(1, score=7), person(12)])
    delete(persons, "p009")
    run = sync(ciflow_db, "emu", ENTITY, target="crm.people")
    assert (run["inserted"], run["updated"], run["deleted"]) == (1, 1, 1)
    assert ciflow_db.sql("SELECT count(*) FROM crm.people") == [(10,)]
    if "RANGE" in partitioning:
        # p001 moved to the partition its new score belongs to.
        assert ciflow_db.sql("SELECT tableoid::regclass::text FROM crm.people"
                             " WHERE person_id = 'p001'") == [("crm.people_high",)]
        assert ciflow_db.sql("SELECT count(*) FROM ONLY crm.people_low WHERE score >= 5") == [(0,)]


def test_missing_and_incompatible_columns_fail_before_any_page(ciflow_db, persons):
    ciflow_db.sql("CREATE TABLE crm.strict (person_id text PRIMARY KEY, full_name text,"
                  " score text, note text)")
    seq = last_seq(persons)
    with raises_sqlstate("42804") as err:
        sync(ciflow_db, "emu", ENTITY, target="crm.strict")
    assert "score" in err.detail and err.hint and "ALTER COLUMN" in err.hint, err
    no_data_call_since(persons, seq)
    ciflow_db.sql("CREATE TABLE crm.needy (person_id text PRIMARY KEY, owner text NOT NULL)")
    with raises_sqlstate("23502") as err:
        sync(ciflow_db, "emu", ENTITY, target="crm.needy")
    assert "owner" in err.detail and err.hint, err
    no_data_call_since(persons, seq)


def test_schema_evolution(ciflow_db, persons):
    sync(ciflow_db, "emu", ENTITY)
    # The service adds an attribute: a new column, NULL in rows synced before.
    grown = dict(PERSON, attributes=PERSON["attributes"] + [
        {"name": "Tier", "dataType": "Edm.String"}])
    persons.set_entity(ENTITY, grown, rows=[dict(person(i), Tier="gold") for i in range(10)])
    run = sync(ciflow_db, "emu", ENTITY)
    assert run["status"] == "succeeded" and run["updated"] == 10
    assert ciflow_db.sql("SELECT count(*) FROM emu.person WHERE tier = 'gold'") == [(10,)]
    # It drops one: the column stays, filled with NULL.
    shrunk = dict(PERSON, attributes=[a for a in grown["attributes"] if a["name"] != "Note"])
    persons.set_entity(ENTITY, shrunk, rows=[
        {k: v for k, v in dict(person(i), Tier="gold").items() if k != "Note"} for i in range(10)])
    sync(ciflow_db, "emu", ENTITY)
    assert ciflow_db.sql("SELECT count(*), count(note) FROM emu.person") == [(10, 0)]
    # It changes a type: refused with a HINT before any page.
    changed = dict(shrunk, attributes=[dict(a, dataType="Edm.Int32") if a["name"] == "Tier" else a
                                       for a in shrunk["attributes"]])
    persons.set_entity(ENTITY, changed, rows=[])
    seq = last_seq(persons)
    with raises_sqlstate("42804") as err:
        sync(ciflow_db, "emu", ENTITY)
    assert "tier" in err.detail and err.hint and "preparing the target" in err.detail, err
    no_data_call_since(persons, seq)
    assert ciflow_db.sql("SELECT count(*) FROM emu.person") == [(10,)]


@pytest.mark.parametrize("target", ["ciflow.people", "pg_catalog.people",
                                    "information_schema.people", "pg_toast.people"])
def test_reserved_schemas_are_refused(ciflow_db, persons, target):
    with raises_sqlstate("42939") as err:
        sync(ciflow_db, "emu", ENTITY, target=target)
    assert err.hint, err


def test_unrelated_non_empty_table_needs_adopt(ciflow_db, persons):
    ciflow_db.sql("CREATE TABLE crm.mine (person_id text PRIMARY KEY, full_name text,"
                  " score int, note text)")
    ciflow_db.sql("INSERT INTO crm.mine VALUES ('zzz', 'not from the service', 0, NULL)")
    seq = last_seq(persons)
    with raises_sqlstate("55000") as err:
        sync(ciflow_db, "emu", ENTITY, target="crm.mine")
    assert "adopt" in err.hint, err
    no_data_call_since(persons, seq)
    assert ciflow_db.sql("SELECT person_id FROM crm.mine") == [("zzz",)]
    run = sync(ciflow_db, "emu", ENTITY, target="crm.mine", adopt=True)
    assert (run["inserted"], run["deleted"]) == (10, 1)
    # Filled by a run now: no adopt needed any more.
    assert sync(ciflow_db, "emu", ENTITY, target="crm.mine")["status"] == "succeeded"


@pytest.fixture
def plain_role(ciflow_db, pg_cluster, persons):
    role = "syncer_" + ciflow_db.name
    pg_cluster.create_role(role)
    for grant in ("GRANT USAGE ON SCHEMA ciflow TO {r}",
                  "GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA ciflow TO {r}",
                  "GRANT USAGE ON SCHEMA crm TO {r}"):
        ciflow_db.sql(grant.format(r=qident(role)))
    ciflow_db.sql("SELECT ciflow.grant_connection('emu', %s)", (role,))
    yield role
    ciflow_db.sql("DROP SCHEMA IF EXISTS fresh CASCADE")
    pg_cluster.sql(f"DROP OWNED BY {qident(role)}", dbname=ciflow_db.name)
    pg_cluster.sql(f"DROP ROLE {qident(role)}")


def test_missing_privileges_name_the_grant(ciflow_db, persons, plain_role):
    conn = ciflow_db.connect(user=plain_role)
    try:
        seq = last_seq(persons)
        with raises_sqlstate("42501") as err:
            sync(ciflow_db, "emu", ENTITY, conn=conn, target="fresh.people")
        assert "CREATE" in err.detail and "DATABASE" in err.detail, err
        assert err.hint.startswith("GRANT CREATE ON DATABASE"), err
        with raises_sqlstate("42501") as err:
            sync(ciflow_db, "emu", ENTITY, conn=conn, target="crm.people")
        assert err.hint.startswith("GRANT CREATE ON SCHEMA crm"), err
        no_data_call_since(persons, seq)
        ciflow_db.sql(f"GRANT CREATE ON SCHEMA crm TO {qident(plain_role)}")
        assert sync(ciflow_db, "emu", ENTITY, conn=conn, target="crm.people")["inserted"] == 10
    finally:
        conn.close()


def test_concurrent_first_syncs_into_one_new_schema(ciflow_db, persons):
    names = [f"Thing{i}" for i in range(4)]
    for n in names:
        persons.set_entity(n, PERSON, rows=[person(i) for i in range(5)])
    results, errors = {}, []

    def one(name):
        try:
            results[name] = sync(ciflow_db, "emu", name, target=f"brandnew.{name.lower()}")
        except psycopg2.Error as exc:
            errors.append(exc)
    threads = [threading.Thread(target=one, args=(n,)) for n in names]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, [str(e) for e in errors]
        assert sorted(results) == names and all(r["inserted"] == 5 for r in results.values())
    finally:
        ciflow_db.sql("DROP SCHEMA IF EXISTS brandnew CASCADE")


def test_swap_replaces_storage_where_safe(ciflow_db, persons):
    sync(ciflow_db, "emu", ENTITY, target="crm.people")
    oid = ciflow_db.sql("SELECT 'crm.people'::regclass::oid")[0][0]
    upsert(persons, [person(1, score=99), person(30)])
    run = sync(ciflow_db, "emu", ENTITY, target="crm.people", publish="swap")
    assert (run["inserted"], run["deleted"]) == (11, 10)
    assert ciflow_db.sql("SELECT 'crm.people'::regclass::oid")[0][0] == oid
    assert ciflow_db.sql("SELECT score FROM crm.people WHERE person_id = 'p001'") == [(99,)]
    assert ciflow_db.sql("SELECT count(*) FROM crm.people") == [(11,)]


@pytest.mark.parametrize("obstacle", [
    "CREATE TABLE crm.child (id int, p text REFERENCES crm.people)",
    "CREATE FUNCTION crm.t() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NULL; END$$;"
    " CREATE TRIGGER t AFTER UPDATE ON crm.people FOR EACH ROW EXECUTE FUNCTION crm.t()",
    "ALTER TABLE crm.people ADD COLUMN twice int GENERATED ALWAYS AS (score * 2) STORED",
    "CREATE PUBLICATION swap_pub FOR TABLE crm.people",
    "CREATE PUBLICATION swap_pub FOR TABLES IN SCHEMA crm",
    "CREATE PUBLICATION swap_pub FOR ALL TABLES",
])
def test_swap_refused_where_it_would_break_something(ciflow_db, persons, obstacle):
    sync(ciflow_db, "emu", ENTITY, target="crm.people")
    ciflow_db.sql(obstacle)
    try:
        before = table_md5(ciflow_db, "crm.people")
        seq = last_seq(persons)
        with raises_sqlstate("55000") as err:
            sync(ciflow_db, "emu", ENTITY, target="crm.people", publish="swap")
        assert "swap" in err.detail and "publish => 'diff'" in err.hint, err
        no_data_call_since(persons, seq)
        assert table_md5(ciflow_db, "crm.people") == before
        assert sync(ciflow_db, "emu", ENTITY, target="crm.people")["status"] == "succeeded"
    finally:
        ciflow_db.sql("DROP PUBLICATION IF EXISTS swap_pub")


def test_swap_refuses_partitioned_tables(ciflow_db, persons):
    ciflow_db.sql("CREATE TABLE crm.parted (person_id text PRIMARY KEY, full_name text,"
                  " score int, note text) PARTITION BY HASH (person_id)")
    ciflow_db.sql("CREATE TABLE crm.parted_0 PARTITION OF crm.parted"
                  " FOR VALUES WITH (MODULUS 1, REMAINDER 0)")
    sync(ciflow_db, "emu", ENTITY, target="crm.parted")
    with raises_sqlstate("55000") as err:
        sync(ciflow_db, "emu", ENTITY, target="crm.parted", publish="swap")
    assert "partition" in err.detail, err
