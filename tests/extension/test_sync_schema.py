"""ciflow.sync, full mode: the shape of the target table (sql-api.md section 3).

Typed columns from the entity's metadata for every Edm type, snake_case
column names with the original names as comments, the entity key as primary
key, the default target <connection>.<snake_entity>, explicit targets
(qualified and unqualified), exact values for edge cases, and the returned
run row. Paging and consistency are in test_sync_paging.py and
test_sync_consistency.py.
"""

import datetime as dt
import decimal
import uuid

import pytest

from extension.cihelpers import (dict_rows, pg_type_for, primary_key_columns, regclass_of,
                                 run_row, session, snake, sync, table_columns)

# One attribute per Edm type of A.3, plus one the contract does not know.
ZOO_ATTRIBUTES = [
    ("ZooId", "Edm.String"),
    ("FullName", "Edm.String"),
    ("SmallNumber", "Edm.Int16"),
    ("LoyaltyPoints", "Edm.Int32"),
    ("PurchaseCount", "Edm.Int64"),
    ("ByteValue", "Edm.Byte"),
    ("SignedByte", "Edm.SByte"),
    ("LifetimeValue", "Edm.Decimal"),
    ("ChurnScore", "Edm.Double"),
    ("SingleValue", "Edm.Single"),
    ("IsActive", "Edm.Boolean"),
    ("BirthDate", "Edm.Date"),
    ("CreatedOn", "Edm.DateTimeOffset"),
    ("OpensAt", "Edm.TimeOfDay"),
    ("ExternalRef", "Edm.Guid"),
    ("Photo", "Edm.Binary"),
    ("Location", "Edm.GeographyPoint"),
]
ZOO = {"entityType": "profile",
       "attributes": [{"name": n, "dataType": t} for n, t in ZOO_ATTRIBUTES],
       "keys": [["ZooId"]]}
ZOO_ROWS = [
    {"ZooId": "a", "FullName": "Zoë \"Q\" O'Hara \\ 😀\nline2\ttab", "SmallNumber": -12,
     "LoyaltyPoints": 2147483647, "PurchaseCount": 9007199254740993, "ByteValue": 255,
     "SignedByte": -128, "LifetimeValue": 1520.75, "ChurnScore": 0.1,
     "SingleValue": 1.5, "IsActive": True, "BirthDate": "2024-02-29",
     "CreatedOn": "2025-03-01T02:13:00.1234567Z", "OpensAt": "13:45:30.5000000",
     "ExternalRef": "6F9619FF-8B86-D011-B42D-00C04FC964FF", "Photo": "AAEC/w==",
     "Location": {"type": "Point", "coordinates": [13.4, 52.5]}},
    {"ZooId": "b", "FullName": None, "SmallNumber": None, "LoyaltyPoints": None,
     "PurchaseCount": None, "ByteValue": None, "SignedByte": None, "LifetimeValue": None,
     "ChurnScore": None, "SingleValue": None, "IsActive": None, "BirthDate": None,
     "CreatedOn": None, "OpensAt": None, "ExternalRef": None, "Photo": None, "Location": None},
    {"ZooId": "c", "FullName": "", "SmallNumber": 0, "LoyaltyPoints": -2147483648,
     "PurchaseCount": -9223372036854775808, "ByteValue": 0, "SignedByte": 127,
     "LifetimeValue": -0.01, "ChurnScore": -1.5e300, "SingleValue": 0,
     "IsActive": False, "BirthDate": "0001-01-01", "CreatedOn": "1999-12-31T23:59:59.9999999Z",
     "OpensAt": "00:00:00", "ExternalRef": "00000000-0000-0000-0000-000000000000",
     "Photo": "", "Location": None},
]
UTC = dt.timezone.utc

# What each row must read back as, column by column (psycopg2 values).
EXPECTED = {
    "a": {"full_name": "Zoë \"Q\" O'Hara \\ 😀\nline2\ttab", "small_number": -12,
          "loyalty_points": 2147483647, "purchase_count": 9007199254740993, "byte_value": 255,
          "signed_byte": -128, "lifetime_value": decimal.Decimal("1520.75"), "churn_score": 0.1,
          "single_value": 1.5, "is_active": True, "birth_date": dt.date(2024, 2, 29),
          # 7 fractional digits are truncated to microseconds (A.1), not rounded.
          "created_on": dt.datetime(2025, 3, 1, 2, 13, 0, 123456, tzinfo=UTC),
          "opens_at": dt.time(13, 45, 30, 500000),
          "external_ref": "6f9619ff-8b86-d011-b42d-00c04fc964ff",
          "photo": b"\x00\x01\x02\xff", "location": {"type": "Point", "coordinates": [13.4, 52.5]}},
    "b": {k: None for k in ("full_name", "small_number", "loyalty_points", "purchase_count",
                            "byte_value", "signed_byte", "lifetime_value", "churn_score",
                            "single_value", "is_active", "birth_date", "created_on", "opens_at",
                            "external_ref", "photo", "location")},
    "c": {"full_name": "", "small_number": 0, "loyalty_points": -2147483648,
          "purchase_count": -9223372036854775808, "byte_value": 0, "signed_byte": 127,
          "lifetime_value": decimal.Decimal("-0.01"), "churn_score": -1.5e300, "single_value": 0,
          "is_active": False, "birth_date": dt.date(1, 1, 1),
          "created_on": dt.datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
          "opens_at": dt.time(0, 0), "external_ref": "00000000-0000-0000-0000-000000000000",
          "photo": b"", "location": None},
}


@pytest.fixture
def zoo(emulator, ci_connection, ciflow_db):
    emulator.set_entity("TypeZoo", ZOO, rows=ZOO_ROWS)
    yield ci_connection
    for schema in ("crm", "work"):
        ciflow_db.sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def assert_zoo_table(db, schema, table):
    cols = table_columns(db, schema, table)
    assert [c[0] for c in cols] == [snake(n) for n, _ in ZOO_ATTRIBUTES]
    for (col, data_type, comment), (name, edm) in zip(cols, ZOO_ATTRIBUTES):
        assert data_type == pg_type_for(edm), f"{name} ({edm}) became {data_type}"
        assert comment == name, f"comment of {col} is {comment!r}, not {name!r}"
    assert primary_key_columns(db, schema, table) == ["zoo_id"]
    rows = dict_rows(db, f"SELECT * FROM {schema}.{table} ORDER BY zoo_id")
    assert [r["zoo_id"] for r in rows] == ["a", "b", "c"]
    for r in rows:
        got = {k: v for k, v in r.items() if k != "zoo_id"}
        # uuid comes back as str from psycopg2 unless registered: compare text.
        if got["external_ref"] is not None:
            got["external_ref"] = str(uuid.UUID(str(got["external_ref"])))
        # bytea comes back as a memoryview.
        if got["photo"] is not None:
            got["photo"] = bytes(got["photo"])
        assert got == EXPECTED[r["zoo_id"]], r["zoo_id"]


def test_default_target_types_names_comments_key(ciflow_db, zoo):
    run = sync(ciflow_db, "emu", "TypeZoo")
    assert run["status"] == "succeeded", run
    assert (run["connection"], run["entity"], run["mode"], run["rows"]) == \
        ("emu", "TypeZoo", "full", 3)
    assert run["finished_at"] is not None and run["finished_at"] >= run["started_at"]
    assert run["error"] is None
    assert regclass_of(ciflow_db, run["target"]) == regclass_of(ciflow_db, "emu.type_zoo")
    assert run_row(ciflow_db, run["id"]) == run
    assert_zoo_table(ciflow_db, "emu", "type_zoo")


def test_explicit_qualified_target(ciflow_db, zoo):
    ciflow_db.sql("CREATE SCHEMA crm")
    run = sync(ciflow_db, "emu", "TypeZoo", target="crm.zoo_copy")
    assert run["status"] == "succeeded"
    assert regclass_of(ciflow_db, run["target"]) == regclass_of(ciflow_db, "crm.zoo_copy")
    assert regclass_of(ciflow_db, "emu.type_zoo") is None
    assert_zoo_table(ciflow_db, "crm", "zoo_copy")


def test_explicit_unqualified_target_follows_search_path(ciflow_db, zoo):
    ciflow_db.sql("CREATE SCHEMA work")
    with session(ciflow_db, {"search_path": "work, public"}) as conn:
        run = sync(ciflow_db, "emu", "TypeZoo", conn=conn, target="zoo_plain")
    assert run["status"] == "succeeded"
    assert regclass_of(ciflow_db, run["target"]) == regclass_of(ciflow_db, "work.zoo_plain")
    assert regclass_of(ciflow_db, "public.zoo_plain") is None
    assert_zoo_table(ciflow_db, "work", "zoo_plain")


def test_entity_name_with_underscore(ciflow_db, ci_connection, emulator):
    emulator.set_entity("RetailPos_Transactions",
                        {"entityType": "activity", "dataSourceName": "RetailPos",
                         "attributes": [{"name": "TransactionId", "dataType": "Edm.String"},
                                        {"name": "Amount", "dataType": "Edm.Decimal"}],
                         "keys": [["TransactionId"]]},
                        rows=[{"TransactionId": "t1", "Amount": 9.99}])
    run = sync(ciflow_db, "emu", "RetailPos_Transactions")
    assert regclass_of(ciflow_db, run["target"]) == \
        regclass_of(ciflow_db, "emu.retail_pos_transactions")
    assert ciflow_db.sql("SELECT transaction_id, amount FROM emu.retail_pos_transactions") == \
        [("t1", decimal.Decimal("9.99"))]


def test_composite_key(ciflow_db, ci_connection, emulator):
    emulator.set_entity("OrderLine",
                        {"entityType": "activity",
                         "attributes": [{"name": "OrderId", "dataType": "Edm.String"},
                                        {"name": "LineNo", "dataType": "Edm.Int32"},
                                        {"name": "Qty", "dataType": "Edm.Int32"}],
                         "keys": [["OrderId", "LineNo"]]},
                        rows=[{"OrderId": "o1", "LineNo": 1, "Qty": 3},
                              {"OrderId": "o1", "LineNo": 2, "Qty": 4},
                              {"OrderId": "o2", "LineNo": 1, "Qty": 5}])
    sync(ciflow_db, "emu", "OrderLine")
    assert primary_key_columns(ciflow_db, "emu", "order_line") == ["order_id", "line_no"]
    assert ciflow_db.sql("SELECT order_id, line_no, qty FROM emu.order_line ORDER BY 1, 2") == \
        [("o1", 1, 3), ("o1", 2, 4), ("o2", 1, 5)]


def test_resync_keeps_table_and_replaces_rows(ciflow_db, zoo, emulator):
    sync(ciflow_db, "emu", "TypeZoo")
    oid = regclass_of(ciflow_db, "emu.type_zoo")
    emulator.set_entity("TypeZoo", ZOO, rows=[dict(ZOO_ROWS[0], ZooId="z")])
    run = sync(ciflow_db, "emu", "TypeZoo")
    assert run["rows"] == 1
    assert ciflow_db.sql("SELECT zoo_id FROM emu.type_zoo") == [("z",)]
    # Not asserted: whether the table keeps its OID (a swap may replace it);
    # test_sync_consistency.py checks that views and grants survive.
    assert oid is not None


# Types a sync mapped to jsonb before the Edm map was widened (issue 10).
OLD_JSONB = {"small_number", "byte_value", "signed_byte", "single_value", "opens_at", "photo"}


def test_jsonb_columns_of_an_earlier_sync_stay_jsonb(ciflow_db, zoo):
    """A target made when Int16, Byte, SByte, Single, TimeOfDay and Binary
    landed in jsonb keeps those columns, loaded as jsonb, instead of failing
    with 42804; a column the user converts is loaded with its new type."""
    cols = ", ".join(f"{snake(n)} {'jsonb' if snake(n) in OLD_JSONB else pg_type_for(t)}"
                     for n, t in ZOO_ATTRIBUTES)
    ciflow_db.sql("CREATE SCHEMA crm")
    ciflow_db.sql(f"CREATE TABLE crm.zoo_old ({cols}, PRIMARY KEY (zoo_id))")
    run = sync(ciflow_db, "emu", "TypeZoo", target="crm.zoo_old")
    assert run["status"] == "succeeded" and run["inserted"] == 3, run
    types = {c: t for c, t, _ in table_columns(ciflow_db, "crm", "zoo_old")}
    assert {c for c, t in types.items() if t == "jsonb"} == OLD_JSONB | {"location"}
    a = dict_rows(ciflow_db, "SELECT * FROM crm.zoo_old WHERE zoo_id = 'a'")[0]
    assert (a["small_number"], a["byte_value"], a["signed_byte"], a["single_value"],
            a["opens_at"], a["photo"]) == (-12, 255, -128, 1.5, "13:45:30.5000000", "AAEC/w==")
    assert a["loyalty_points"] == 2147483647 and a["location"]["type"] == "Point"
    # Nothing changed: the re-sync writes nothing.
    again = sync(ciflow_db, "emu", "TypeZoo", target="crm.zoo_old")
    assert (again["status"], again["inserted"], again["updated"], again["deleted"]) == \
        ("succeeded", 0, 0, 0), again
    # Converted by the user: filled with the mapped type from then on.
    ciflow_db.sql("ALTER TABLE crm.zoo_old ALTER COLUMN small_number TYPE smallint"
                  " USING (small_number #>> '{}')::smallint")
    ciflow_db.sql("UPDATE crm.zoo_old SET small_number = 7 WHERE zoo_id = 'a'")
    third = sync(ciflow_db, "emu", "TypeZoo", target="crm.zoo_old")
    assert (third["status"], third["updated"]) == ("succeeded", 1), third
    assert ciflow_db.sql("SELECT small_number, pg_typeof(small_number)::text FROM crm.zoo_old"
                         " WHERE zoo_id = 'a'") == [(-12, "smallint")]
