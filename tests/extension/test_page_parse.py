"""Pages as the loader reads them: PostgreSQL's JSON parser, no document tree.

A page's rows reach the loader field by field (src/pageparse.c), so what a
tree would have hidden must hold here: annotations before, between and
after "value" (nested ones too), fields in another order from row to row,
fields that are no column's, escapes, composite values, and every way a
body can be wrong, each a clear ERROR with the previous table intact and
the run recorded as failed.  The timestamp fast path must read exactly what
PostgreSQL's own input function reads.
"""

import json

import pytest

from extension.cihelpers import (connection_args, create_connection_sql, raises_sqlstate,
                                 sync, table_md5)

ENTITY = "Parsed"
TABLE = "emu.parsed"
META = {"entityType": "profile",
        "attributes": [{"name": "PId", "dataType": "Edm.String"},
                       {"name": "Score", "dataType": "Edm.Int32"},
                       {"name": "Note", "dataType": "Edm.String"},
                       {"name": "Seen", "dataType": "Edm.DateTimeOffset"},
                       {"name": "Extra", "dataType": "Microsoft.Dynamics.CRM.Address"}],
        "keys": [["PId"]]}
DATA_PATH = "/data/Parsed$"


def serve_body(emulator, body, times=1):
    """The next data call on the entity answers 200 with exactly these bytes."""
    emulator.add_fault({"method": "GET", "path": DATA_PATH, "times": times},
                       {"status": 200, "body": "raw", "raw": body,
                        "headers": {"Content-Type": "application/json; odata.metadata=minimal"}})


@pytest.fixture
def parsed(ciflow_db, ci_connection, emulator):
    emulator.set_entity(ENTITY, META, rows=[{"PId": "old", "Score": 1, "Note": None,
                                             "Seen": None, "Extra": None}])
    sync(ciflow_db, "emu", ENTITY)
    return table_md5(ciflow_db, TABLE)


def test_annotations_order_escapes_and_composites(ciflow_db, emulator, parsed):
    body = (
        '{"@odata.context": "https://x/$metadata#Parsed",'
        ' "@odata.count": 3,'
        ' "@vendor.nested": {"value": [{"PId": "not a row"}], "deep": [[{"a": 1}]]},'
        ' "value": ['
        '  {"PId": "a", "Score": 1, "Note": "say \\"hi\\" \\\\ \\u00e9\\ud83d\\ude00",'
        '   "Seen": "2024-05-06T07:08:09.1234567Z", "Extra": {"City": "Oslo", "Street": ["x"]}},'
        '  {"@odata.etag": "W/\\"1\\"", "Extra": null, "Seen": "2024-05-06T07:08:09+02:00",'
        '   "Unknown": {"ignored": [1, 2]}, "Note": "", "Score": -5, "PId": "b"},'
        '  {"Score": 2147483647, "PId": "c", "Note": null, "Seen": null, "Extra": [1, {"k": true}]}'
        ' ],'
        ' "@vendor.after": [1, 2, {"value": []}]'
        '}')
    # One page with everything, then the empty page that ends a $skip pull.
    serve_body(emulator, body)
    emulator.add_fault({"method": "GET", "path": DATA_PATH, "times": 1},
                       {"status": 200, "body": "raw", "raw": '{"value": []}',
                        "headers": {"Content-Type": "application/json"}})
    sync(ciflow_db, "emu", ENTITY)
    rows = ciflow_db.sql(f"SELECT p_id, score, note, seen AT TIME ZONE 'UTC', extra::text"
                         f" FROM {TABLE} ORDER BY p_id")
    assert [(r[0], r[1], r[2], r[3] and r[3].isoformat(), r[4]) for r in rows] == [
        ("a", 1, 'say "hi" \\ \u00e9\U0001F600', "2024-05-06T07:08:09.123456",
         '{"City": "Oslo", "Street": ["x"]}'),
        ("b", -5, "", "2024-05-06T05:08:09", None),
        ("c", 2147483647, None, None, '[1, {"k": true}]'),
    ]
    expected = ciflow_db.sql("SELECT rows_expected FROM ciflow.sync_runs"
                             " ORDER BY id DESC LIMIT 1")[0][0]
    assert expected == 3


BAD_BODIES = [
    # (id, body, SQLSTATE, words of the DETAIL)
    ("truncated", '{"value": [{"PId": "a"}', "22032", "not valid JSON"),
    ("not_json", "<html>sign in</html>", "22032", "not valid JSON"),
    ("no_value", '{"items": []}', "22032", 'no "value" array'),
    ("value_not_array", '{"value": {"PId": "a"}}', "22032", 'no "value" array'),
    ("top_array", '[{"value": []}]', "22032", 'no "value" array'),
    ("row_not_object", '{"value": [{"PId": "a"}, 42]}', "22032", "Row 2 of the page is not a JSON object"),
    ("row_is_array", '{"value": [["PId", "a"]]}', "22032", "Row 1 of the page is not a JSON object"),
    ("nul_escape", '{"value": [{"PId": "a\\u0000b"}]}', "22P05", "not valid JSON"),
    ("bad_escape", '{"value": [{"PId": "a\\qb"}]}', "22032", "not valid JSON"),
    ("lone_surrogate", '{"value": [{"PId": "\\ud83d"}]}', "22032", "not valid JSON"),
    ("invalid_utf8", '{"value": [{"PId": "\udcff"}]}', "22021", "not valid UTF-8"),
    ("trailing_garbage", '{"value": []} x', "22032", "not valid JSON"),
]


@pytest.mark.parametrize("bad", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_bodies_fail_cleanly(ciflow_db, emulator, parsed, bad):
    _, body, sqlstate, words = bad
    serve_body(emulator, body)
    with raises_sqlstate(sqlstate) as err:
        sync(ciflow_db, "emu", ENTITY)
    assert words in (err.detail or ""), err
    assert table_md5(ciflow_db, TABLE) == parsed
    assert ciflow_db.sql("SELECT status FROM ciflow.sync_runs ORDER BY id DESC LIMIT 1") == \
        [("failed",)]


def test_deep_nesting_is_refused_not_a_crash(ciflow_db, emulator, parsed):
    deep = "[" * 200000 + "]" * 200000
    serve_body(emulator, '{"value": [{"PId": "a", "Extra": ' + deep + '}]}')
    with raises_sqlstate("54001"):
        sync(ciflow_db, "emu", ENTITY)
    assert table_md5(ciflow_db, TABLE) == parsed


TIMESTAMPS = [
    "2024-05-06T07:08:09Z", "2024-05-06T07:08:09.1Z", "2024-05-06T07:08:09.123456Z",
    "2024-05-06T07:08:09.1234567Z", "2024-05-06T07:08:09.999999999Z",
    "2024-05-06t07:08:09z", "2024-05-06T07:08:09+00:00", "2024-05-06T07:08:09-05:30",
    "2024-05-06T07:08:09.5+14:00", "2024-05-06T23:59:59-12:00", "2024-02-29T00:00:00Z",
    "2000-01-01T00:00:00Z", "1999-12-31T23:59:59.999999Z", "0001-01-01T00:00:00Z",
    "9999-12-31T23:59:59Z", "1970-01-01T00:00:00Z",
    # Not the fast path's form: the input function reads them.
    "2024-05-06T24:00:00Z", "2024-05-06 07:08:09Z", "2024-05-06T07:08:09",
    "2024-05-06T07:08Z", "2024-05-06T07:08:09+0200", "2024-05-06T07:08:09+02",
    "2024-05-06T07:08:09.Z",
]
BAD_TIMESTAMPS = ["2023-02-29T00:00:00Z", "2024-13-01T00:00:00Z", "2024-05-06T07:60:00Z",
                  "2024-05-06T07:08:09Zjunk"]


@pytest.mark.parametrize("text", TIMESTAMPS)
def test_timestamp_fast_path_reads_what_postgres_reads(ciflow_db, text):
    # PostgreSQL's reading, 7th+ fractional digits truncated as the contract says.
    head, dot, rest = text.partition(".")
    if dot:
        digits = rest[:len(rest) - len(rest.lstrip("0123456789"))]
        zone = rest[len(digits):]
        text_pg = head + "." + digits[:6] + zone
    else:
        text_pg = text
    ours, theirs = ciflow_db.sql(
        "SELECT ciflow.edm_value(to_jsonb(%s::text), 'Edm.DateTimeOffset'),"
        " (%s::timestamptz)::text", (text, text_pg))[0]
    assert ours == theirs


@pytest.mark.parametrize("text", BAD_TIMESTAMPS)
def test_bad_timestamps_are_the_input_functions_errors(ciflow_db, text):
    with raises_sqlstate("22008" if "13-01" in text or "02-29" in text or ":60:" in text
                         else "22007"):
        ciflow_db.sql("SELECT ciflow.edm_value(to_jsonb(%s::text), 'Edm.DateTimeOffset')",
                      (text,))


@pytest.mark.parametrize("text,ok", [("2024-02-29", True), ("0001-01-01", True),
                                     ("2023-02-29", False), ("2024-00-10", False),
                                     ("20240229", True)])
def test_date_fast_path(ciflow_db, text, ok):
    if ok:
        ours, theirs = ciflow_db.sql("SELECT ciflow.edm_value(to_jsonb(%s::text), 'Edm.Date'),"
                                     " (%s::date)::text", (text, text))[0]
        assert ours == theirs
    else:
        with raises_sqlstate("22008"):
            ciflow_db.sql("SELECT ciflow.edm_value(to_jsonb(%s::text), 'Edm.Date')", (text,))


def test_numbers_keep_the_servers_digits(ciflow_db):
    # The lexeme, not a double's rounding: exact decimals, big integers.
    assert ciflow_db.sql("SELECT ciflow.edm_value('12345678901234567890.12345678901'::jsonb,"
                         " 'Edm.Decimal')")[0][0] == "12345678901234567890.12345678901"
    assert ciflow_db.sql("SELECT ciflow.edm_value('9223372036854775807'::jsonb,"
                         " 'Edm.Int64')")[0][0] == "9223372036854775807"
    with raises_sqlstate("22003"):
        ciflow_db.sql("SELECT ciflow.edm_value('9223372036854775808'::jsonb, 'Edm.Int64')")
    with raises_sqlstate("22P02"):
        ciflow_db.sql("SELECT ciflow.edm_value('1.5'::jsonb, 'Edm.Int32')")
    assert json.loads(ciflow_db.sql("SELECT ciflow.edm_value('[1.50, \"x\"]'::jsonb,"
                                    " 'Collection(Edm.Decimal)')")[0][0]) == [1.50, "x"]


@pytest.mark.parametrize("text", ["0b0f2f1e-0000-4000-8000-00000000002a",
                                  "0B0F2F1E-ABCD-4EF0-8000-FFFFFFFFFFFF",
                                  "{0b0f2f1e-0000-4000-8000-00000000002a}",
                                  "0b0f2f1e000040008000000000000002a"[:32]])
def test_guid_fast_path_reads_what_postgres_reads(ciflow_db, text):
    ours, theirs = ciflow_db.sql("SELECT ciflow.edm_value(to_jsonb(%s::text), 'Edm.Guid'),"
                                 " (%s::uuid)::text", (text, text))[0]
    assert ours == theirs


@pytest.mark.parametrize("text", ["0b0f2f1e-0000-4000-8000-00000000002g",
                                  "0b0f2f1e-0000-4000-8000_00000000002a", "not-a-guid"])
def test_bad_guids_are_the_input_functions_errors(ciflow_db, text):
    with raises_sqlstate("22P02"):
        ciflow_db.sql("SELECT ciflow.edm_value(to_jsonb(%s::text), 'Edm.Guid')", (text,))


@pytest.mark.parametrize("json_text,want", [("1.5", "1.5"), ("-0.25e-3", "-0.00025"),
                                            ("1e308", "1e+308"), ('"NaN"', "NaN"),
                                            ('"INF"', "Infinity"), ('"-INF"', "-Infinity"),
                                            ('"2.5"', "2.5")])
def test_double_fast_path(ciflow_db, json_text, want):
    assert ciflow_db.sql("SELECT ciflow.edm_value(%s::jsonb, 'Edm.Double')",
                         (json_text,))[0][0] == want


@pytest.mark.parametrize("json_text,sqlstate", [('"abc"', "22P02"), ("1e999", "22003"),
                                                ("true", "22P02")])
def test_bad_doubles_are_the_types_errors(ciflow_db, json_text, sqlstate):
    with raises_sqlstate(sqlstate):
        ciflow_db.sql("SELECT ciflow.edm_value(%s::jsonb, 'Edm.Double')", (json_text,))


def test_a_latin1_database_gets_its_own_encoding_or_a_clear_error(pg_cluster, emulator):
    """Pages are UTF-8; a LATIN1 database stores what LATIN1 can hold (text,
    names, jsonb) and refuses, with 22P05 and the table intact, what it cannot."""
    name = "ciflow_latin1"
    pg_cluster.sql(f"CREATE DATABASE {name} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C'"
                   " TEMPLATE template0")
    try:
        db = pg_cluster.database(name)
        db.sql("CREATE EXTENSION ciflow")
        create, params = create_connection_sql("emu", connection_args(emulator))
        db.sql(create, params)
        meta = dict(META, attributes=META["attributes"][:3] + [META["attributes"][4]])
        emulator.set_entity(ENTITY, meta, rows=[
            {"PId": "caf\u00e9", "Score": 1, "Note": "na\u00efve \\u00e9", "Extra": {"k\u00e9": "\u00e0"}}])
        sync(db, "emu", ENTITY)
        assert db.sql(f"SELECT p_id, note, extra::text FROM {TABLE}") == [
            ("caf\u00e9", "na\u00efve \\u00e9", '{"k\u00e9": "\u00e0"}')]
        before = table_md5(db, TABLE)
        emulator.set_entity(ENTITY, meta, rows=[
            {"PId": "caf\u00e9", "Score": 1, "Note": "\u65e5\u672c", "Extra": None}])
        with raises_sqlstate("22P05"):
            sync(db, "emu", ENTITY)
        assert table_md5(db, TABLE) == before
    finally:
        pg_cluster.drop_database(name)
