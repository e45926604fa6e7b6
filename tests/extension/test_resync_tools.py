"""Re-syncs seen by the tools users rely on (issue 7 items 2 and 9).

* Logical replication: a SUBSCRIPTION in a second cluster to a PUBLICATION
  of a synced table converges after each re-sync (rows changed, deleted and
  added by the emulator).
* A cancel of the calling statement at each step of a run (while pages are
  read, while the difference is applied, after it was published) leaves no
  staging table and no lock behind; before the publish commits the target
  keeps its old contents and the run is failed, after it the run stands.
"""

import threading
import time

import pytest

from harness import PgCluster, wait_for
from extension.cihelpers import (connection_args, create_connection_sql, raises_sqlstate,
                                 session, sync, table_md5)
from extension.test_resync_diff import (ENTITY, PERSON, TABLE, mutate, person, staging_tables,
                                        upsert)

LOGICAL = {"wal_level": "logical", "max_replication_slots": 4, "max_wal_senders": 4}


def test_subscriber_converges_after_each_resync(emulator):
    with PgCluster(settings=LOGICAL) as pub, PgCluster(settings=LOGICAL) as sub:
        pub.sql("CREATE EXTENSION ciflow")
        query, params = create_connection_sql("emu", connection_args(emulator))
        pub.sql(query, params)
        emulator.set_entity(ENTITY, PERSON, rows=[person(i) for i in range(20)])
        pub.sql(f"SELECT * FROM ciflow.sync('emu', '{ENTITY}')")
        pub.sql(f"CREATE PUBLICATION people FOR TABLE {TABLE}")
        sub.sql("CREATE SCHEMA emu")
        sub.sql(f"CREATE TABLE {TABLE} (person_id text PRIMARY KEY, full_name text,"
                " score integer, note text)")
        sub.sql(f"CREATE SUBSCRIPTION people CONNECTION"
                f" 'host=127.0.0.1 port={pub.port} dbname=postgres user=postgres'"
                f" PUBLICATION people")
        try:
            def converged():
                return table_md5(sub, TABLE) == table_md5(pub, TABLE)
            wait_for(converged, timeout=30, what="the initial copy")
            for step in range(2):
                if step == 0:
                    mutate(emulator)
                else:
                    upsert(emulator, [person(3, score=-3), person(40)])
                run = pub.sql(f"SELECT inserted, updated, deleted FROM ciflow.sync('emu', '{ENTITY}')")
                assert sum(run[0]) > 0
                wait_for(converged, timeout=30, what=f"the subscriber after re-sync {step + 1}")
            assert sub.sql(f"SELECT count(*) FROM {TABLE}") == [(22,)]
        finally:
            sub.sql("DROP SUBSCRIPTION IF EXISTS people")


def leftover_locks(db):
    """Locks of any other session on the target, and any advisory lock (ciflow's)."""
    return db.sql(f"SELECT locktype, mode, pid FROM pg_locks WHERE pid <> pg_backend_pid()"
                  f" AND (relation = '{TABLE}'::regclass OR locktype = 'advisory')")


def sync_workers(db):
    return db.sql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'ciflow sync'")


@pytest.fixture
def slow_people(ciflow_db, ci_connection, emulator):
    emulator.set_entity(ENTITY, PERSON, rows=[person(i) for i in range(20)])
    sync(ciflow_db, "emu", ENTITY)
    ciflow_db.sql("CREATE TABLE public.slow_switch (on_ boolean)")
    ciflow_db.sql("INSERT INTO public.slow_switch VALUES (false)")
    # Sleeps once per call while the switch is on: a way to hold a run at a step.
    ciflow_db.sql("""CREATE FUNCTION public.slowly(t text) RETURNS text
        LANGUAGE plpgsql IMMUTABLE AS $$
        BEGIN
            IF (SELECT on_ FROM public.slow_switch) THEN PERFORM pg_sleep(0.5); END IF;
            RETURN t;
        END $$""")
    yield emulator
    ciflow_db.sql(f"DROP INDEX IF EXISTS emu.slow_idx; DROP TRIGGER IF EXISTS slow ON {TABLE};"
                  " DROP FUNCTION IF EXISTS public.slow_trigger(); DROP FUNCTION public.slowly(text);"
                  " DROP TABLE public.slow_switch")


def cancelled_sync(db, timeout, **settings):
    with session(db, {"statement_timeout": timeout, **settings}) as conn:
        with raises_sqlstate("57014"):
            sync(db, "emu", ENTITY, conn=conn)
    wait_for(lambda: not sync_workers(db), timeout=30, what="the worker to exit")


def assert_nothing_left(db):
    assert staging_tables(db) == []
    assert leftover_locks(db) == []


def last_run(db):
    return db.sql("SELECT status, inserted + updated + deleted FROM ciflow.sync_runs"
                  " ORDER BY id DESC LIMIT 1")[0]


def test_cancel_while_pages_are_read(ciflow_db, slow_people):
    before = table_md5(ciflow_db, TABLE)
    mutate(slow_people)
    slow_people.add_fault({"method": "GET", "path": "/data/Person$", "every": 1},
                          {"delay_ms": 3000})
    cancelled_sync(ciflow_db, "1s")
    assert last_run(ciflow_db)[0] == "failed"
    assert table_md5(ciflow_db, TABLE) == before
    assert_nothing_left(ciflow_db)


def test_cancel_while_the_difference_is_applied(ciflow_db, slow_people):
    ciflow_db.sql("""CREATE FUNCTION public.slow_trigger() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM public.slowly(NEW.person_id); RETURN NEW; END $$""")
    ciflow_db.sql(f"CREATE TRIGGER slow BEFORE UPDATE ON {TABLE} FOR EACH ROW"
                  " EXECUTE FUNCTION public.slow_trigger()")
    ciflow_db.sql("UPDATE public.slow_switch SET on_ = true")
    before = table_md5(ciflow_db, TABLE)
    upsert(slow_people, [person(i, score=1000 + i) for i in range(20)])
    cancelled_sync(ciflow_db, "2s")
    assert last_run(ciflow_db)[0] == "failed"
    assert table_md5(ciflow_db, TABLE) == before
    assert_nothing_left(ciflow_db)


def test_cancel_after_the_publish(ciflow_db, slow_people):
    # ANALYZE evaluates an expression index for every sampled row: slow.
    ciflow_db.sql(f"CREATE INDEX slow_idx ON {TABLE} (public.slowly(person_id))")
    ciflow_db.sql("UPDATE public.slow_switch SET on_ = true")
    upsert(slow_people, [person(1, score=77)])
    started = time.monotonic()
    cancelled_sync(ciflow_db, "3s", **{"ciflow.analyze_after_sync": "on"})
    assert time.monotonic() - started < 60
    # The publish had committed: the run and the new contents stand.
    assert last_run(ciflow_db) == ("succeeded", 1)
    ciflow_db.sql("UPDATE public.slow_switch SET on_ = false")
    assert ciflow_db.sql(f"SELECT score FROM {TABLE} WHERE person_id = 'p001'") == [(77,)]
    assert_nothing_left(ciflow_db)
