"""Metadata of OData services (customer-insights-api.md A.7, issue 10):
the service document (get_entities), the CSDL $metadata reader
(describe_entity, get_item's typed keys), for the `odata` flavour (on the
emulator's Customer Insights OData root) and the `dataverse` flavour, and
the reader's refusal of hostile documents.
"""

import json
import uuid

import pytest

from extension.cihelpers import api_requests, connection_args, create_connection_sql, \
    query_of, raises_sqlstate, assert_names

# Every Edm type of sql-api.md section 3, a complex and a collection property,
# and a non-nullable one.
SAMPLER_ATTRS = [("Id", "Edm.Int32"), ("Small", "Edm.Int16"), ("Tiny", "Edm.Byte"),
                 ("Signed", "Edm.SByte"), ("Big", "Edm.Int64"), ("Real", "Edm.Single"),
                 ("Dbl", "Edm.Double"), ("Dec", "Edm.Decimal"), ("Flag", "Edm.Boolean"),
                 ("At", "Edm.DateTimeOffset"), ("Day", "Edm.Date"), ("Clock", "Edm.TimeOfDay"),
                 ("Span", "Edm.Duration"), ("Uid", "Edm.Guid"), ("Blob", "Edm.Binary"),
                 ("Label", "Edm.String"), ("Addr", "Address"),
                 ("Tags", "Collection(Edm.String)")]
PG_TYPES = {"Edm.Int32": "integer", "Edm.Int16": "smallint", "Edm.Byte": "smallint",
            "Edm.SByte": "smallint", "Edm.Int64": "bigint", "Edm.Single": "real",
            "Edm.Double": "double precision", "Edm.Decimal": "numeric", "Edm.Boolean": "boolean",
            "Edm.DateTimeOffset": "timestamp with time zone", "Edm.Date": "date",
            "Edm.TimeOfDay": "time without time zone", "Edm.Duration": "interval",
            "Edm.Guid": "uuid", "Edm.Binary": "bytea", "Edm.String": "text"}
SAMPLER = {"entityType": "profile",
           "attributes": [{"name": n, "dataType": t} for n, t in SAMPLER_ATTRS]
           + [{"name": "Nick", "dataType": "Edm.String", "nullable": False}],
           "keys": [["Id"]]}
SAMPLER_ROWS = [{"Id": i, "Label": "row %d" % i, "Nick": "n%d" % i,
                 "Uid": str(uuid.UUID(int=i))} for i in range(1, 6)]

PARTY = {"entityType": "profile",
         "attributes": [{"name": "PartyId", "dataType": "Edm.Guid"},
                        {"name": "Name", "dataType": "Edm.String"}],
         "keys": [["PartyId"]]}
PERSON = {"entityType": "profile", "baseEntity": "Party",
          "attributes": PARTY["attributes"] + [{"name": "Age", "dataType": "Edm.Int32"}],
          "keys": [["PartyId"]]}
ORDER_LINE = {"entityType": "activity",
              "attributes": [{"name": "OrderId", "dataType": "Edm.String"},
                             {"name": "LineNo", "dataType": "Edm.Int32"},
                             {"name": "Qty", "dataType": "Edm.Decimal"}],
              "keys": [["OrderId", "LineNo"]]}


def _create(db, name, args):
    query, params = create_connection_sql(name, args)
    db.sql(query, params)


@pytest.fixture
def connections(ciflow_db):
    made = []

    def make(name, args):
        _create(ciflow_db, name, args)
        made.append(name)
        return name

    yield make
    for name in made:
        ciflow_db.sql("SELECT ciflow.drop_connection(%s, if_exists => true)", (name,))


@pytest.fixture
def odata(connections, emulator):
    """An `odata` connection on the emulator's Customer Insights OData root."""
    import emulator_client as ec
    emulator.set_entity("Sampler", SAMPLER, rows=SAMPLER_ROWS)
    emulator.set_entity("Party", PARTY)
    emulator.set_entity("Person", PERSON)
    emulator.set_entity("OrderLine", ORDER_LINE,
                        rows=[{"OrderId": "o1", "LineNo": 2, "Qty": 3}])
    emulator.clear_log()
    return connections("od", connection_args(
        emulator, base_url=f"{emulator.base_url}/instances/{ec.INSTANCE_ID}/data",
        flavor="odata", instance_id=None))


@pytest.fixture
def dv(connections, dataverse):
    dataverse.set_entity("Party", dict(PARTY, entitySet="parties"))
    dataverse.set_entity("Person", dict(PERSON, entitySet="people"),
                         rows=[{"PartyId": str(uuid.UUID(int=7)), "Name": "Ada", "Age": 36}])
    dataverse.set_entity("Sampler", dict(SAMPLER, entitySet="samplers"), rows=SAMPLER_ROWS)
    dataverse.clear_log()
    return connections("dv", connection_args(
        dataverse, flavor="dataverse", instance_id=None, scope=None, subscription_key=None))


def describe(db, conn, entity):
    return db.sql("SELECT name, edm_type, column_type::text, nullable, key_position"
                  " FROM ciflow.describe_entity(%s, %s)", (conn, entity))


def only_call(emu, path_end):
    calls = api_requests(emu)
    assert [c["path"].rsplit("/", 1)[-1] for c in calls] == [path_end], calls
    return calls[0]


# ---------------------------------------------------------------------------
# get_entities: the service document

def test_get_entities_odata_lists_the_service_document(ciflow_db, odata, emulator):
    rows = ciflow_db.sql("SELECT name, qualified_name, entity_type, attributes"
                         " FROM ciflow.get_entities('od')")
    import emulator_client as ec
    got = [r[0] for r in rows]
    calls = api_requests(emulator)
    assert len(calls) == 1 and calls[0]["path"].endswith("/data/")
    status, _, body = emulator.request("GET", f"/v1/instances/{ec.INSTANCE_ID}/data/")
    assert status == 200
    assert got == [e["name"] for e in json.loads(body)["value"]]
    assert {"Sampler", "Party", "Person", "OrderLine", "Customer"} <= set(got)
    assert all(r[1] == r[0] and r[2] is None and r[3] is None for r in rows)


def test_get_entities_dataverse_lists_entity_sets(ciflow_db, dv, dataverse):
    got = [r[0] for r in ciflow_db.sql("SELECT name FROM ciflow.get_entities('dv')")]
    calls = api_requests(dataverse)
    assert len(calls) == 1 and calls[0]["path"] == "/api/data/v9.2/"
    status, _, body = dataverse.request("GET", "/api/data/v9.2/")
    assert status == 200
    assert got == [e["name"] for e in json.loads(body)["value"]]
    assert {"parties", "people", "samplers"} <= set(got)


# ---------------------------------------------------------------------------
# The CSDL reader, through describe_entity

@pytest.mark.parametrize("flavor", ["odata", "dataverse"])
def test_every_edm_type_complex_and_collection(ciflow_db, odata, dv, flavor):
    conn, entity = ("od", "Sampler") if flavor == "odata" else ("dv", "samplers")
    rows = describe(ciflow_db, conn, entity)
    ns = "Microsoft.Dynamics.CI" if flavor == "odata" else "Microsoft.Dynamics.CRM"
    want = []
    for n, t in SAMPLER_ATTRS:
        full = t if t.startswith(("Edm.", "Collection(")) else f"{ns}.{t}"
        want.append((n, full, PG_TYPES.get(t, "jsonb"), n != "Id", 1 if n == "Id" else None))
    want.append(("Nick", "Edm.String", "text", False, None))
    assert rows == want


@pytest.mark.parametrize("flavor", ["odata", "dataverse"])
def test_base_type_chain_gives_base_properties_and_key_first(ciflow_db, odata, dv, flavor):
    conn, entity = ("od", "Person") if flavor == "odata" else ("dv", "people")
    assert describe(ciflow_db, conn, entity) == [
        ("PartyId", "Edm.Guid", "uuid", False, 1),
        ("Name", "Edm.String", "text", True, None),
        ("Age", "Edm.Int32", "integer", True, None)]


def test_composite_key(ciflow_db, odata):
    assert describe(ciflow_db, "od", "OrderLine") == [
        ("OrderId", "Edm.String", "text", False, 1),
        ("LineNo", "Edm.Int32", "integer", False, 2),
        ("Qty", "Edm.Decimal", "numeric", True, None)]


def test_metadata_is_asked_as_xml(ciflow_db, dv, dataverse):
    describe(ciflow_db, "dv", "people")
    call = only_call(dataverse, "$metadata")
    accept = call.get("accept") or (call.get("headers") or {}).get("Accept")
    if accept is not None:
        assert "xml" in accept


def test_unknown_entity_set_is_42704(ciflow_db, dv):
    with raises_sqlstate("42704") as err:
        describe(ciflow_db, "dv", "People")       # names are case-sensitive
    assert_names(err, "dv", "People")
    assert "entity set" in err.detail


# ---------------------------------------------------------------------------
# get_item: keys typed by $metadata

def test_get_item_int_key_is_unquoted(ciflow_db, odata, emulator):
    row = ciflow_db.sql("SELECT ciflow.get_item('od', 'Sampler', '3', key_name => 'Id')")[0][0]
    assert row["Id"] == 3 and row["Label"] == "row 3"
    data = [c for c in api_requests(emulator) if c["path"].endswith("/Sampler")]
    assert query_of(data[-1])["$filter"] == "Id eq 3"


def test_get_item_guid_key_is_unquoted(ciflow_db, dv, dataverse):
    key = str(uuid.UUID(int=7))
    row = ciflow_db.sql("SELECT ciflow.get_item('dv', 'people', %s, key_name => 'PartyId')",
                        (key,))[0][0]
    assert row["Name"] == "Ada"
    data = [c for c in api_requests(dataverse) if c["path"].endswith("/people")]
    assert query_of(data[-1])["$filter"] == f"PartyId eq {key}"


def test_get_item_string_key_stays_quoted(ciflow_db, odata, emulator):
    row = ciflow_db.sql("SELECT ciflow.get_item('od', 'Sampler', %s, key_name => 'Label')",
                        ("row 2",))[0][0]
    assert row["Id"] == 2
    data = [c for c in api_requests(emulator) if c["path"].endswith("/Sampler")]
    assert query_of(data[-1])["$filter"] == "Label eq 'row 2'"


@pytest.mark.parametrize("value", ["1 or true", "1)", "x", ""])
def test_get_item_numeric_key_must_be_a_number(ciflow_db, odata, emulator, value):
    with raises_sqlstate("22P02") as err:
        ciflow_db.sql("SELECT ciflow.get_item('od', 'Sampler', %s, key_name => 'Id')", (value,))
    assert_names(err, "od", "Sampler")
    # Nothing but $metadata was asked: the bad literal never went out.
    assert all(not c["path"].endswith("/Sampler") for c in api_requests(emulator))


def test_get_item_unknown_key_property_is_42703(ciflow_db, odata):
    with raises_sqlstate("42703") as err:
        ciflow_db.sql("SELECT ciflow.get_item('od', 'Sampler', '1', key_name => 'Nope')")
    assert "Nope" in err.detail and "Id" in err.hint


@pytest.mark.parametrize("conn", ["od", "dv", "emu"])
def test_get_item_null_key_name_is_an_error(ciflow_db, odata, dv, make_connection, emulator,
                                            conn):
    if conn == "emu":
        make_connection("emu", emulator)
    with raises_sqlstate("22004"):
        ciflow_db.sql(f"SELECT ciflow.get_item('{conn}', 'Sampler', '1', key_name => NULL)")


# ---------------------------------------------------------------------------
# Hostile $metadata documents

CSDL_HEAD = ('<?xml version="1.0"?>\n<edmx:Edmx Version="4.0" '
             'xmlns:edmx="http://docs.oasis-open.org/odata/ns/edmx"><edmx:DataServices>'
             '<Schema Namespace="N" xmlns="http://docs.oasis-open.org/odata/ns/edm">')
CSDL_TAIL = ('<EntityContainer Name="C"><EntitySet Name="Sampler" EntityType="N.T"/>'
             '</EntityContainer></Schema></edmx:DataServices></edmx:Edmx>')
GOOD_TYPE = '<EntityType Name="T"><Key><PropertyRef Name="Id"/></Key>' \
            '<Property Name="Id" Type="Edm.Int32"/></EntityType>'

LAUGHS = ('<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol">'
          + "".join('<!ENTITY lol%d "%s">' % (i, ("&lol%d;" % (i - 1) if i > 1 else "&lol;") * 10)
                    for i in range(1, 10))
          + ']>\n' + CSDL_HEAD[len('<?xml version="1.0"?>\n'):]
          + '<EntityType Name="T"><Key><PropertyRef Name="Id"/></Key>'
            '<Property Name="Id" Type="Edm.Int32"/><Annotation String="&lol9;"/></EntityType>'
          + CSDL_TAIL)
XXE = ('<?xml version="1.0"?>\n<!DOCTYPE x [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n'
       + CSDL_HEAD[len('<?xml version="1.0"?>\n'):]
       + '<EntityType Name="T"><Key><PropertyRef Name="Id"/></Key>'
         '<Property Name="&xxe;" Type="Edm.Int32"/></EntityType>' + CSDL_TAIL)
UNDECLARED = CSDL_HEAD + '<EntityType Name="T&foo;"/>' + CSDL_TAIL
DEEP = CSDL_HEAD + "<Annotation>" * 200 + "</Annotation>" * 200 + GOOD_TYPE + CSDL_TAIL
BROKEN = CSDL_HEAD + GOOD_TYPE + "<EntityContainer"
NOT_V4 = ('<?xml version="1.0"?><edmx:Edmx Version="1.0" '
          'xmlns:edmx="http://schemas.microsoft.com/ado/2007/06/edmx"><edmx:DataServices>'
          '<Schema Namespace="N" xmlns="http://schemas.microsoft.com/ado/2008/09/edm">'
          + GOOD_TYPE + '</Schema></edmx:DataServices></edmx:Edmx>')
LOOP = CSDL_HEAD + ('<EntityType Name="T" BaseType="N.U"/><EntityType Name="U" BaseType="N.T">'
                    '<Key><PropertyRef Name="Id"/></Key></EntityType>') + CSDL_TAIL


def serve_metadata(emu, doc):
    emu.add_fault({"path": r"/\$metadata$"},
                  {"status": 200, "body": "raw", "raw": doc,
                   "headers": {"Content-Type": "application/xml"}})


@pytest.mark.parametrize("doc,sqlstate,words", [
    (LAUGHS, "2200M", "DTD"),
    (XXE, "2200M", "DTD"),
    (UNDECLARED, "2200M", "foo"),
    (DEEP, "54000", "nested"),
    (BROKEN, "2200M", "well-formed"),
    (NOT_V4, "2200M", "OData 4.0"),
    (LOOP, "2200M", "loops"),
], ids=["billion-laughs", "external-entity", "undeclared-entity", "deep-nesting",
        "not-well-formed", "not-odata-4", "base-type-loop"])
def test_hostile_metadata_is_refused(ciflow_db, odata, emulator, doc, sqlstate, words):
    serve_metadata(emulator, doc)
    with raises_sqlstate(sqlstate) as err:
        describe(ciflow_db, "od", "Sampler")
    assert_names(err, "od", "Sampler")
    assert words in err.detail + (err.hint or "")
    assert "root:" not in err.detail          # /etc/passwd was never read
    # The session is fine afterwards, and so is the reader.
    emulator.clear_faults()
    assert describe(ciflow_db, "od", "OrderLine")[0][0] == "OrderId"


def test_oversize_metadata_is_refused(ciflow_db, odata, emulator):
    big = CSDL_HEAD + GOOD_TYPE + "<!-- %s -->" % ("x" * (2 << 20)) + CSDL_TAIL
    serve_metadata(emulator, big)
    conn = ciflow_db.cluster.connect(ciflow_db.name)
    try:
        with conn.cursor() as cur:
            cur.execute("SET ciflow.max_response_size = '1MB'")
            with raises_sqlstate("54000") as err:
                cur.execute("SELECT * FROM ciflow.describe_entity('od', 'Sampler')")
        assert "max_response_size" in err.detail
    finally:
        conn.close()


def test_large_metadata_streams(ciflow_db, odata, emulator):
    """Some 20 MB of types (a Dataverse org's size) read in reasonable time."""
    filler = "".join('<EntityType Name="F%d"><Key><PropertyRef Name="Id"/></Key>%s</EntityType>'
                     % (i, "".join('<Property Name="p%d" Type="Edm.String"/>' % k
                                   for k in range(60)))
                     for i in range(9000))
    doc = CSDL_HEAD + filler + GOOD_TYPE + CSDL_TAIL
    assert len(doc) > 20 << 20
    serve_metadata(emulator, doc)
    assert describe(ciflow_db, "od", "Sampler") == [("Id", "Edm.Int32", "integer", False, 1)]
