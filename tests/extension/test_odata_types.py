"""The widened Edm type map (sql-api.md section 3) and the conversions of
the values OData services send (A.7), through ciflow.edm_type and
ciflow.edm_value (exactly the map and the conversion a sync uses), and
max_calls => NULL (no client-side call limit)."""

import pytest

from extension.cihelpers import connection_args, raises_sqlstate

MAP = [("Edm.String", "text"), ("Edm.Boolean", "boolean"), ("Edm.Byte", "smallint"),
       ("Edm.SByte", "smallint"), ("Edm.Int16", "smallint"), ("Edm.Int32", "integer"),
       ("Edm.Int64", "bigint"), ("Edm.Single", "real"), ("Edm.Double", "double precision"),
       ("Edm.Decimal", "numeric"), ("Edm.DateTimeOffset", "timestamp with time zone"),
       ("Edm.Date", "date"), ("Edm.TimeOfDay", "time without time zone"),
       ("Edm.Duration", "interval"), ("Edm.Guid", "uuid"), ("Edm.Binary", "bytea"),
       ("edm.int32", "integer"),
       ("Microsoft.Dynamics.CRM.Address", "jsonb"), ("Collection(Edm.String)", "jsonb"),
       ("Edm.GeographyPoint", "jsonb"), ("Some.EnumType", "jsonb")]


@pytest.mark.parametrize("edm,pg", MAP)
def test_edm_type_map(ciflow_db, edm, pg):
    assert ciflow_db.sql("SELECT ciflow.edm_type(%s)::text", (edm,)) == [(pg,)]


def value(db, json_text, edm):
    conn = db.cluster.connect(db.name)
    try:
        with conn.cursor() as cur:
            cur.execute("SET TimeZone = 'UTC'")
            cur.execute("SET IntervalStyle = 'iso_8601'")
            cur.execute("SELECT ciflow.edm_value(%s::jsonb, %s)", (json_text, edm))
            return cur.fetchone()[0]
    finally:
        conn.close()


CONVERSIONS = [
    ("7", "Edm.Int16", "7"),
    ("-32768", "Edm.Int16", "-32768"),
    ('"12"', "Edm.Int16", "12"),
    ("255", "Edm.Byte", "255"),
    ("-128", "Edm.SByte", "-128"),
    ("1.5", "Edm.Single", "1.5"),
    ('"INF"', "Edm.Single", "Infinity"),
    ('"-INF"', "Edm.Double", "-Infinity"),
    ('"NaN"', "Edm.Double", "NaN"),
    ('"23:59:58.1234567"', "Edm.TimeOfDay", "23:59:58.123456"),
    ('"07:05:00"', "Edm.TimeOfDay", "07:05:00"),
    ('"P1DT2H3M4.5S"', "Edm.Duration", "P1DT2H3M4.5S"),
    ('"PT0S"', "Edm.Duration", "PT0S"),
    ('"-PT5M"', "Edm.Duration", "PT-5M"),
    ('"-P2DT1H"', "Edm.Duration", "P-2DT-1H"),
    ('"AP8Q"', "Edm.Binary", "\\x00ff10"),          # base64
    ('"_-8"', "Edm.Binary", "\\xffef"),             # base64url, unpadded
    ('"__8="', "Edm.Binary", "\\xffff"),            # base64url, padded
    ('"aGVsbG8="', "Edm.Binary", "\\x68656c6c6f"),
    ('""', "Edm.Binary", "\\x"),
    ('"2024-05-06T07:08:09.1234567+02:00"', "Edm.DateTimeOffset",
     "2024-05-06 05:08:09.123456+00"),
    ('"2024-05-06T07:08:09-05:30"', "Edm.DateTimeOffset", "2024-05-06 12:38:09+00"),
    ('"2024-05-06T07:08:09Z"', "Edm.DateTimeOffset", "2024-05-06 07:08:09+00"),
    ('"9007199254740993"', "Edm.Int64", "9007199254740993"),
    ("9007199254740993", "Edm.Int64", "9007199254740993"),
    ('"12345678901234567890.123456789"', "Edm.Decimal", "12345678901234567890.123456789"),
    ("0.1", "Edm.Decimal", "0.1"),
    ('"0b0f2f1e-0000-4000-8000-00000000002a"', "Edm.Guid", "0b0f2f1e-0000-4000-8000-00000000002a"),
    ('"2024-02-29"', "Edm.Date", "2024-02-29"),
    ('{"Street": "Main 1", "City": "Oslo"}', "Microsoft.Dynamics.CRM.Address",
     '{"City": "Oslo", "Street": "Main 1"}'),
    ('["a", "b"]', "Collection(Edm.String)", '["a", "b"]'),
]


@pytest.mark.parametrize("json_text,edm,want", CONVERSIONS)
def test_widened_conversions(ciflow_db, json_text, edm, want):
    assert value(ciflow_db, json_text, edm) == want


@pytest.mark.parametrize("json_text,edm,sqlstate", [
    ("40000", "Edm.Int16", "22003"),
    ('"abc$"', "Edm.Binary", "22P02"),
    ('"abcde"', "Edm.Binary", "22P02"),
    ('"a=b="', "Edm.Binary", "22P02"),
    ('"1 day"', "Edm.Duration", "22P02"),
    ('"-1 day"', "Edm.Duration", "22P02"),
    ('"25:00:00"', "Edm.TimeOfDay", "22008"),
])
def test_bad_values_raise_the_types_errors(ciflow_db, json_text, edm, sqlstate):
    with raises_sqlstate(sqlstate):
        value(ciflow_db, json_text, edm)


# ---------------------------------------------------------------------------
# max_calls => NULL

def view_max_calls(db, name):
    return db.sql("SELECT max_calls FROM ciflow.connections WHERE name = %s", (name,))[0][0]


def create_with(db, emu, name, extra):
    """create_connection for the emulator's instance with extra SQL arguments."""
    args = connection_args(emu)
    named = ", ".join(f"{k} => %({k})s" for k in args)
    db.sql(f"SELECT ciflow.create_connection('{name}', {named}, {extra})", args)


def test_max_calls_null_is_no_limit(ciflow_db, emulator):
    create_with(ciflow_db, emulator, "nolimit", "max_calls => NULL, per_interval => '1 hour'")
    try:
        assert view_max_calls(ciflow_db, "nolimit") is None
        # 30 calls in a row, none waiting for a slot (no slot is taken).
        for _ in range(30):
            ciflow_db.sql("SELECT count(*) FROM ciflow.get_items('nolimit', 'Customer', top => 1)")
        ciflow_db.sql("SELECT ciflow.alter_connection('nolimit', page_size => 50)")
        assert view_max_calls(ciflow_db, "nolimit") is None     # the alter kept it

        # alter: a number sets a limit, omitting it keeps it, NULL lifts it.
        ciflow_db.sql("SELECT ciflow.alter_connection('nolimit', max_calls => 5)")
        assert view_max_calls(ciflow_db, "nolimit") == 5
        ciflow_db.sql("SELECT ciflow.alter_connection('nolimit', page_size => 60)")
        assert view_max_calls(ciflow_db, "nolimit") == 5
        ciflow_db.sql("SELECT ciflow.alter_connection('nolimit', max_calls => NULL)")
        assert view_max_calls(ciflow_db, "nolimit") is None
        for bad in (0, 6001):
            with raises_sqlstate("22023"):
                ciflow_db.sql("SELECT ciflow.alter_connection('nolimit', max_calls => %s)",
                              (bad,))
        with raises_sqlstate("22023"):
            create_with(ciflow_db, emulator, "other", "max_calls => -1")
    finally:
        ciflow_db.sql("SELECT ciflow.drop_connection('nolimit', if_exists => true)")


def test_max_calls_null_never_waits(ciflow_db, emulator):
    """With max_calls 1 per hour a second call would wait an hour; with NULL none waits."""
    create_with(ciflow_db, emulator, "nolimit2", "max_calls => 1, per_interval => '1 hour'")
    try:
        ciflow_db.sql("SELECT count(*) FROM ciflow.get_items('nolimit2', 'Customer', top => 1)")
        ciflow_db.sql("SELECT ciflow.alter_connection('nolimit2', max_calls => NULL)")
        conn = ciflow_db.cluster.connect(ciflow_db.name)
        try:
            with conn.cursor() as cur:
                cur.execute("SET statement_timeout = '5s'")
                for _ in range(3):
                    cur.execute("SELECT count(*) FROM ciflow.get_items('nolimit2', 'Customer',"
                                " top => 1)")
        finally:
            conn.close()
    finally:
        ciflow_db.sql("SELECT ciflow.drop_connection('nolimit2', if_exists => true)")
