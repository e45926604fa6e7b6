"""No privilege escalation, per-connection privilege, secrets that stay home.

sql-api.md section 1, issue 6.  The attacker is `mallory`, a role that was
granted EXECUTE on every function of ciflow, SELECT on its views and
sync_runs, use of the connection 'emu', CREATE on the database and a schema
of its own.  In that schema it plants traps: `=` operators for text, bigint,
integer and name, and functions named like built-ins (now, clock_timestamp,
lower, texteq, ...).  Each trap raises a WARNING naming the identity it runs
as and, when that is not mallory, makes mallory a superuser.  The traps are
reached by `SET search_path = mallory, pg_catalog` and, for the sync worker,
by `ALTER ROLE mallory SET search_path`.

After mallory has called every function it can, mallory must still be a
plain role with no new memberships, and no trap may ever have run as
anyone but mallory (the WARNINGs are read from the client's notices and
from the server log, which also has the worker's).
"""

import re
import subprocess

import psycopg2
import pytest

from extension.cihelpers import (connection_args, create_connection_sql, qident,
                                 raises_sqlstate)

ATTACKER = "mallory"

TRAP_FUNCTION = r"""
CREATE FUNCTION mallory.trap(what text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE WARNING 'ciflow-trap % ran as % (session %)', what, current_user, session_user;
    IF current_user::text OPERATOR(pg_catalog.<>) 'mallory' THEN
        EXECUTE 'ALTER ROLE mallory SUPERUSER';
        EXECUTE 'GRANT pg_read_server_files TO mallory';
    END IF;
END
$$;
"""

# (operator argument type, equality function to hand the real answer to)
OPERATOR_TYPES = [("text", "texteq"), ("bigint", "int8eq"), ("integer", "int4eq"),
                  ("name", "nameeq")]

# Functions named like built-ins that ciflow's SQL, or SQL it generates,
# could resolve through the search_path: (signature, body returning the real thing).
LOOKALIKES = [
    ("now()", "timestamptz", "pg_catalog.now()"),
    ("clock_timestamp()", "timestamptz", "pg_catalog.clock_timestamp()"),
    ("lower(text)", "text", "pg_catalog.lower($1)"),
    ("upper(text)", "text", "pg_catalog.upper($1)"),
    ("texteq(text, text)", "boolean", "pg_catalog.texteq($1, $2)"),
    ("int8eq(bigint, bigint)", "boolean", "pg_catalog.int8eq($1, $2)"),
    ("nameeq(name, name)", "boolean", "pg_catalog.nameeq($1, $2)"),
    ("pg_has_role(oid, text)", "boolean", "pg_catalog.pg_has_role($1, $2)"),
    ("quote_ident(text)", "text", "pg_catalog.quote_ident($1)"),
    ("format_type(oid, integer)", "text", "pg_catalog.format_type($1, $2)"),
    ("jsonb_build_object()", "jsonb", "pg_catalog.jsonb_build_object()"),
]


def plant_traps(db):
    db.sql(f"CREATE SCHEMA {ATTACKER} AUTHORIZATION {ATTACKER}")
    with db.connect(user=ATTACKER) as conn, conn.cursor() as cur:
        cur.execute(TRAP_FUNCTION)
        for typ, eqfunc in OPERATOR_TYPES:
            fname = f"mallory.trap_eq_{typ}"
            cur.execute(f"""
                CREATE FUNCTION {fname}({typ}, {typ}) RETURNS boolean
                LANGUAGE plpgsql AS $$
                BEGIN
                    PERFORM mallory.trap('= on {typ}');
                    RETURN pg_catalog.{eqfunc}($1, $2);
                END $$""")
            cur.execute(f"""
                CREATE OPERATOR mallory.= (LEFTARG = {typ}, RIGHTARG = {typ},
                                           PROCEDURE = {fname})""")
        for sig, rettype, real in LOOKALIKES:
            name = sig.split("(")[0]
            cur.execute(f"""
                CREATE FUNCTION mallory.{sig} RETURNS {rettype}
                LANGUAGE plpgsql AS $$
                BEGIN
                    PERFORM mallory.trap('{name}()');
                    RETURN {real};
                END $$""")


@pytest.fixture(scope="module")
def attacker(ciflow_db, pg_cluster):
    pg_cluster.create_role(ATTACKER)
    db = ciflow_db
    for grant in ("GRANT EXECUTE ON ALL ROUTINES IN SCHEMA ciflow TO {r}",
                  "GRANT SELECT ON ciflow.connections, ciflow.sync_runs,"
                  " ciflow.sync_progress, ciflow.events, ciflow.refresh_states,"
                  " ciflow.thresholds, ciflow.sinks, ciflow.deliveries TO {r}",
                  "GRANT CREATE ON DATABASE {d} TO {r}"):
        db.sql(grant.format(r=ATTACKER, d=qident(db.name)))
    plant_traps(db)
    yield ATTACKER
    pg_cluster.sql(f"DROP OWNED BY {ATTACKER} CASCADE", dbname=db.name)
    pg_cluster.sql(f"ALTER ROLE {ATTACKER} RESET ALL")
    pg_cluster.sql(f"DROP ROLE {ATTACKER}")


def attacker_state(db):
    return db.sql("""
        SELECT r.rolsuper, r.rolcreaterole, r.rolcreatedb, r.rolbypassrls,
               (SELECT count(*) FROM pg_auth_members m WHERE m.member = r.oid)
          FROM pg_roles r WHERE r.rolname = %s""", (ATTACKER,))[0]


PLAIN = (False, False, False, False, 0)


def trap_lines(text):
    return re.findall(r"ciflow-trap (.*?) ran as (\S+) \(session (\S+)\)", text)


def calls_for(emulator):
    """Every SQL-callable function of ciflow the attacker may execute, as
    (label, function, query, parameters); every relation it may read."""
    mal_args = connection_args(emulator)
    create, create_params = create_connection_sql("mal_conn", mal_args)
    sync = "SELECT status FROM ciflow.sync('emu', 'Customer', target => 'mallory.customer')"
    return [
        ("create_connection", "create_connection", create, create_params),
        # A sink first: the events of the sync and the polls below are queued for it.
        ("add_sink", "add_sink",
         "SELECT ciflow.add_sink('mal-sink', 'http://127.0.0.1:9/hook', secret => 'k')", None),
        ("sink_owned_by", "sink_owned_by",
         "SELECT ciflow.sink_owned_by('mal-sink', 'mallory')", None),
        ("alter_connection", "alter_connection",
         "SELECT ciflow.alter_connection('mal_conn', page_size => 50)", None),
        ("grant_connection", "grant_connection",
         "SELECT ciflow.grant_connection('mal_conn', 'mallory')", None),
        ("revoke_connection", "revoke_connection",
         "SELECT ciflow.revoke_connection('mal_conn', 'mallory')", None),
        ("get_entities", "get_entities", "SELECT count(*) FROM ciflow.get_entities('emu')", None),
        ("get_items", "get_items",
         "SELECT count(*) FROM ciflow.get_items('emu', 'Customer', top => 3)", None),
        ("get_item", "get_item", "SELECT ciflow.get_item('emu', 'Customer', %s)",
         (ec_first_key(emulator),)),
        ("describe_entity", "describe_entity",
         "SELECT count(*) FROM ciflow.describe_entity('emu', 'Customer')", None),
        ("sync", "sync", sync, None),
        ("re-sync", "sync", sync, None),
        ("incremental sync", "sync",
         "SELECT status FROM ciflow.sync('emu', 'Customer', target => 'mallory.customer',"
         " mode => 'incremental')", None),
        ("poll", "poll", "SELECT count(*) FROM ciflow.poll('emu')", None),
        ("poll again", "poll", "SELECT count(*) FROM ciflow.poll('emu')", None),
        ("add_threshold", "add_threshold",
         "SELECT ciflow.add_threshold('emu', 'segment', 'HighValue', above => 10)", None),
        ("drop_threshold", "drop_threshold",
         "SELECT ciflow.drop_threshold(max(id)) FROM ciflow.thresholds", None),
        ("trim_events", "trim_events", "SELECT ciflow.trim_events()", None),
        ("schedule_sync", "schedule_sync",
         "SELECT ciflow.schedule_sync('emu', 'Customer', every => '1 hour',"
         " target => 'mallory.customer')", None),
        ("watch", "watch", "SELECT ciflow.watch('emu', cron => '@hourly')", None),
        ("alter_job", "alter_job",
         "SELECT ciflow.alter_job(ciflow.watch('emu', every => '2 hours'), enabled => false)",
         None),
        ("worker_status", "worker_status", "SELECT state FROM ciflow.worker_status()", None),
        ("unschedule", "unschedule",
         "SELECT ciflow.unschedule(ciflow.watch('emu', every => '3 hours'))", None),
        ("edm_type", "edm_type", "SELECT ciflow.edm_type('Edm.Int16')", None),
        ("edm_value", "edm_value", "SELECT ciflow.edm_value('7'::jsonb, 'Edm.Int16')", None),
        ("connection_owned_by", "connection_owned_by",
         "SELECT ciflow.connection_owned_by('emu', 'mallory')", None),
        ("connection_usable_by", "connection_usable_by",
         "SELECT ciflow.connection_usable_by('emu', 'mallory')", None),
        ("deliver", "deliver", "CALL ciflow.deliver()", None),
        ("retry_delivery", "retry_delivery",
         "SELECT ciflow.retry_delivery(max(id)) FROM ciflow.deliveries", None),
        ("drop_sink", "drop_sink", "SELECT ciflow.drop_sink('mal-sink')", None),
        ("relations", None,
         "SELECT (SELECT count(*) FROM ciflow.connections), (SELECT count(*) FROM ciflow.sync_runs),"
         " (SELECT count(*) FROM ciflow.sync_progress), (SELECT count(*) FROM ciflow.events),"
         " (SELECT count(*) FROM ciflow.refresh_states),"
         " (SELECT count(*) FROM ciflow.thresholds), (SELECT count(*) FROM ciflow.sinks),"
         " (SELECT count(*) FROM ciflow.deliveries)", None),
        ("drop_connection", "drop_connection", "SELECT ciflow.drop_connection('mal_conn')", None),
        ("denied get_entities", "get_entities",
         "SELECT count(*) FROM ciflow.get_entities('mal_gone')", None),
    ]


def test_the_attack_covers_every_function(ciflow_db, emulator):
    """A function added to ciflow must be added to the attack above."""
    covered = {f for _, f, _, _ in calls_for(emulator) if f}
    functions = {r[0] for r in ciflow_db.sql(
        "SELECT proname FROM pg_proc WHERE pronamespace = 'ciflow'::regnamespace")}
    assert functions - covered == set(), "not attacked: %s" % sorted(functions - covered)


def ec_first_key(emulator):
    rows = emulator.rows("Customer")
    first = next(iter(rows))
    return str(first["CustomerId"])


def run_all_calls(conn, emulator):
    outcomes = {}
    for what, _, query, params in calls_for(emulator):
        with conn.cursor() as cur:
            try:
                cur.execute(query, params)
                outcomes[what] = cur.fetchall()
            except psycopg2.Error as e:
                outcomes[what] = f"{e.pgcode}: {e.diag.message_primary}"
    return outcomes


@pytest.mark.parametrize("path_via", ["set", "role_default"])
def test_planted_operators_and_lookalikes_never_run_elevated(
        ciflow_db, pg_cluster, attacker, ci_connection, emulator, path_via):
    ciflow_db.sql("SELECT ciflow.grant_connection('emu', %s)", (ATTACKER,))
    offset = pg_cluster.log_size()
    if path_via == "role_default":
        ciflow_db.sql(f"ALTER ROLE {ATTACKER} IN DATABASE {qident(ciflow_db.name)}"
                      f" SET search_path = {ATTACKER}, pg_catalog")
    try:
        conn = ciflow_db.connect(user=ATTACKER)
        try:
            if path_via == "set":
                with conn.cursor() as cur:
                    cur.execute(f"SET search_path = {ATTACKER}, pg_catalog")
            with conn.cursor() as cur:
                cur.execute("SHOW search_path")
                assert cur.fetchone()[0].startswith(ATTACKER)
            outcomes = run_all_calls(conn, emulator)
            notices = "".join(conn.notices)
        finally:
            conn.close()
    finally:
        ciflow_db.sql(f"ALTER ROLE {ATTACKER} IN DATABASE {qident(ciflow_db.name)} RESET ALL")
        ciflow_db.sql(f"DROP TABLE IF EXISTS {ATTACKER}.customer")

    # The calls did their work (so the traps had every chance to run).
    assert outcomes["get_items"] == [(3,)], outcomes
    assert outcomes["sync"] == [("succeeded",)], outcomes
    assert outcomes["re-sync"] == [("succeeded",)], outcomes
    assert outcomes["create_connection"] == [("",)], outcomes
    assert outcomes["incremental sync"] == [("succeeded",)], outcomes
    assert isinstance(outcomes["poll again"], list), outcomes
    assert isinstance(outcomes["add_threshold"], list), outcomes
    assert outcomes["add_sink"] == [("",)], outcomes
    assert outcomes["deliver"][0][0] >= 1, outcomes        # the syncs' events, queued
    assert outcomes["drop_sink"] == [("",)], outcomes
    assert isinstance(outcomes["relations"], list), outcomes
    assert outcomes["denied get_entities"].startswith("42704"), outcomes

    assert attacker_state(ciflow_db) == PLAIN
    ran = trap_lines(notices) + trap_lines(pg_cluster.log_since(offset))
    elevated = [r for r in ran if r[1] != ATTACKER]
    assert elevated == [], f"traps ran as another role: {elevated}"


def test_security_restricted_operation_is_refused(ciflow_db, ci_connection, emulator):
    ciflow_db.sql("CREATE MATERIALIZED VIEW public.mv_ciflow AS"
                  " SELECT ciflow.get_item('emu', 'Customer', '1') AS item WITH NO DATA")
    try:
        with raises_sqlstate("42501") as e:
            ciflow_db.sql("REFRESH MATERIALIZED VIEW public.mv_ciflow")
        assert "security-restricted" in (e.message or "") + (e.detail or "")
    finally:
        ciflow_db.sql("DROP MATERIALIZED VIEW public.mv_ciflow")


# ---------------------------------------------------------------------------
# Per-connection privilege

@pytest.fixture
def user_roles(ciflow_db, pg_cluster):
    made = []

    def make(name, *member_of):
        pg_cluster.create_role(name)
        made.append(name)
        ciflow_db.sql(f"GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA ciflow TO {name}")
        ciflow_db.sql(f"GRANT SELECT ON ciflow.connections, ciflow.sync_runs,"
                      f" ciflow.sync_progress TO {name}")
        ciflow_db.sql(f"GRANT CREATE ON DATABASE {qident(ciflow_db.name)} TO {name}")
        for group in member_of:
            pg_cluster.sql(f"GRANT {group} TO {name}")
        return name

    yield make
    for name in reversed(made):
        pg_cluster.sql(f"DROP OWNED BY {name} CASCADE", dbname=ciflow_db.name)
        pg_cluster.sql(f"DROP ROLE {name}")


def as_role(db, role, query, params=None):
    # Not `with conn`: psycopg2 2.9 opens a transaction block even in
    # autocommit, and ciflow.sync refuses to run in one.
    conn = db.connect(user=role)
    try:
        with conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall() if cur.description else None
    finally:
        conn.close()


def create_as(db, role, name, emulator):
    """create_connection called by `role`, which then owns the connection."""
    query, params = create_connection_sql(name, connection_args(emulator))
    as_role(db, role, query, params)


def test_use_of_a_connection_needs_a_grant(ciflow_db, ci_connection, emulator, user_roles):
    alice = user_roles("sec_alice")
    group = user_roles("sec_group")
    bob = user_roles("sec_bob", group)

    for role in (alice, bob):
        with raises_sqlstate("42501") as e:
            as_role(ciflow_db, role, "SELECT count(*) FROM ciflow.get_entities('emu')")
        assert 'permission denied for connection "emu"' in e.message + (e.detail or "")
        assert "grant_connection" in e.hint
        with raises_sqlstate("42501"):
            as_role(ciflow_db, role, "SELECT * FROM ciflow.sync('emu', 'Customer',"
                                     " target => 'public.sec_customer')")
        assert as_role(ciflow_db, role, "SELECT name FROM ciflow.connections") == []
    calls_before = len(emulator.log())

    ciflow_db.sql("SELECT ciflow.grant_connection('emu', %s)", (alice,))
    ciflow_db.sql("SELECT ciflow.grant_connection('emu', %s)", (group,))
    for role in (alice, bob):   # bob through his membership of the group
        assert as_role(ciflow_db, role, "SELECT count(*) > 0 FROM ciflow.get_entities('emu')") \
            == [(True,)]
        assert as_role(ciflow_db, role, "SELECT name FROM ciflow.connections") == [("emu",)]
    assert len(emulator.log()) > calls_before

    # Neither may alter, drop or grant a connection it does not own.
    for query in ("SELECT ciflow.alter_connection('emu', page_size => 7)",
                  "SELECT ciflow.drop_connection('emu')",
                  "SELECT ciflow.grant_connection('emu', 'sec_bob')",
                  "SELECT ciflow.revoke_connection('emu', 'sec_alice')"):
        with raises_sqlstate("42501") as e:
            as_role(ciflow_db, alice, query)
        assert "must be owner of connection" in e.message

    ciflow_db.sql("SELECT ciflow.revoke_connection('emu', %s)", (alice,))
    with raises_sqlstate("42501"):
        as_role(ciflow_db, alice, "SELECT count(*) FROM ciflow.get_entities('emu')")
    assert as_role(ciflow_db, bob, "SELECT count(*) > 0 FROM ciflow.get_entities('emu')") \
        == [(True,)]


def test_owner_manages_its_connection(ciflow_db, emulator, user_roles):
    carol = user_roles("sec_carol")
    dave = user_roles("sec_dave")
    create_as(ciflow_db, carol, "carols", emulator)
    assert as_role(ciflow_db, carol, "SELECT owner::text FROM ciflow.connections") == \
        [(carol,)]
    assert as_role(ciflow_db, dave, "SELECT count(*) FROM ciflow.connections") == [(0,)]
    as_role(ciflow_db, carol, f"SELECT ciflow.grant_connection('carols', '{dave}')")
    assert as_role(ciflow_db, dave, "SELECT count(*) FROM ciflow.get_items('carols', 'Customer',"
                                    " top => 2)") == [(2,)]
    as_role(ciflow_db, carol, "SELECT ciflow.alter_connection('carols', page_size => 9)")
    as_role(ciflow_db, carol, "SELECT ciflow.drop_connection('carols')")
    assert ciflow_db.sql("SELECT count(*) FROM ciflow.connection_grants") == [(0,)]


def test_runs_are_private(ciflow_db, ci_connection, emulator, user_roles):
    erin = user_roles("sec_erin")
    frank = user_roles("sec_frank")
    for role in (erin, frank):
        ciflow_db.sql("SELECT ciflow.grant_connection('emu', %s)", (role,))
        ciflow_db.sql(f"CREATE SCHEMA {role} AUTHORIZATION {role}")
        as_role(ciflow_db, role, f"SELECT * FROM ciflow.sync('emu', 'Customer',"
                                 f" target => '{role}.customer')")
    for role in (erin, frank):
        rows = as_role(ciflow_db, role, "SELECT DISTINCT run_by::text, target FROM ciflow.sync_runs")
        assert rows == [(role, f"{role}.customer")], rows
        assert as_role(ciflow_db, role, "SELECT count(*) FROM ciflow.sync_progress") == [(0,)]
    # The connection's owner (postgres here, a superuser) and superusers see all.
    everyone = {r[0] for r in ciflow_db.sql("SELECT run_by::text FROM ciflow.sync_runs")}
    assert {erin, frank} <= everyone


def test_owner_sees_every_run_of_its_connection(ciflow_db, emulator, user_roles):
    gina = user_roles("sec_gina")
    hank = user_roles("sec_hank")
    create_as(ciflow_db, gina, "ginas", emulator)
    as_role(ciflow_db, gina, f"SELECT ciflow.grant_connection('ginas', '{hank}')")
    ciflow_db.sql(f"CREATE SCHEMA {hank} AUTHORIZATION {hank}")
    as_role(ciflow_db, hank, f"SELECT * FROM ciflow.sync('ginas', 'Customer',"
                             f" target => '{hank}.customer')")
    assert as_role(ciflow_db, gina, "SELECT run_by::text FROM ciflow.sync_runs"
                                    " WHERE connection = 'ginas'") == [(hank,)]
    as_role(ciflow_db, gina, "SELECT ciflow.drop_connection('ginas')")


# ---------------------------------------------------------------------------
# Secrets cannot be redirected

def test_alter_cannot_redirect_stored_secrets(ciflow_db, emulator, user_roles):
    """An owner that did not give the secrets cannot send them elsewhere."""
    from emulator_client import Emulator
    ivy = user_roles("sec_ivy")
    # The administrator makes the connection with the secrets, then hands it
    # to ivy (who may alter what she owns).
    query, params = create_connection_sql("handed", connection_args(emulator))
    ciflow_db.sql(query, params)
    ciflow_db.sql("UPDATE ciflow.connection_settings SET owner = %s::regrole"
                  " WHERE name = 'handed'", (ivy,))
    with Emulator() as evil:
        for change in (f"base_url => '{evil.base_url}'",
                       f"token_url => '{evil.token_url}'",
                       f"base_url => '{evil.base_url}', token_url => '{evil.token_url}'",
                       f"base_url => '{evil.base_url}', client_secret => NULL"):
            with raises_sqlstate("42501") as e:
                as_role(ciflow_db, ivy, f"SELECT ciflow.alter_connection('handed', {change})")
            assert "requires giving its secrets again" in e.message, e
            assert e.hint and "same ciflow.alter_connection call" in e.hint
        # Giving only one secret is not enough: the key would still move.
        with raises_sqlstate("42501") as e:
            as_role(ciflow_db, ivy, "SELECT ciflow.alter_connection('handed', base_url => %s,"
                                    " client_secret => 'hers')", (evil.base_url,))
        assert "subscription_key" in e.detail
        # Nothing moved: the connection still talks to the real emulator.
        assert as_role(ciflow_db, ivy, "SELECT base_url FROM ciflow.connections") == \
            [(emulator.base_url.rstrip("/"),)]
        # With her own secrets she may point it anywhere; the stored ones never left.
        as_role(ciflow_db, ivy, "SELECT ciflow.alter_connection('handed', base_url => %s,"
                                " token_url => %s, client_secret => 'ivys-secret',"
                                " subscription_key => 'ivys-key')",
                (evil.base_url, evil.token_url))
        with pytest.raises(psycopg2.Error):
            as_role(ciflow_db, ivy, "SELECT count(*) FROM ciflow.get_entities('handed')")
        # The impostor shares the real service's default credentials, so it
        # would have accepted the stored ones: it saw requests, none with them.
        seen = evil.log()
        assert seen, "ivy's call never reached her host"
        assert all(e.get("key") != "primary" for e in seen), seen
        assert all(not (e.get("route") == "token" and e.get("status") == 200) for e in seen), seen
    ciflow_db.sql("SELECT ciflow.drop_connection('handed')")


# ---------------------------------------------------------------------------
# Requests stay where they belong; input hygiene

def test_instance_id_is_one_segment(ciflow_db, make_connection, emulator):
    emulator.settings(default_page=37)
    before = emulator.state()["settings"]
    make_connection("trav", emulator, instance_id="../../_control/reset")
    with raises_sqlstate("42704"):
        ciflow_db.sql("SELECT count(*) FROM ciflow.get_entities('trav')")
    with raises_sqlstate("42704"):
        ciflow_db.sql("SELECT count(*) FROM ciflow.get_items('trav', 'Customer')")
    assert emulator.state()["settings"] == before, "the request reached /_control/"
    # The log shows paths decoded; the routes say where they went.
    api = [e for e in emulator.log() if "/instances/" in e.get("path", "")]
    assert len(api) == 2 and all(e["status"] == 404 for e in api), api
    assert all("control" not in str(e.get("route")) for e in api), api


@pytest.mark.parametrize("instance_id", ["..", ".", "%2e%2E"])
def test_dot_instance_ids_are_refused(ciflow_db, emulator, instance_id):
    args = connection_args(emulator, instance_id=instance_id)
    query, params = create_connection_sql("dots", args)
    with raises_sqlstate("22023"):
        ciflow_db.sql(query, params)


@pytest.mark.parametrize("suffix", ["/../v1", "/a/%2e%2e/v1", "?x=1", "#frag", "/./v1"])
def test_base_url_must_be_plain(ciflow_db, emulator, suffix):
    args = connection_args(emulator, base_url=emulator.base_url.rstrip("/") + suffix)
    query, params = create_connection_sql("plainurl", args)
    with raises_sqlstate("22023") as e:
        ciflow_db.sql(query, params)
    assert "base_url" in e.message


@pytest.mark.parametrize("name,code", [("pg_x", "42939"), ("ciflow", "42939"),
                                       ("information_schema", "42939")])
def test_names_that_cannot_be_a_schema(ciflow_db, emulator, name, code):
    query, params = create_connection_sql(name, connection_args(emulator))
    with raises_sqlstate(code) as e:
        ciflow_db.sql(query, params)
    assert "reserved" in e.message


@pytest.mark.parametrize("interval", ["100 years", "2 days", "0 seconds", "-1 minute"])
def test_absurd_intervals_are_refused(ciflow_db, emulator, interval):
    query, params = create_connection_sql("absurd", connection_args(emulator,
                                                                    per_interval=interval))
    with raises_sqlstate("22023") as e:
        ciflow_db.sql(query, params)
    assert "per_interval" in e.message


@pytest.mark.parametrize("key_name", ["CustomerId eq '1' or true", "1abc", "a/b", ""])
def test_get_item_key_name_is_an_identifier(ciflow_db, ci_connection, emulator, key_name):
    since = len(emulator.log())
    with pytest.raises(psycopg2.Error) as e:
        ciflow_db.sql("SELECT ciflow.get_item('emu', 'Customer', '1', key_name => %s)",
                      (key_name,))
    assert e.value.pgcode in ("22023", "22004")
    assert len(emulator.log()) == since, "a request was sent"


def test_max_response_size_is_for_superusers(ciflow_db, user_roles):
    jill = user_roles("sec_jill")
    with ciflow_db.connect(user=jill) as conn, conn.cursor() as cur:
        # Set before the library is loaded: a placeholder, dropped at load.
        cur.execute("SET ciflow.max_response_size = '1GB'")
        cur.execute("SELECT ciflow.get_item(NULL, NULL, NULL)")     # loads ciflow
        cur.execute("SHOW ciflow.max_response_size")
        assert cur.fetchone()[0] == "64MB"
        with pytest.raises(psycopg2.Error) as e:
            cur.execute("SET ciflow.max_response_size = '1GB'")
        assert e.value.pgcode == "42501"
    with ciflow_db.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT ciflow.get_item(NULL, NULL, NULL)")
        cur.execute("SET ciflow.max_response_size = '1GB'")


def test_errors_never_show_internal_statements(ciflow_db, emulator, user_roles):
    kate = user_roles("sec_kate")
    query, params = create_connection_sql("kates", connection_args(emulator))
    ciflow_db.sql(query, params)
    ciflow_db.sql("SELECT ciflow.grant_connection('kates', %s)", (kate,))
    ciflow_db.sql(f"REVOKE CREATE ON DATABASE {qident(ciflow_db.name)} FROM {kate}")
    with pytest.raises(psycopg2.Error) as e:
        as_role(ciflow_db, kate, "SELECT * FROM ciflow.sync('kates', 'Customer')")
    text = " ".join(str(v) for v in (e.value.diag.message_primary, e.value.diag.message_detail,
                                     e.value.diag.message_hint, e.value.diag.context) if v)
    assert e.value.pgcode == "42501", text
    for internal in ("SQL statement", "CREATE SCHEMA", "INSERT INTO ciflow", "UPDATE ciflow"):
        assert internal not in text, text
    ciflow_db.sql("SELECT ciflow.drop_connection('kates')")


def test_library_exports_only_ciflow_symbols():
    pkglibdir = subprocess.run(["pg_config", "--pkglibdir"], check=True, capture_output=True,
                               text=True).stdout.strip()
    out = subprocess.run(["nm", "-D", "--defined-only", f"{pkglibdir}/ciflow.so"], check=True,
                         capture_output=True, text=True).stdout
    names = [line.split()[-1] for line in out.splitlines() if line.strip()]
    assert names
    odd = [n for n in names if not (n.startswith("ciflow_") or n.startswith("pg_finfo_ciflow_")
                                    or n in ("Pg_magic_func", "_PG_init"))]
    assert odd == [], odd


def test_readme_grants_are_enough_to_sync(ciflow_db, ci_connection, emulator, pg_cluster):
    """The grants of the README's "Security model" section, and nothing more."""
    role = "sec_loader"
    pg_cluster.create_role(role)
    try:
        for stmt in (
                f"GRANT EXECUTE ON FUNCTION ciflow.sync(text, text, text, text, text, text, text,"
                f" boolean), ciflow.get_entities(text) TO {role}",
                f"GRANT SELECT ON ciflow.connections, ciflow.sync_runs, ciflow.sync_progress"
                f" TO {role}",
                f"GRANT CREATE ON DATABASE {qident(ciflow_db.name)} TO {role}",
                f"SELECT ciflow.grant_connection('emu', '{role}')"):
            ciflow_db.sql(stmt)
        assert as_role(ciflow_db, role, "SELECT status, rows FROM ciflow.sync('emu', 'Customer',"
                                        " target => 'loaded.customer')") == [("succeeded", 250)]
        assert as_role(ciflow_db, role, "SELECT count(*) FROM loaded.customer") == [(250,)]
        assert as_role(ciflow_db, role, "SELECT count(*) FROM ciflow.sync_runs") == [(1,)]
        # Without CREATE on the database the schema cannot be made: a clear 42501.
        ciflow_db.sql(f"REVOKE CREATE ON DATABASE {qident(ciflow_db.name)} FROM {role}")
        with raises_sqlstate("42501") as e:
            as_role(ciflow_db, role, "SELECT * FROM ciflow.sync('emu', 'Customer',"
                                     " target => 'other.customer')")
        assert "lacks CREATE on DATABASE" in e.detail, e
        assert e.hint.startswith("GRANT CREATE ON DATABASE"), e
    finally:
        pg_cluster.sql(f"DROP OWNED BY {role} CASCADE", dbname=ciflow_db.name)
        pg_cluster.sql(f"DROP ROLE {role}")
