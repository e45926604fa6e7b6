"""get_item's key literal, typed by what ciflow knows of the entity (issue 10
item 5; sql-api.md section 2: one call per action).

ciflow.entity_keys remembers each entity's key and property types from every
metadata read ciflow makes (a sync's shape, describe_entity, get_entities on
Customer Insights, get_item's own read on a miss).  So get_item makes one
call when the entity is known and two (metadata, then the row) when it is
not.  The tests count the calls in the emulator's request log.
"""

import uuid

import pytest

from extension.cihelpers import (api_requests, connection_args, create_connection_sql,
                                 raises_sqlstate, assert_names, assert_http_detail,
                                 sync)
from extension.test_actions import item_calls as calls

BIG = 9007199254740993              # 2^53 + 1: exact only as an integer literal

# A system entity (no dataSourceName: $filter is allowed on it) keyed by Int64.
TRANSACTION = {"entityType": "activity",
               "attributes": [{"name": "TransactionId", "dataType": "Edm.Int64"},
                              {"name": "StoreId", "dataType": "Edm.Int32"},
                              {"name": "Label", "dataType": "Edm.String"}],
               "keys": [["TransactionId"]]}
TRANSACTION_ROWS = [{"TransactionId": 1_000_001 + k, "StoreId": 101 + k, "Label": f"t{k}"}
                    for k in range(5)] + [{"TransactionId": BIG, "StoreId": 7, "Label": "big"}]

STORE = {"entityType": "profile",
         "attributes": [{"name": "StoreId", "dataType": "Edm.Int32"},
                        {"name": "Name", "dataType": "Edm.String"}],
         "keys": [["StoreId"]]}
STORE_ROWS = [{"StoreId": 101, "Name": "Berlin"}, {"StoreId": 102, "Name": "O'Hara's"}]

PERSON = {"entityType": "profile",
          "attributes": [{"name": "PersonId", "dataType": "Edm.Guid"},
                         {"name": "Name", "dataType": "Edm.String"},
                         {"name": "Age", "dataType": "Edm.Int32"}],
          "keys": [["PersonId"]]}
PERSON_ROWS = [{"PersonId": str(uuid.UUID(int=k)), "Name": f"p{k}", "Age": 30 + k}
               for k in range(1, 4)]


def strip(row):
    return {k: v for k, v in row.items() if not k.startswith("@")}


def get_item(db, conn, entity, key, key_name, cur=None):
    q = "SELECT ciflow.get_item(%s, %s, %s, key_name => %s)"
    if cur is not None:
        cur.execute(q, (conn, entity, key, key_name))
        return cur.fetchone()[0]
    return db.sql(q, (conn, entity, key, key_name))[0][0]


def cached(db, conn, entity):
    rows = db.sql("SELECT key_names, key_types, property_types FROM ciflow.entity_keys"
                  " WHERE connection = %s AND entity = %s", (conn, entity))
    return rows[0] if rows else None


@pytest.fixture
def ci(ci_connection, emulator):
    emulator.set_entity("Store_Transaction", TRANSACTION, rows=TRANSACTION_ROWS)
    emulator.set_entity("Store", STORE, rows=STORE_ROWS)
    emulator.clear_log()
    return ci_connection


@pytest.fixture
def od(make_connection, emulator):
    """An `odata` connection on the emulator's Customer Insights OData root."""
    import emulator_client as ec
    emulator.set_entity("Store", STORE, rows=STORE_ROWS)
    emulator.set_entity("Person", PERSON, rows=PERSON_ROWS)
    emulator.clear_log()
    return make_connection("od", emulator,
                           base_url=f"{emulator.base_url}/instances/{ec.INSTANCE_ID}/data",
                           flavor="odata", instance_id=None)


@pytest.fixture
def dv(ciflow_db, dataverse):
    dataverse.set_entity("Person", dict(PERSON, entitySet="people"), rows=PERSON_ROWS)
    dataverse.set_entity("Store", dict(STORE, entitySet="stores"), rows=STORE_ROWS)
    dataverse.clear_log()
    query, params = create_connection_sql("dv", connection_args(
        dataverse, flavor="dataverse", instance_id=None, scope=None, subscription_key=None))
    ciflow_db.sql(query, params)
    yield "dv"
    ciflow_db.sql("SELECT ciflow.drop_connection('dv', if_exists => true)")
    ciflow_db.sql("DROP SCHEMA IF EXISTS dv CASCADE")


# ---------------------------------------------------------------------------
# customer_insights

def test_int64_key_first_two_calls_then_one(ciflow_db, ci, emulator):
    row = get_item(ciflow_db, "emu", "Store_Transaction", str(BIG), "TransactionId")
    assert strip(row) == TRANSACTION_ROWS[-1]
    assert calls(emulator) == [("metadata", None), ("data", f"TransactionId eq {BIG}")]
    assert cached(ciflow_db, "emu", "Store_Transaction") == (
        ["TransactionId"], ["Edm.Int64"],
        {"TransactionId": "Edm.Int64", "StoreId": "Edm.Int32", "Label": "Edm.String"})

    emulator.clear_log()
    row = get_item(ciflow_db, "emu", "Store_Transaction", "1000003", "TransactionId")
    assert strip(row) == TRANSACTION_ROWS[2]
    assert calls(emulator) == [("data", "TransactionId eq 1000003")]


def test_int32_key_and_a_quote_in_a_string_key(ciflow_db, ci, emulator):
    assert strip(get_item(ciflow_db, "emu", "Store", "102", "StoreId")) == STORE_ROWS[1]
    assert calls(emulator)[-1] == ("data", "StoreId eq 102")
    emulator.clear_log()
    # key_name need not be the key: any property's type is remembered.
    assert strip(get_item(ciflow_db, "emu", "Store", "O'Hara's", "Name")) == STORE_ROWS[1]
    assert calls(emulator) == [("data", "Name eq 'O''Hara''s'")]
    emulator.clear_log()
    assert get_item(ciflow_db, "emu", "Store", "103", "StoreId") is None
    assert calls(emulator) == [("data", "StoreId eq 103")]


def test_after_a_sync_the_first_get_item_is_one_call(ciflow_db, ci, emulator):
    run = sync(ciflow_db, "emu", "Store_Transaction")
    assert run["status"] == "succeeded" and run["rows"] == len(TRANSACTION_ROWS)
    emulator.clear_log()
    row = get_item(ciflow_db, "emu", "Store_Transaction", "1000002", "TransactionId")
    assert strip(row) == TRANSACTION_ROWS[1]
    assert calls(emulator) == [("data", "TransactionId eq 1000002")]


def test_after_get_entities_the_first_get_item_is_one_call(ciflow_db, ci, emulator):
    ciflow_db.sql("SELECT count(*) FROM ciflow.get_entities('emu')")
    emulator.clear_log()
    assert strip(get_item(ciflow_db, "emu", "Store", "101", "StoreId")) == STORE_ROWS[0]
    assert calls(emulator) == [("data", "StoreId eq 101")]


@pytest.mark.parametrize("value", ["12x", "1 or true", "1.5", "'1'", "", "99999999999999999999",
                                   "2147483648"])
def test_bad_integer_key_is_22p02_before_any_call(ciflow_db, ci, emulator, value):
    get_item(ciflow_db, "emu", "Store", "101", "StoreId")      # StoreId is now known
    emulator.clear_log()
    with raises_sqlstate("22P02") as err:
        get_item(ciflow_db, "emu", "Store", value, "StoreId")
    assert_names(err, "emu", "Store")
    assert "Edm.Int32" in err.hint and "whole number" in err.hint
    assert api_requests(emulator) == []


def test_null_key_name_is_an_error(ciflow_db, ci, emulator):
    for key in ("101", None):
        with raises_sqlstate("22004") as err:
            ciflow_db.sql("SELECT ciflow.get_item('emu', 'Store', %s, key_name => NULL)", (key,))
        assert "key_name" in (err.message + (err.detail or ""))
    assert api_requests(emulator) == []


def test_unknown_property_is_42703(ciflow_db, ci, emulator):
    with raises_sqlstate("42703") as err:
        get_item(ciflow_db, "emu", "Store", "1", "Nope")
    assert "Nope" in err.detail and "StoreId" in err.hint
    # Its metadata was read; the row was never asked for.  (What was read is
    # not remembered: the error rolled back the statement, cache write and all.)
    assert calls(emulator) == [("metadata", None)]
    assert cached(ciflow_db, "emu", "Store") is None


def test_read_only_transaction_still_works_on_a_miss(ciflow_db, ci, emulator):
    conn = ciflow_db.connect()
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("BEGIN")
            cur.execute("SET TRANSACTION READ ONLY")
            row = get_item(ciflow_db, "emu", "Store_Transaction", "1000001", "TransactionId",
                           cur=cur)
            assert strip(row) == TRANSACTION_ROWS[0]
            cur.execute("COMMIT")
    finally:
        conn.close()
    assert calls(emulator) == [("metadata", None), ("data", "TransactionId eq 1000001")]
    # Nothing could be remembered there: the next get_item reads the metadata again.
    assert cached(ciflow_db, "emu", "Store_Transaction") is None
    emulator.clear_log()
    get_item(ciflow_db, "emu", "Store_Transaction", "1000001", "TransactionId")
    assert len(calls(emulator)) == 2


def test_rolled_back_cache_write_costs_nothing_but_a_call(ciflow_db, ci, emulator):
    conn = ciflow_db.connect()
    try:
        with conn, conn.cursor() as cur:
            assert get_item(ciflow_db, "emu", "Store", "101", "StoreId", cur=cur) is not None
            conn.rollback()
    finally:
        conn.close()
    assert cached(ciflow_db, "emu", "Store") is None


def test_a_changed_key_type_is_relearnt(ciflow_db, ci, emulator):
    """The remembered type is out of date: the service's 400 makes ciflow read
    the metadata again and ask with the new literal (three calls, once)."""
    get_item(ciflow_db, "emu", "Store", "101", "StoreId")
    emulator.set_entity("Store", {**STORE, "attributes": [
        {"name": "StoreId", "dataType": "Edm.String"}, {"name": "Name", "dataType": "Edm.String"}]},
        rows=[{"StoreId": "101", "Name": "Berlin"}])
    emulator.clear_log()
    assert strip(get_item(ciflow_db, "emu", "Store", "101", "StoreId")) == \
        {"StoreId": "101", "Name": "Berlin"}
    assert calls(emulator) == [("data", "StoreId eq 101"), ("metadata", None),
                               ("data", "StoreId eq '101'")]
    assert cached(ciflow_db, "emu", "Store")[1] == ["Edm.String"]
    emulator.clear_log()
    get_item(ciflow_db, "emu", "Store", "101", "StoreId")
    assert calls(emulator) == [("data", "StoreId eq '101'")]


def test_a_400_with_an_unchanged_type_stands(ciflow_db, ci, emulator):
    get_item(ciflow_db, "emu", "Store", "101", "StoreId")
    emulator.add_fault({"path": "/data/Store$"}, {"status": 400, "body": "odata"})
    emulator.clear_log()
    with raises_sqlstate("22023") as err:
        get_item(ciflow_db, "emu", "Store", "101", "StoreId")
    assert_http_detail(err, 400)
    assert calls(emulator) == [("data", "StoreId eq 101"), ("metadata", None)]


def test_rows_go_with_the_connection_and_a_change_of_service(ciflow_db, ci, emulator,
                                                             make_connection):
    get_item(ciflow_db, "emu", "Store", "101", "StoreId")
    ciflow_db.sql("SELECT ciflow.alter_connection('emu', page_size => 50)")
    assert cached(ciflow_db, "emu", "Store") is not None       # same service
    ciflow_db.sql("SELECT ciflow.alter_connection('emu', instance_id => 'other')")
    assert cached(ciflow_db, "emu", "Store") is None
    ciflow_db.sql("SELECT ciflow.alter_connection('emu', instance_id => %s)",
                  (connection_args(emulator)["instance_id"],))
    get_item(ciflow_db, "emu", "Store", "101", "StoreId")
    ciflow_db.sql("SELECT ciflow.drop_connection('emu')")
    assert ciflow_db.sql("SELECT count(*) FROM ciflow.entity_keys") == [(0,)]
    make_connection("emu", emulator)        # the fixture drops it again


def test_the_cache_is_not_public(ciflow_db, ci, pg_cluster):
    get_item(ciflow_db, "emu", "Store", "101", "StoreId")
    pg_cluster.sql("DROP ROLE IF EXISTS keys_reader")
    pg_cluster.create_role("keys_reader")
    try:
        reader = pg_cluster.connect(dbname=ciflow_db.name, user="keys_reader")
        try:
            with reader.cursor() as cur, raises_sqlstate("42501"):
                cur.execute("SELECT * FROM ciflow.entity_keys")
        finally:
            reader.close()
        # Granted the table, a role still sees only the connections it may use.
        ciflow_db.sql("GRANT SELECT ON ciflow.entity_keys TO keys_reader")
        reader = pg_cluster.connect(dbname=ciflow_db.name, user="keys_reader")
        try:
            with reader.cursor() as cur:
                cur.execute("SELECT count(*) FROM ciflow.entity_keys")
                assert cur.fetchone() == (0,)
        finally:
            reader.close()
        ciflow_db.sql("SELECT ciflow.grant_connection('emu', 'keys_reader')")
        reader = pg_cluster.connect(dbname=ciflow_db.name, user="keys_reader")
        try:
            with reader.cursor() as cur:
                cur.execute("SELECT entity FROM ciflow.entity_keys")
                assert cur.fetchall() == [("Store",)]
        finally:
            reader.close()
    finally:
        ciflow_db.sql("REVOKE ALL ON ciflow.entity_keys FROM keys_reader")
        ciflow_db.sql("SELECT ciflow.revoke_connection('emu', 'keys_reader')")
        pg_cluster.sql("DROP ROLE IF EXISTS keys_reader")


# ---------------------------------------------------------------------------
# odata and dataverse

def test_odata_int32_key_two_calls_then_one(ciflow_db, od, emulator):
    assert strip(get_item(ciflow_db, "od", "Store", "101", "StoreId")) == STORE_ROWS[0]
    assert calls(emulator) == [("metadata", None), ("data", "StoreId eq 101")]
    emulator.clear_log()
    assert strip(get_item(ciflow_db, "od", "Store", "102", "StoreId")) == STORE_ROWS[1]
    assert calls(emulator) == [("data", "StoreId eq 102")]


def test_odata_guid_key_after_describe_entity_is_one_call(ciflow_db, od, emulator):
    ciflow_db.sql("SELECT count(*) FROM ciflow.describe_entity('od', 'Person')")
    emulator.clear_log()
    key = PERSON_ROWS[1]["PersonId"]
    assert strip(get_item(ciflow_db, "od", "Person", key, "PersonId")) == PERSON_ROWS[1]
    assert calls(emulator) == [("data", f"PersonId eq {key}")]


def test_odata_after_a_sync_is_one_call(ciflow_db, od, emulator):
    assert sync(ciflow_db, "od", "Store")["status"] == "succeeded"
    emulator.clear_log()
    assert strip(get_item(ciflow_db, "od", "Store", "102", "StoreId")) == STORE_ROWS[1]
    assert calls(emulator) == [("data", "StoreId eq 102")]


@pytest.mark.parametrize("value", ["not-a-guid", "00000000000000000000000000000001",
                                   "{00000000-0000-0000-0000-000000000001}",
                                   "00000000-0000-0000-0000-000000000001 or true"])
def test_dataverse_bad_guid_is_22p02_before_any_call(ciflow_db, dv, dataverse, value):
    ciflow_db.sql("SELECT count(*) FROM ciflow.describe_entity('dv', 'people')")
    dataverse.clear_log()
    with raises_sqlstate("22P02") as err:
        get_item(ciflow_db, "dv", "people", value, "PersonId")
    assert "8-4-4-4-12" in err.hint
    assert api_requests(dataverse) == []


def test_dataverse_guid_key_two_calls_then_one(ciflow_db, dv, dataverse):
    key = PERSON_ROWS[2]["PersonId"]
    assert strip(get_item(ciflow_db, "dv", "people", key, "PersonId")) == PERSON_ROWS[2]
    assert calls(dataverse) == [("metadata", None), ("data", f"PersonId eq {key}")]
    dataverse.clear_log()
    key = PERSON_ROWS[0]["PersonId"]
    assert strip(get_item(ciflow_db, "dv", "people", key, "PersonId")) == PERSON_ROWS[0]
    assert calls(dataverse) == [("data", f"PersonId eq {key}")]


def test_dataverse_after_a_sync_is_one_call(ciflow_db, dv, dataverse):
    assert sync(ciflow_db, "dv", "stores")["status"] == "succeeded"
    dataverse.clear_log()
    assert strip(get_item(ciflow_db, "dv", "stores", "101", "StoreId")) == STORE_ROWS[0]
    assert calls(dataverse) == [("data", "StoreId eq 101")]
