"""ciflow against a real OData v4 server that nobody here wrote: SAP's Fiori
elements mock server (@sap-ux/fe-mockserver-core, from npm), which serves an
EDMX $metadata and JSON mock data the way SAP services do -- including an
Atom XML service document, so get_entities falls back to $metadata's
entity container.

The package is installed with npm into a cache directory (CIFLOW_NPM_DIR,
default /tmp/ciflow-npm) on first use; the server runs on a loopback port,
started and stopped by the fixture.  Without node/npm or the registry the
tests are skipped, saying why.
"""

import decimal
import json
import os
import shutil
import subprocess
import tempfile
import time

import pytest

from extension.cihelpers import raises_sqlstate

PACKAGE = "@sap-ux/fe-mockserver-core@1.7.16"
NPM_DIR = os.environ.get("CIFLOW_NPM_DIR", "/tmp/ciflow-npm")

METADATA = """<?xml version="1.0" encoding="utf-8"?>
<edmx:Edmx Version="4.0" xmlns:edmx="http://docs.oasis-open.org/odata/ns/edmx">
  <edmx:DataServices>
    <Schema Namespace="com.example.shop" Alias="shop" xmlns="http://docs.oasis-open.org/odata/ns/edm">
      <EntityType Name="Product">
        <Key><PropertyRef Name="ID"/></Key>
        <Property Name="ID" Type="Edm.Int32" Nullable="false"/>
        <Property Name="Name" Type="Edm.String"/>
        <Property Name="Price" Type="Edm.Decimal" Precision="10" Scale="2"/>
        <Property Name="Stock" Type="Edm.Int16"/>
        <Property Name="Available" Type="Edm.Boolean"/>
        <Property Name="ReleaseDate" Type="Edm.Date"/>
        <NavigationProperty Name="Lines" Type="Collection(shop.OrderLine)"/>
      </EntityType>
      <EntityType Name="OrderLine">
        <Key><PropertyRef Name="OrderID"/><PropertyRef Name="LineNo"/></Key>
        <Property Name="OrderID" Type="Edm.String" Nullable="false"/>
        <Property Name="LineNo" Type="Edm.Int32" Nullable="false"/>
        <Property Name="ProductID" Type="Edm.Int32"/>
        <Property Name="Quantity" Type="Edm.Int32"/>
      </EntityType>
      <EntityContainer Name="EntityContainer">
        <EntitySet Name="Products" EntityType="shop.Product"/>
        <EntitySet Name="OrderLines" EntityType="com.example.shop.OrderLine"/>
      </EntityContainer>
    </Schema>
  </edmx:DataServices>
</edmx:Edmx>
"""

PRODUCTS = [{"ID": i, "Name": "Product %d" % i, "Price": i * 1.25, "Stock": i * 3,
             "Available": i % 2 == 0, "ReleaseDate": "2024-01-%02d" % (i % 28 + 1)}
            for i in range(1, 26)]
ORDER_LINES = [{"OrderID": "o%d" % (i // 3), "LineNo": i % 3, "ProductID": i % 25 + 1,
                "Quantity": i} for i in range(12)]

SERVER_JS = """
const http = require('http');
const FEMockserver = require('@sap-ux/fe-mockserver-core').default;
const [metadata, data] = process.argv.slice(2);
const server = new FEMockserver({
  services: [{ urlPath: '/odata/shop', metadataPath: metadata, mockdataPath: data,
               generateMockData: false, noETag: true }],
  annotations: []
});
server.isReady.then(() => {
  const router = server.getRouter();
  const srv = http.createServer((req, res) =>
    router(req, res, () => { res.statusCode = 404; res.end(); }));
  srv.listen(0, '127.0.0.1', () => console.log('READY ' + srv.address().port));
});
"""


def _install():
    """The package's node_modules, installing it on first use; or a skip reason."""
    modules = os.path.join(NPM_DIR, "node_modules")
    if os.path.isdir(os.path.join(modules, "@sap-ux", "fe-mockserver-core")):
        return modules, None
    if shutil.which("node") is None or shutil.which("npm") is None:
        return None, "node and npm are not installed (Debian: nodejs)"
    os.makedirs(NPM_DIR, exist_ok=True)
    r = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", NPM_DIR, PACKAGE],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        return None, "npm install %s failed: %s" % (PACKAGE, r.stderr[-500:])
    return modules, None


@pytest.fixture(scope="module")
def shop_server():
    modules, reason = _install()
    if modules is None:
        pytest.skip(reason)
    tmp = tempfile.mkdtemp(prefix="ciflow-odata-")
    os.makedirs(os.path.join(tmp, "data"))
    with open(os.path.join(tmp, "metadata.xml"), "w") as f:
        f.write(METADATA)
    for name, rows in (("Products", PRODUCTS), ("OrderLines", ORDER_LINES)):
        with open(os.path.join(tmp, "data", name + ".json"), "w") as f:
            json.dump(rows, f)
    with open(os.path.join(tmp, "server.js"), "w") as f:
        f.write(SERVER_JS)
    proc = subprocess.Popen(["node", os.path.join(tmp, "server.js"),
                             os.path.join(tmp, "metadata.xml"), os.path.join(tmp, "data")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, NODE_PATH=modules))
    try:
        deadline = time.monotonic() + 30
        line = ""
        while time.monotonic() < deadline and not line.startswith("READY"):
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                pytest.fail("the OData server exited: %s" % proc.stderr.read()[-2000:])
        if not line.startswith("READY"):
            pytest.fail("the OData server did not start in 30 s")
        yield "http://127.0.0.1:%d/odata/shop" % int(line.split()[1])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def shop(ciflow_db, shop_server):
    ciflow_db.sql("SELECT ciflow.create_connection('shop', base_url => %s, flavor => 'odata',"
                  " max_calls => NULL)", (shop_server,))
    try:
        yield "shop"
    finally:
        ciflow_db.sql("SELECT ciflow.drop_connection('shop', if_exists => true)")


def test_get_entities(ciflow_db, shop):
    assert ciflow_db.sql("SELECT name, qualified_name FROM ciflow.get_entities('shop')") == \
        [("Products", "Products"), ("OrderLines", "OrderLines")]


def test_describe_entity(ciflow_db, shop):
    rows = ciflow_db.sql("SELECT name, edm_type, column_type::text, nullable, key_position"
                         " FROM ciflow.describe_entity('shop', 'Products')")
    assert rows == [("ID", "Edm.Int32", "integer", False, 1),
                    ("Name", "Edm.String", "text", True, None),
                    ("Price", "Edm.Decimal", "numeric", True, None),
                    ("Stock", "Edm.Int16", "smallint", True, None),
                    ("Available", "Edm.Boolean", "boolean", True, None),
                    ("ReleaseDate", "Edm.Date", "date", True, None)]
    rows = ciflow_db.sql("SELECT name, key_position FROM ciflow.describe_entity('shop',"
                         " 'OrderLines')")
    assert rows == [("OrderID", 1), ("LineNo", 2), ("ProductID", None), ("Quantity", None)]


def test_get_items_pages_by_top_and_skip(ciflow_db, shop):
    rows = [r[0] for r in ciflow_db.sql(
        "SELECT * FROM ciflow.get_items('shop', 'Products', orderby => 'ID', top => 5,"
        " skip => 10)")]
    assert [r["ID"] for r in rows] == [11, 12, 13, 14, 15]
    assert {k: v for k, v in rows[0].items() if not k.startswith("@")} == PRODUCTS[10]


def test_get_items_filter(ciflow_db, shop):
    rows = [r[0] for r in ciflow_db.sql(
        "SELECT * FROM ciflow.get_items('shop', 'Products', filter => 'Stock gt 60',"
        " fields => 'ID,Stock')")]
    assert sorted(r["ID"] for r in rows) == [21, 22, 23, 24, 25]


def test_get_item_with_an_int32_key(ciflow_db, shop):
    row = ciflow_db.sql("SELECT ciflow.get_item('shop', 'Products', '7', key_name => 'ID')")[0][0]
    assert row["Name"] == "Product 7"
    assert ciflow_db.sql(
        "SELECT ciflow.get_item('shop', 'Products', '99', key_name => 'ID')")[0][0] is None
    with raises_sqlstate("22P02"):
        ciflow_db.sql("SELECT ciflow.get_item('shop', 'Products', '7 or true', key_name => 'ID')")


def test_sync_products_and_order_lines(ciflow_db, shop):
    """sync on a server we did not write: typed columns from its $metadata,
    the key, the comments, every row over several pages, and a re-sync that
    finds nothing to change."""
    ciflow_db.sql("SELECT ciflow.alter_connection('shop', page_size => 7)")
    try:
        run = ciflow_db.sql("SELECT status, rows, pages, inserted FROM ciflow.sync('shop', 'Products')")
        assert run[0][:2] == ("succeeded", 25) and run[0][2] >= 4 and run[0][3] == 25, run
        cols = ciflow_db.sql(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod), col_description(a.attrelid, a.attnum)"
            " FROM pg_attribute a WHERE a.attrelid = 'shop.products'::regclass AND a.attnum > 0"
            " AND NOT a.attisdropped ORDER BY a.attnum")
        assert cols == [("id", "integer", "ID"), ("name", "text", "Name"),
                        ("price", "numeric", "Price"), ("stock", "smallint", "Stock"),
                        ("available", "boolean", "Available"),
                        ("release_date", "date", "ReleaseDate")]
        rows = ciflow_db.sql("SELECT id, name, price, stock, available, release_date::text"
                             " FROM shop.products ORDER BY id")
        assert rows == [(p["ID"], p["Name"], decimal.Decimal(repr(p["Price"])), p["Stock"],
                         p["Available"], p["ReleaseDate"]) for p in PRODUCTS]
        assert ciflow_db.sql("SELECT a.attname FROM pg_index i JOIN pg_attribute a"
                             " ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)"
                             " WHERE i.indrelid = 'shop.products'::regclass AND i.indisprimary") \
            == [("id",)]
        again = ciflow_db.sql("SELECT status, inserted, updated, deleted FROM ciflow.sync('shop', 'Products')")
        assert again == [("succeeded", 0, 0, 0)]

        lines = ciflow_db.sql("SELECT status, rows FROM ciflow.sync('shop', 'OrderLines')")
        assert lines == [("succeeded", 12)]
        assert ciflow_db.sql("SELECT order_id, line_no, product_id, quantity FROM shop.order_lines"
                             " ORDER BY quantity") == \
            [(o["OrderID"], o["LineNo"], o["ProductID"], o["Quantity"]) for o in ORDER_LINES]
    finally:
        ciflow_db.sql("DROP SCHEMA IF EXISTS shop CASCADE")

