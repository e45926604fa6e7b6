"""0.1 is released: ALTER EXTENSION ciflow UPDATE must give a 0.1 database
exactly what a fresh 0.2 install has (objects, columns, constraints, views,
functions, policies, grants, dumped configuration), and keep its data and
the grants an administrator gave."""

import pytest

from extension.cihelpers import connection_args, raises_sqlstate

# Each query describes one aspect of the extension's objects as sorted text rows.
CATALOG_QUERIES = {
    "members": """
        SELECT pg_describe_object(classid, objid, objsubid)
          FROM pg_depend
         WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
           AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'ciflow')""",
    "columns": """
        SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               coalesce(pg_get_expr(d.adbin, d.adrelid), '')
          FROM pg_attribute a
          JOIN pg_class c ON c.oid = a.attrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE n.nspname = 'ciflow' AND a.attnum > 0 AND NOT a.attisdropped""",
    "constraints": """
        SELECT conrelid::regclass::text, pg_get_constraintdef(oid)
          FROM pg_constraint WHERE connamespace = 'ciflow'::regnamespace""",
    "indexes": """
        SELECT pg_get_indexdef(indexrelid) FROM pg_index i
          JOIN pg_class c ON c.oid = i.indexrelid
         WHERE c.relnamespace = 'ciflow'::regnamespace""",
    "relations": """
        SELECT relname, relkind, relrowsecurity, relforcerowsecurity,
               coalesce(array_to_string(reloptions, ','), ''),
               coalesce(array_to_string(relacl, ','), '')
          FROM pg_class WHERE relnamespace = 'ciflow'::regnamespace""",
    "views": """
        SELECT c.relname, pg_get_viewdef(c.oid)
          FROM pg_class c WHERE c.relnamespace = 'ciflow'::regnamespace AND c.relkind = 'v'""",
    "functions": """
        SELECT p.oid::regprocedure::text, pg_get_functiondef(p.oid),
               coalesce(array_to_string(p.proacl, ','), '')
          FROM pg_proc p WHERE p.pronamespace = 'ciflow'::regnamespace""",
    "policies": """
        SELECT tablename, policyname, cmd, roles::text, coalesce(qual, ''),
               coalesce(with_check, '')
          FROM pg_policies WHERE schemaname = 'ciflow'""",
    "schema": """
        SELECT nspname, coalesce(array_to_string(nspacl, ','), '')
          FROM pg_namespace WHERE nspname = 'ciflow'""",
    "comments": """
        SELECT pg_describe_object(d.classoid, d.objoid, d.objsubid), d.description
          FROM pg_description d
          JOIN pg_depend e ON e.classid = d.classoid AND e.objid = d.objoid
         WHERE e.deptype = 'e'
           AND e.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'ciflow')""",
    "config_dump": """
        SELECT unnest(extconfig)::regclass::text FROM pg_extension WHERE extname = 'ciflow'""",
}


def describe(db):
    return {k: sorted(tuple(str(v) for v in r) for r in db.sql(q))
            for k, q in CATALOG_QUERIES.items()}


@pytest.fixture
def two_databases(pg_cluster):
    names = ("t_upgrade_from_01", "t_upgrade_fresh_02")
    for n in names:
        pg_cluster.drop_database(n)
        pg_cluster.create_database(n)
    yield [pg_cluster.database(n) for n in names]
    for n in names:
        pg_cluster.drop_database(n)
    pg_cluster.sql("DROP ROLE IF EXISTS upgrade_user")


def test_update_from_01_equals_fresh_02(two_databases, pg_cluster, emulator):
    old, fresh = two_databases
    pg_cluster.sql("DROP ROLE IF EXISTS upgrade_user")
    pg_cluster.create_role("upgrade_user")

    old.sql("CREATE EXTENSION ciflow VERSION '0.1'")
    assert old.sql("SELECT extversion FROM pg_extension WHERE extname = 'ciflow'") == [("0.1",)]
    # What a 0.1 library left behind (today's library speaks 0.2 only and
    # says so until the update has run).
    args = connection_args(emulator)
    old.sql("INSERT INTO ciflow.connection_settings (name, base_url, instance_id, token_url,"
            " client_id, scope) VALUES ('emu', %(base_url)s, %(instance_id)s, %(token_url)s,"
            " %(client_id)s, %(scope)s)", args)
    old.sql("INSERT INTO ciflow.connection_secrets VALUES ('emu', %(client_secret)s,"
            " %(subscription_key)s, NULL)", args)
    old.sql("INSERT INTO ciflow.sync_runs (connection, entity, target, mode, status, rows)"
            " VALUES ('emu', 'Customer', 'emu.customer', 'full', 'succeeded', 250)")
    old.sql("GRANT EXECUTE ON FUNCTION ciflow.sync(text, text, text, text, text, text)"
            " TO upgrade_user")
    with raises_sqlstate("55000") as e:
        old.sql("SELECT count(*) FROM ciflow.get_entities('emu')")
    assert "ALTER EXTENSION ciflow UPDATE" in e.hint
    runs_before = old.sql("SELECT id, status, rows FROM ciflow.sync_runs ORDER BY id")

    old.sql("ALTER EXTENSION ciflow UPDATE")
    fresh.sql("CREATE EXTENSION ciflow")
    for db in (old, fresh):
        assert db.sql("SELECT extversion FROM pg_extension WHERE extname = 'ciflow'") == \
            [("0.2",)]

    # The administrator's grant followed ciflow.sync to its new signature ...
    granted = old.sql("SELECT has_function_privilege('upgrade_user', 'ciflow.sync(text, text,"
                      " text, text, text, text, text, boolean)', 'EXECUTE')")
    assert granted == [(True,)]
    old.sql("REVOKE EXECUTE ON FUNCTION ciflow.sync(text, text, text, text, text, text, text,"
            " boolean) FROM upgrade_user")
    # ... and with it revoked again the two databases must match exactly.
    got, want = describe(old), describe(fresh)
    for aspect in CATALOG_QUERIES:
        assert got[aspect] == want[aspect], f"{aspect} differs after the update"

    # Data survived, and the old connection has an owner and works.
    assert old.sql("SELECT id, status, rows FROM ciflow.sync_runs ORDER BY id") == runs_before
    assert old.sql("SELECT name, owner::text FROM ciflow.connections") == [("emu", "postgres")]
    assert old.sql("SELECT status FROM ciflow.sync('emu', 'Customer')") == [("succeeded",)]
