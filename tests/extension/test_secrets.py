"""Secrets (client_secret, subscription_key, bearer_token) stay secret.

sql-api.md section 1: they are readable by superusers only and never appear
in a view, a log line (at any level), an error message or pg_stat_activity.

* A non-superuser role granted EXECUTE on every ciflow function, SELECT on
  every ciflow table and view, and pg_monitor, reads every catalog-visible
  relation (ciflow.*, pg_catalog.*, information_schema.*, pg_stats after
  ANALYZE), calls every function it can, and never sees a secret value.
* pg_stat_activity while a sync runs shows none, to that role or to a
  superuser.
* A cluster logging at debug5 (to the log and to the client) runs
  connections, actions, a sync, a failing sync, a rejected key and a
  rejected client secret: no secret value in the log, in notices or in
  error fields.

The secrets are passed as server-side bind parameters (harness.exec_params)
wherever a statement carries them: with literals, the user's own statement
text (log_statement, pg_stat_activity) would contain them, which is not
ciflow's doing. For the same reason log_parameter_max_length = 0 keeps the
server from logging the values of those bind parameters.
"""

import collections
import threading
import time

import psycopg2
import pytest

from harness import PgCluster
from extension.cihelpers import (connection_args, create_connection_sql, data_requests,
                                 error_fields, last_seq, qident)

WRONG_KEY = "wrong-key-7f3a9c1e"
WRONG_SECRET = "wrong-secret-5d2b8e40"


def secret_values(emu, static_token):
    import emulator_client as ec
    return [ec.CLIENT_SECRET, ec.SUB_KEY, static_token, WRONG_KEY, WRONG_SECRET]


def assert_no_secret(text, secrets, where):
    for s in secrets:
        assert s not in text, f"secret {s[:6]}... found in {where}: ...{_around(text, s)}..."


def _around(text, s):
    i = text.find(s)
    return text[max(0, i - 120):i + len(s) + 40]


def create_with_binds(db_or_cluster, name, args, **kw):
    query, params = create_connection_sql(name, args, placeholder="libpq")
    db_or_cluster.exec_params(query, params, **kw)


@pytest.fixture
def secret_connections(ciflow_db, emulator):
    """'emu' with client credentials and 'emu_static' with a static bearer
    token, both created through bind parameters; yields the static token."""
    static = emulator.token(fresh=True)
    create_with_binds(ciflow_db, "emu", connection_args(emulator))
    create_with_binds(ciflow_db, "emu_static", connection_args(
        emulator, token_url=None, client_id=None, client_secret=None, bearer_token=static))
    yield static
    for name in ("emu", "emu_static"):
        ciflow_db.sql("SELECT ciflow.drop_connection(%s, if_exists => true)", (name,))
        ciflow_db.sql(f"DROP SCHEMA IF EXISTS {qident(name)} CASCADE")


@pytest.fixture
def snoop(ciflow_db, pg_cluster):
    """A non-superuser with every privilege an administrator could hand out."""
    role = "snoop_" + ciflow_db.name
    pg_cluster.create_role(role)
    for grant in ("GRANT USAGE ON SCHEMA ciflow TO {r}",
                  "GRANT SELECT ON ALL TABLES IN SCHEMA ciflow TO {r}",
                  "GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA ciflow TO {r}",
                  "GRANT CREATE ON DATABASE {d} TO {r}",
                  "GRANT CREATE ON SCHEMA public TO {r}",
                  "GRANT pg_monitor TO {r}"):
        ciflow_db.sql(grant.format(r=qident(role), d=qident(ciflow_db.name)))
    yield role
    pg_cluster.sql(f"DROP OWNED BY {qident(role)}", dbname=ciflow_db.name)
    pg_cluster.sql(f"DROP ROLE {qident(role)}")


def readable_relations(conn):
    with conn.cursor() as cur:
        cur.execute("""
            SELECT format('%I.%I', n.nspname, c.relname)
              FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname IN ('ciflow', 'pg_catalog', 'information_schema')
               AND c.relkind IN ('r', 'v', 'm', 'p', 'f')
             ORDER BY 1""")
        return [r[0] for r in cur.fetchall()]


def dump_relation(conn, rel):
    """All of a relation as text, or the error text if it cannot be read."""
    with conn.cursor() as cur:
        try:
            cur.execute(f"SELECT t::text FROM {rel} t")
            return "\n".join(r[0] or "" for r in cur.fetchall())
        except psycopg2.Error as e:
            return " ".join(str(v) for v in error_fields(e).values() if v)


def call_and_collect(conn, query, params=None):
    """Result rows and/or error fields of one call, as text."""
    with conn.cursor() as cur:
        try:
            cur.execute(query, params)
            rows = cur.fetchall() if cur.description else []
            return repr(rows)
        except psycopg2.Error as e:
            return " ".join(str(v) for v in error_fields(e).values() if v)


def test_superuser_only_store(ciflow_db, secret_connections, emulator):
    """Sanity: the values are stored (so the sweeps below look for real data)."""
    import emulator_client as ec
    row = ciflow_db.sql(
        "SELECT client_secret, subscription_key FROM ciflow.connection_secrets"
        " WHERE connection = 'emu'")
    assert row == [(ec.CLIENT_SECRET, ec.SUB_KEY)]
    assert ciflow_db.sql("SELECT bearer_token FROM ciflow.connection_secrets"
                         " WHERE connection = 'emu_static'") == [(secret_connections,)]


def test_non_superuser_cannot_read_secrets_anywhere(ciflow_db, secret_connections, snoop,
                                                    emulator):
    secrets = secret_values(emulator, secret_connections)
    # Work that leaves traces: a sync (sync_runs), statistics for pg_stats.
    ciflow_db.sql("SELECT * FROM ciflow.sync('emu', 'Customer')")
    ciflow_db.sql("ANALYZE")

    conn = ciflow_db.connect(user=snoop)
    try:
        relations = readable_relations(conn)
        assert "ciflow.connections" in relations and "pg_catalog.pg_stats" in relations
        assert "ciflow.connection_secrets" in relations
        for rel in relations:
            assert_no_secret(dump_relation(conn, rel), secrets, f"{rel} read by {snoop}")

        # Every function of ciflow this role may now execute, called as it
        # would be; results and errors alike are searched.
        calls = [
            ("SELECT * FROM ciflow.connections", None),
            ("SELECT * FROM ciflow.get_entities('emu')", None),
            ("SELECT * FROM ciflow.get_items('emu', 'Customer', top => 3)", None),
            ("SELECT ciflow.get_item('emu', 'Customer', 'nobody')", None),
            ("SELECT * FROM ciflow.get_items('emu_static', 'Customer', top => 1)", None),
            ("SELECT * FROM ciflow.sync('emu', 'Customer', target => 'public.snooped')", None),
            ("SELECT * FROM ciflow.get_items('emu', 'NoSuchEntity')", None),
            ("SELECT ciflow.alter_connection('emu')", None),
        ]
        # And any other one-argument function of the schema, with the name.
        with conn.cursor() as cur:
            cur.execute("""
                SELECT p.oid::regproc::text FROM pg_proc p
                 WHERE p.pronamespace = 'ciflow'::regnamespace AND p.pronargs >= 1
                   AND p.pronargs - p.pronargdefaults = 1
                   AND p.proargtypes[0] = 'text'::regtype AND p.prokind = 'f'
                   AND p.proname NOT IN ('drop_connection')""")
            for (fn,) in cur.fetchall():
                calls.append((f"SELECT {fn}('emu')", None))
        for query, params in calls:
            assert_no_secret(call_and_collect(conn, query, params), secrets,
                             f"{query!r} as {snoop}")
        # The secret store itself gives nothing away to this role.
        text = call_and_collect(conn, "SELECT * FROM ciflow.connection_secrets")
        assert_no_secret(text, secrets, "ciflow.connection_secrets")
    finally:
        conn.close()


def test_superuser_views_show_no_secret(ciflow_db, secret_connections, emulator):
    secrets = secret_values(emulator, secret_connections)
    ciflow_db.sql("SELECT * FROM ciflow.sync('emu_static', 'Customer')")
    conn = ciflow_db.connect()
    try:
        for rel in ("ciflow.connections", "ciflow.sync_runs", "ciflow.sync_progress"):
            assert_no_secret(dump_relation(conn, rel), secrets, rel)
    finally:
        conn.close()


def test_pg_stat_activity_during_sync(ciflow_db, secret_connections, snoop, emulator):
    secrets = secret_values(emulator, secret_connections)
    emulator.add_fault({"method": "GET", "path": r"/data/Customer$", "every": 1},
                       {"delay_ms": 300})
    seq = last_seq(emulator)
    errors = []

    def run():
        try:
            ciflow_db.sql("SELECT * FROM ciflow.sync('emu', 'Customer')")
        except psycopg2.Error as e:
            errors.append(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    seen_during = 0
    try:
        while worker.is_alive():
            if data_requests(emulator, "Customer", seq):
                for user in ("postgres", snoop):
                    text = "\n".join(repr(r) for r in ciflow_db.sql(
                        "SELECT * FROM pg_stat_activity", user=user))
                    assert_no_secret(text, secrets, f"pg_stat_activity read by {user}")
                seen_during += 1
            time.sleep(0.05)
    finally:
        worker.join()
    assert not errors, errors
    assert seen_during > 0, "never looked at pg_stat_activity while the sync ran"


# ---------------------------------------------------------------------------
# The server log at debug5

@pytest.fixture(scope="module")
def debug_cluster():
    cluster = PgCluster(settings={
        "log_min_messages": "debug5",
        "log_min_error_statement": "debug5",
        "log_statement": "all",
        "log_parameter_max_length": 0,
        "log_parameter_max_length_on_error": 0,
        "log_error_verbosity": "verbose",
    })
    try:
        cluster.start()
        cluster.sql("CREATE EXTENSION ciflow")
        yield cluster
    finally:
        cluster.cleanup()


def test_no_secret_in_debug5_log_notices_or_errors(debug_cluster, emulator):
    import emulator_client as ec
    static = emulator.token(fresh=True)
    secrets = secret_values(emulator, static)
    create_with_binds(debug_cluster, "emu", connection_args(emulator))
    create_with_binds(debug_cluster, "emu_static", connection_args(
        emulator, token_url=None, client_id=None, client_secret=None, bearer_token=static))

    conn = debug_cluster.connect(options="-c client_min_messages=debug5")
    conn.notices = collections.deque()  # a plain list would keep only the last 50
    seen = []

    def run(query):
        try:
            with conn.cursor() as cur:
                cur.execute(query)
                if cur.description:
                    seen.append(repr(cur.fetchall()))
        except psycopg2.Error as e:
            seen.append(" ".join(str(v) for v in error_fields(e).values() if v))

    try:
        with conn.cursor() as cur:
            cur.execute("SET ciflow.max_attempts = 2")
            cur.execute("SET ciflow.retry_base_delay = 10")
        run("SELECT * FROM ciflow.get_entities('emu')")
        run("SELECT * FROM ciflow.get_items('emu', 'Customer', top => 2)")
        run("SELECT * FROM ciflow.sync('emu', 'Customer')")
        run("SELECT * FROM ciflow.sync('emu_static', 'Customer', target => 'public.c2')")
        # A sync that fails on page 2 with 500s: an ERROR with DETAIL.
        emulator.add_fault({"method": "GET", "path": r"/data/Customer$",
                            "query": r"\$skip=100(&|$)", "every": 1}, {"status": 500})
        run("SELECT * FROM ciflow.sync('emu', 'Customer')")
        emulator.clear_faults()
        # A rejected subscription key and a rejected client secret (both
        # set through bind parameters): errors that involve the secrets.
        debug_cluster.exec_params(
            "SELECT ciflow.alter_connection($1::text, subscription_key => $2::text)",
            ["emu", WRONG_KEY])
        run("SELECT * FROM ciflow.get_entities('emu')")
        debug_cluster.exec_params(
            "SELECT ciflow.alter_connection($1::text, subscription_key => $2::text,"
            " client_secret => $3::text)", ["emu", ec.SUB_KEY, WRONG_SECRET])
        run("SELECT * FROM ciflow.get_entities('emu')")
        notices = "".join(conn.notices)
    finally:
        conn.close()

    assert len(seen) == 7
    assert any("HTTP status 500" in s for s in seen), seen[4][:500]
    for text, where in (("\n".join(seen), "results and errors"),
                        (notices, "notices at client_min_messages=debug5"),
                        (debug_cluster.log_text(), "the server log at debug5")):
        assert_no_secret(text, secrets, where)
    # The log did record the work (so the check above looked at something).
    log = debug_cluster.log_text()
    assert "ciflow.sync" in log and "DEBUG" in log
