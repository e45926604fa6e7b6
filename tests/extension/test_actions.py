"""Actions (sql-api.md section 2): get_entities, get_items and get_item.

Each action is one call to the service, answered in the calling session.
The tests read the emulator's request log to check the number of calls and
that every query option arrives intact (decoded by the emulator exactly as
the user wrote it), and compare answers with the emulator's own data.
"""

import json
import urllib.parse

import pytest

from extension.cihelpers import (parse_iso, api_requests, entity_list, key_names, query_of,
                                 raises_sqlstate, assert_names, assert_http_detail)

TRICKY = "O'Brien & Sons + #1 Zoë/ü?=%20 €\u00a0x"

CONTACT = {
    "entityType": "profile",
    "attributes": [{"name": "ContactId", "dataType": "Edm.String"},
                   {"name": "FullName", "dataType": "Edm.String"},
                   {"name": "City", "dataType": "Edm.String"},
                   {"name": "Score", "dataType": "Edm.Int32"}],
    "keys": [["ContactId"]],
}
CITIES = ["Berlin", "Oslo", "Lima", "Kyoto"]
CONTACT_ROWS = (
    [{"ContactId": f"c{i:02d}", "FullName": f"Person {chr(65 + (i * 7) % 26)}{i:02d}",
      "City": CITIES[i % 4], "Score": i * 10} for i in range(20)]
    + [{"ContactId": "o'neil", "FullName": TRICKY, "City": "Dublin", "Score": 7}])


@pytest.fixture
def contacts(emulator, ci_connection):
    emulator.set_entity("Contact", CONTACT, rows=CONTACT_ROWS)
    emulator.clear_log()
    return ci_connection


def get_items(db, entity="Contact", **kw):
    named = "".join(f", {k} => %({k})s" for k in kw)
    rows = db.sql(f"SELECT * FROM ciflow.get_items('emu', %(entity)s{named})",
                  dict(kw, entity=entity))
    return [r[0] for r in rows]


def strip_annotations(row):
    return {k: v for k, v in row.items() if not k.startswith("@")}


def only_call(emu):
    """The one API request the action made (token requests aside)."""
    calls = api_requests(emu)
    assert len(calls) == 1, f"expected exactly one call, got {len(calls)}: " \
        + json.dumps([(c.get('method'), c.get('path'), c.get('query')) for c in calls])
    assert calls[0].get("method", "GET") == "GET"
    return calls[0]


def replay(emu, entry):
    """The emulator's own answer to the query ciflow sent (the expected rows)."""
    query = urllib.parse.urlencode(query_of(entry), quote_via=urllib.parse.quote)
    status, _, body = emu.request("GET", entry["path"] + ("?" + query if query else ""))
    assert status == 200, body[:300]
    return [strip_annotations(r) for r in json.loads(body)["value"]]


def test_get_entities_matches_metadata(ciflow_db, ci_connection, emulator):
    emulator.clear_log()
    got = {r[1]: r for r in ciflow_db.sql(
        "SELECT name, qualified_name, entity_type, data_source, attributes, keys, refreshed_at"
        " FROM ciflow.get_entities('emu')")}
    call = only_call(emulator)
    assert call["path"].endswith("/manage/entities")
    expected = entity_list(emulator)
    assert set(got) == {e["qualifiedEntityName"] for e in expected}
    for e in expected:
        name, qualified, etype, source, attributes, keys, refreshed = got[e["qualifiedEntityName"]]
        assert name, qualified
        assert (etype or "").lower() == (e.get("entityType") or "").lower(), qualified
        assert source == e.get("dataSourceName"), qualified
        assert [(a["name"], a["dataType"]) for a in attributes] == \
            [(a["name"], a["dataType"]) for a in e["attributes"]], qualified
        assert key_names(keys) == key_names(e["keys"]), qualified
        if e.get("refreshTime"):
            assert refreshed == parse_iso(e["refreshTime"]), qualified
        else:
            assert refreshed is None, qualified


def test_get_items_is_one_call_returning_one_page(ciflow_db, contacts, emulator):
    rows = get_items(ciflow_db)
    call = only_call(emulator)
    import emulator_client as ec
    assert call["path"] == f"/v1/instances/{ec.INSTANCE_ID}/data/Contact"
    assert [strip_annotations(r) for r in rows] == CONTACT_ROWS


def test_get_items_does_not_follow_paging(ciflow_db, ci_connection, emulator):
    """top above the server's cap, with a nextLink offered: still one page, one call."""
    emulator.settings(max_top=10, nextlink="absolute")
    emulator.set_entity("Contact", CONTACT, rows=CONTACT_ROWS)
    emulator.clear_log()
    rows = get_items(ciflow_db, top=50)
    call = only_call(emulator)
    assert query_of(call).get("$top") == "50"
    assert [strip_annotations(r) for r in rows] == CONTACT_ROWS[:10]


def test_filter_is_encoded_exactly(ciflow_db, contacts, emulator):
    quoted = TRICKY.replace("'", "''")
    flt = f"FullName eq '{quoted}'"
    rows = get_items(ciflow_db, filter=flt)
    call = only_call(emulator)
    assert query_of(call)["$filter"] == flt
    assert [strip_annotations(r) for r in rows] == [CONTACT_ROWS[-1]]


def test_filter_with_in_and_spaces(ciflow_db, contacts, emulator):
    flt = "City in ('Oslo', 'Kyoto') and Score ge 50"
    rows = get_items(ciflow_db, filter=flt)
    call = only_call(emulator)
    assert query_of(call)["$filter"] == flt
    expected = [r for r in CONTACT_ROWS if r["City"] in ("Oslo", "Kyoto") and r["Score"] >= 50]
    assert [strip_annotations(r) for r in rows] == expected


def test_fields_orderby_top_skip(ciflow_db, contacts, emulator):
    rows = get_items(ciflow_db, fields="ContactId,FullName", orderby="FullName desc",
                     top=3, skip=2)
    q = query_of(only_call(emulator))
    assert (q["$select"], q["$orderby"], q["$top"], q["$skip"]) == \
        ("ContactId,FullName", "FullName desc", "3", "2")
    got = [strip_annotations(r) for r in rows]
    assert all(set(r) == {"ContactId", "FullName"} for r in got)
    assert len(got) == 3
    assert got == replay(emulator, api_requests(emulator)[0])
    # Independent of the emulator: the slice of the rows in descending name order.
    by_name = sorted(CONTACT_ROWS, key=lambda r: r["FullName"], reverse=True)[2:5]
    assert got == [{"ContactId": r["ContactId"], "FullName": r["FullName"]} for r in by_name]


def test_search(ciflow_db, contacts, emulator):
    rows = get_items(ciflow_db, search="zoë")
    call = only_call(emulator)
    # A.3 writes $search quoted ($search="corey"); either form must carry the term intact.
    assert query_of(call)["$search"].strip('"') == "zoë"
    got = [strip_annotations(r) for r in rows]
    assert got == replay(emulator, call)
    assert got == [CONTACT_ROWS[-1]]


def test_expand(ciflow_db, ci_connection, emulator):
    emulator.clear_log()
    rows = get_items(ciflow_db, entity="Customer", expand="UnifiedActivity", top=3)
    call = only_call(emulator)
    assert query_of(call)["$expand"] == "UnifiedActivity"
    assert [strip_annotations(r) for r in rows] == replay(emulator, call)
    assert all(isinstance(r.get("UnifiedActivity"), list) for r in rows)


def item_calls(emu):
    """The API requests of get_items so far, as (kind, $filter): kind is
    'metadata' for E2 or $metadata, 'data' for the row request."""
    out = []
    for c in api_requests(emu):
        if "/manage/entities" in c["path"] or c["path"].endswith("$metadata"):
            out.append(("metadata", None))
        else:
            out.append(("data", query_of(c).get("$filter")))
    return out


def get_item(db, entity, key, key_name=None, conn="emu"):
    named = ", key_name => %s" if key_name is not None else ""
    params = (conn, entity, key) + ((key_name,) if key_name is not None else ())
    return db.sql(f"SELECT ciflow.get_item(%s, %s, %s{named})", params)[0][0]


def test_get_item_found(ciflow_db, contacts, emulator):
    row = get_item(ciflow_db, "Contact", "c07", "ContactId")
    assert strip_annotations(row) == CONTACT_ROWS[7]
    # ciflow knew nothing of Contact: its metadata (E2) first, then the row.
    assert item_calls(emulator) == [("metadata", None), ("data", "ContactId eq 'c07'")]
    emulator.clear_log()
    row = get_item(ciflow_db, "Contact", "c08", "ContactId")
    assert strip_annotations(row) == CONTACT_ROWS[8]
    assert query_of(only_call(emulator))["$filter"] == "ContactId eq 'c08'"


def test_get_item_quotes_the_key(ciflow_db, contacts, emulator):
    row = get_item(ciflow_db, "Contact", "o'neil", "ContactId")
    assert strip_annotations(row) == CONTACT_ROWS[-1]
    assert item_calls(emulator)[-1] == ("data", "ContactId eq 'o''neil'")
    # The same once the key's type is remembered: one call, still quoted.
    emulator.clear_log()
    row = get_item(ciflow_db, "Contact", "o'neil", "ContactId")
    assert strip_annotations(row) == CONTACT_ROWS[-1]
    assert query_of(only_call(emulator))["$filter"] == "ContactId eq 'o''neil'"


def test_get_item_absent_is_null(ciflow_db, contacts, emulator):
    assert get_item(ciflow_db, "Contact", "nobody", "ContactId") is None
    assert item_calls(emulator) == [("metadata", None), ("data", "ContactId eq 'nobody'")]


def test_get_item_default_key_is_customer_id(ciflow_db, ci_connection, emulator):
    emulator.set_entity("Customer",
                        {"entityType": "profile",
                         "attributes": [{"name": "CustomerId", "dataType": "Edm.String"},
                                        {"name": "FullName", "dataType": "Edm.String"}],
                         "keys": [["CustomerId"]]},
                        rows=[{"CustomerId": "42", "FullName": "Jane Doe"},
                              {"CustomerId": "43", "FullName": "John Roe"}])
    emulator.clear_log()
    row = ciflow_db.sql("SELECT ciflow.get_item('emu', 'Customer', '43')")[0][0]
    assert strip_annotations(row) == {"CustomerId": "43", "FullName": "John Roe"}
    assert item_calls(emulator) == [("metadata", None), ("data", "CustomerId eq '43'")]


def test_unknown_entity_is_404(ciflow_db, ci_connection, emulator):
    for query in ("SELECT * FROM ciflow.get_items('emu', 'NoSuchEntity')",
                  "SELECT ciflow.get_item('emu', 'NoSuchEntity', '1')"):
        with raises_sqlstate("42704") as err:
            ciflow_db.sql(query)
        assert_names(err, "emu", "NoSuchEntity")
        assert_http_detail(err, 404)
        assert "NoSuchEntity" in err.detail


def test_bad_filter_is_the_services_400(ciflow_db, contacts, emulator):
    with raises_sqlstate("22023") as err:
        get_items(ciflow_db, filter="FullName wibble 'x'")
    assert_names(err, "emu", "Contact")
    assert_http_detail(err, 400)


def test_entity_name_is_one_path_segment(ciflow_db, ci_connection, emulator):
    """An entity name with '/', ' ' or '#' is one percent-encoded path segment."""
    import emulator_client as ec
    emulator.clear_log()
    with raises_sqlstate("42704"):
        get_items(ciflow_db, entity="No/Such Entity#1")
    # The emulator logs the decoded path: the whole name is still one segment
    # after /data/, and nothing (like '#1') was cut off.
    assert only_call(emulator)["path"] == \
        f"/v1/instances/{ec.INSTANCE_ID}/data/No/Such Entity#1"
