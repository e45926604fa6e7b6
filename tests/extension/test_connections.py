"""Connections: create_connection, alter_connection, drop_connection and the
ciflow.connections view (sql-api.md section 1; interfaces.md for names,
defaults and SQLSTATEs), including input validation and privileges.

Secrecy of the stored secrets is tested in test_secrets.py.
"""

import datetime as dt

import psycopg2
import pytest

from extension.cihelpers import (assert_names, connection_args, create_connection_sql,
                                dict_rows, error_fields, last_seq, raises_sqlstate)

VIEW_COLUMNS = {"name", "base_url", "instance_id", "flavor", "token_url", "client_id",
                "scope", "max_calls", "per_interval", "page_size", "ca_file",
                "has_client_secret", "has_subscription_key", "has_bearer_token",
                "created_at", "updated_at"}
SECRET_COLUMNS = {"client_secret", "subscription_key", "bearer_token"}


def view_row(db, name):
    rows = dict_rows(db, "SELECT * FROM ciflow.connections WHERE name = %s", (name,))
    return rows[0] if rows else None


def alter(db, name, **kw):
    named = "".join(f", {k} => %({k})s" for k in kw)
    db.sql(f"SELECT ciflow.alter_connection(%(name)s{named})", dict(kw, name=name))


def create(db, name, emu, **overrides):
    query, params = create_connection_sql(name, connection_args(emu, **overrides))
    db.sql(query, params)


@pytest.fixture
def fresh(ciflow_db):
    """Names used by a test are dropped afterwards, whatever happened."""
    names = []
    yield names.append
    for n in names:
        try:
            ciflow_db.sql("SELECT ciflow.drop_connection(%s, if_exists => true)", (n,))
        except psycopg2.Error:
            pass  # an invalid name was never created; dropping it may be refused


def test_create_shows_every_setting_but_no_secret(ciflow_db, make_connection, emulator):
    import emulator_client as ec
    make_connection("emu", emulator, page_size=250, max_calls=7, per_interval="2 minutes")
    row = view_row(ciflow_db, "emu")
    assert row is not None
    assert VIEW_COLUMNS <= set(row), f"missing columns {VIEW_COLUMNS - set(row)}"
    assert not SECRET_COLUMNS & set(row)
    assert row["base_url"] == emulator.base_url
    assert row["instance_id"] == ec.INSTANCE_ID
    assert row["flavor"] == "customer_insights"
    assert row["token_url"] == emulator.token_url
    assert row["client_id"] == ec.CLIENT_ID
    assert row["scope"] == ec.SCOPE
    assert (row["max_calls"], row["per_interval"], row["page_size"]) == \
        (7, dt.timedelta(minutes=2), 250)
    assert row["ca_file"] is None
    assert (row["has_client_secret"], row["has_subscription_key"], row["has_bearer_token"]) == \
        (True, True, False)
    assert row["created_at"] is not None and row["updated_at"] is not None


def test_create_defaults(ciflow_db, fresh, emulator):
    fresh("minimal")
    # instance_id is needed by the customer_insights flavour (its paths hold it).
    ciflow_db.sql("SELECT ciflow.create_connection('minimal', base_url => %s,"
                  " instance_id => 'i-1', bearer_token => 'x', subscription_key => 'k')",
                  (emulator.base_url,))
    row = view_row(ciflow_db, "minimal")
    assert (row["flavor"], row["max_calls"], row["per_interval"], row["page_size"]) == \
        ("customer_insights", 100, dt.timedelta(seconds=60), 100)
    assert (row["has_client_secret"], row["has_subscription_key"], row["has_bearer_token"]) == \
        (False, True, True)


def test_alter_changes_only_what_is_named(ciflow_db, make_connection, emulator):
    make_connection("emu", emulator)
    before = view_row(ciflow_db, "emu")
    alter(ciflow_db, "emu", page_size=500, max_calls=10)
    after = view_row(ciflow_db, "emu")
    assert (after["page_size"], after["max_calls"]) == (500, 10)
    unchanged = {k: v for k, v in before.items()
                 if k not in ("page_size", "max_calls", "updated_at")}
    assert {k: after[k] for k in unchanged} == unchanged
    assert after["updated_at"] >= before["updated_at"]


def test_alter_empty_string_clears_and_null_keeps(ciflow_db, make_connection, emulator):
    # Any file the server can read will do: the connection never uses TLS here.
    make_connection("emu", emulator, ca_file=ciflow_db.cluster.install_file(__file__, "ca.pem"),
                    bearer_token="static-token")
    assert view_row(ciflow_db, "emu")["has_bearer_token"] is True
    alter(ciflow_db, "emu", ca_file="", bearer_token="", scope=None)
    row = view_row(ciflow_db, "emu")
    assert row["ca_file"] is None
    assert row["has_bearer_token"] is False
    assert row["scope"] is not None             # NULL means unchanged
    assert row["has_client_secret"] is True     # not named: unchanged
    assert row["has_subscription_key"] is True


def test_alter_secret_takes_effect(ciflow_db, make_connection, emulator):
    make_connection("emu", emulator)
    alter(ciflow_db, "emu", client_secret="not-the-secret")
    # A rejected client secret is the token endpoint's 401: 28000.
    with raises_sqlstate("28000") as err:
        ciflow_db.sql("SELECT count(*) FROM ciflow.get_entities('emu')")
    assert_names(err, "emu")
    import emulator_client as ec
    alter(ciflow_db, "emu", client_secret=ec.CLIENT_SECRET)
    assert ciflow_db.sql("SELECT count(*) FROM ciflow.get_entities('emu')")[0][0] > 0


def test_alter_rejects_bad_values_and_keeps_old_ones(ciflow_db, make_connection, emulator):
    make_connection("emu", emulator)
    before = view_row(ciflow_db, "emu")
    for kw in ({"page_size": 0}, {"base_url": "ftp://example.com/v1"},
               {"flavor": "soap"}, {"max_calls": 0}):
        with raises_sqlstate("22023"):
            alter(ciflow_db, "emu", **kw)
    assert view_row(ciflow_db, "emu") == before


def test_drop_removes_settings_and_secrets(ciflow_db, make_connection, emulator):
    make_connection("emu", emulator)
    ciflow_db.sql("SELECT ciflow.drop_connection('emu')")
    assert view_row(ciflow_db, "emu") is None
    # Superusers can look at the secret store: nothing may linger there.
    leftovers = ciflow_db.sql(
        "SELECT count(*) FROM ciflow.connection_secrets WHERE connection = 'emu'")[0][0]
    assert leftovers == 0
    with raises_sqlstate("42704") as err:
        ciflow_db.sql("SELECT ciflow.drop_connection('emu')")
    assert_names(err, "emu")
    ciflow_db.sql("SELECT ciflow.drop_connection('emu', if_exists => true)")


def test_duplicate_name(ciflow_db, make_connection, emulator):
    make_connection("emu", emulator)
    # Assumption (interfaces.md is silent): PostgreSQL's duplicate_object, 42710.
    with raises_sqlstate("42710") as err:
        create(ciflow_db, "emu", emulator)
    assert_names(err, "emu")


def test_unknown_connection_everywhere(ciflow_db):
    calls = [
        "SELECT ciflow.alter_connection('nosuch', page_size => 5)",
        "SELECT ciflow.drop_connection('nosuch')",
        "SELECT * FROM ciflow.get_entities('nosuch')",
        "SELECT * FROM ciflow.get_items('nosuch', 'Customer')",
        "SELECT ciflow.get_item('nosuch', 'Customer', '1')",
        "SELECT * FROM ciflow.sync('nosuch', 'Customer')",
    ]
    for query in calls:
        with raises_sqlstate("42704") as err:
            ciflow_db.sql(query)
        assert_names(err, "nosuch")


@pytest.mark.parametrize("name", ["Contoso", "bad name", "1abc", "", "a" * 64, "semi;colon",
                                  "dash-name", "zoë", 'quo"te'])
def test_bad_connection_names(ciflow_db, fresh, emulator, name):
    fresh(name)
    with raises_sqlstate("42602"):
        create(ciflow_db, name, emulator)


@pytest.mark.parametrize("name", ["contoso_2", "_x", "a" * 63])
def test_good_connection_names(ciflow_db, fresh, emulator, name):
    fresh(name)
    create(ciflow_db, name, emulator)
    assert view_row(ciflow_db, name)["name"] == name


@pytest.mark.parametrize("setting,value", [
    ("base_url", "ftp://127.0.0.1/v1"),
    ("base_url", "file:///etc/passwd"),
    ("base_url", "not a url"),
    ("base_url", ""),
    ("base_url", "http://"),
    ("base_url", "https://exa mple.com/v1"),
    ("token_url", "ldap://127.0.0.1/token"),
    ("token_url", "gopher://127.0.0.1/"),
    ("flavor", "soap"),
    ("page_size", 0),
    ("page_size", -5),
    ("max_calls", 0),
    ("per_interval", "0 seconds"),
])
def test_bad_settings(ciflow_db, fresh, emulator, setting, value):
    fresh("badset")
    with raises_sqlstate("22023") as err:
        create(ciflow_db, "badset", emulator, **{setting: value})
    assert_names(err, "badset")
    assert view_row(ciflow_db, "badset") is None


@pytest.mark.parametrize("missing", [
    # No way to get a token at all.
    {"token_url": None, "client_id": None, "client_secret": None},
    # A token endpoint but no secret to present to it.
    {"client_secret": None},
])
def test_missing_credentials(ciflow_db, fresh, emulator, missing):
    """22023 with a HINT, at create time or, at the latest, at first use
    before any request is sent (the contract does not say which)."""
    fresh("nocreds")
    seq = last_seq(emulator)
    try:
        create(ciflow_db, "nocreds", emulator, **missing)
    except psycopg2.Error as e:
        f = error_fields(e)
        assert f["code"] == "22023", f
        assert f["hint"], f"no HINT: {f}"
        return
    with raises_sqlstate("22023") as err:
        ciflow_db.sql("SELECT * FROM ciflow.get_entities('nocreds')")
    assert err.hint, f"no HINT: {err!r}"
    assert_names(err, "nocreds")
    assert [e for e in emulator.log(seq) if e["seq"] > seq] == [], \
        "a request was sent without credentials"


def test_nothing_executable_by_public(ciflow_db, pg_cluster, fresh, emulator):
    """A role that was granted nothing can use no function and read no table."""
    role = "nobody_" + ciflow_db.name
    pg_cluster.create_role(role)
    try:
        fresh("pubtest")
        create(ciflow_db, "pubtest", emulator)
        probes = [
            "SELECT * FROM ciflow.connections",
            "SELECT * FROM ciflow.sync_runs",
            "SELECT * FROM ciflow.sync_progress",
            "SELECT * FROM ciflow.connection_secrets",
            "SELECT ciflow.create_connection('x', base_url => 'http://127.0.0.1/v1',"
            " bearer_token => 't')",
            "SELECT ciflow.alter_connection('pubtest', page_size => 5)",
            "SELECT ciflow.drop_connection('pubtest')",
            "SELECT * FROM ciflow.get_entities('pubtest')",
            "SELECT * FROM ciflow.get_items('pubtest', 'Customer')",
            "SELECT ciflow.get_item('pubtest', 'Customer', '1')",
            "SELECT * FROM ciflow.sync('pubtest', 'Customer')",
        ]
        for q in probes:
            with raises_sqlstate("42501"):
                ciflow_db.sql(q, user=role)
        assert view_row(ciflow_db, "pubtest") is not None
    finally:
        pg_cluster.sql(f'DROP OWNED BY "{role}"', dbname=ciflow_db.name)
        pg_cluster.sql(f'DROP ROLE "{role}"')
