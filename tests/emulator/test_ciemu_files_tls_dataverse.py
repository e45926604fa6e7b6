"""proxy=true partition downloads (E5), TLS with a throw-away CA, and the dataverse flavour (C.7)."""

import csv
import io
import json
import os
import ssl
import stat
import urllib.error
import urllib.parse
import urllib.request

import pytest

from conftest import DATA, SCOPE, Emulator, get, keys_of, pull_links, token_form


def csv_text(v):
    if v is None:
        return ""
    if v is True or v is False:
        return "true" if v else "false"
    return str(v)


def download(emu, uri, headers=None):
    return emu.request("GET", uri, auth=False, headers=headers)


def test_proxy_partitions_hold_every_row(emu):
    emu.settings(partition_rows=100)
    r = get(emu, DATA + "Customer?$select=*&proxy=true")
    assert r.status == 200
    reqs = r.json["httpRequests"]
    assert len(reqs) == 3 and all(x["headers"] == {"x-ms-version": "2020-04-08"} for x in reqs)
    raw = b""
    for n, req in enumerate(reqs):
        uri = req["uri"]
        assert "/_files/%s/Customer/part-%d.csv?" % (emu.control("GET", "state")["instances"][0]["instanceId"], n) in uri
        assert "sig=" in uri and "se=" in uri
        status, headers, body = download(emu, uri, req["headers"])
        assert status == 200 and headers["content-type"].startswith("text/csv")
        raw += body
    rows = list(csv.reader(io.StringIO(raw.decode("utf-8"), newline="")))
    expected = emu.rows("Customer")
    names = list(expected[0])
    assert len(rows) == 250
    # Floats (ChurnScore) and decimals are written as served; compare through the same formatting.
    as_served = get(emu, DATA + "Customer?$top=100").exact["value"] + \
        get(emu, DATA + "Customer?$top=100&$skip=100").exact["value"] + \
        get(emu, DATA + "Customer?$top=100&$skip=200").exact["value"]
    assert rows == [[csv_text(r[n]) for n in names] for r in as_served]
    assert raw.count(b"\r\n") >= 250


def test_partition_csv_dialect(emu):
    emu.set_entity("Tricky", {"attributes": [["Id", "Edm.Int32"], ["Text", "Edm.String"]], "keys": [["Id"]]},
                   rows=[{"Id": 1, "Text": 'a,"b"\nc'}, {"Id": 2, "Text": ""}, {"Id": 3, "Text": None},
                         {"Id": 4, "Text": "Zoë 🎉"}])
    uri = get(emu, DATA + "Tricky?proxy=true").json["httpRequests"][0]["uri"]
    body = download(emu, uri)[2]
    assert body == '1,"a,""b""\nc"\r\n2,""\r\n3,\r\n4,Zoë 🎉\r\n'.encode()
    emu.settings(csv_header=True)
    assert download(emu, get(emu, DATA + "Tricky?proxy=true").json["httpRequests"][0]["uri"])[2] \
        .startswith(b"Id,Text\r\n1,")
    meta = get(emu, "/v1/instances/%s/manage/entities/Tricky" % emu.control("GET", "state")["instances"][0]["instanceId"]).json
    assert meta["partitions"][0]["hasHeader"] is True


def test_file_signatures(emu):
    uri = get(emu, DATA + "RetailPos_Transactions?proxy=true").json["httpRequests"][0]["uri"]
    assert download(emu, uri)[0] == 200
    base, _, query = uri.partition("?")
    params = urllib.parse.parse_qs(query)
    bad_sig = uri.replace("sig=", "sig=A")
    status, headers, body = download(emu, bad_sig)
    assert status == 403 and b"<Code>AuthenticationFailed</Code>" in body
    assert headers["x-ms-error-code"] == "AuthenticationFailed"
    assert download(emu, base.replace("part-0", "part-1") + "?" + query)[0] == 403     # signed for part 0
    assert download(emu, base)[0] == 403
    later = params["se"][0].replace(params["se"][0][:4], str(int(params["se"][0][:4]) + 1))
    assert download(emu, uri.replace(urllib.parse.quote(params["se"][0], safe=""),
                                     urllib.parse.quote(later, safe="")))[0] == 403


def test_file_urls_expire_on_the_emulator_clock(emu):
    emu.settings(clock="manual", sas_ttl=60)
    uri = get(emu, DATA + "Customer?proxy=true").json["httpRequests"][0]["uri"]
    emu.advance_clock(59)
    assert download(emu, uri)[0] == 200
    emu.advance_clock(2)
    status, _, body = download(emu, uri)
    assert status == 403 and b"Signed expiry time" in body


def test_proxy_rejects_query_options_and_empty_entity_has_no_partitions(emu):
    for q in ("$filter=IsActive", "$top=5", "$select=CustomerId", "$orderby=Country"):
        assert get(emu, DATA + "Customer?proxy=true&" + q).status == 400
    emu.set_entity("Empty", {"attributes": [["Id", "Edm.Int32"]], "keys": [["Id"]]}, rows=[])
    assert get(emu, DATA + "Empty?proxy=true").json == {"httpRequests": []}


# -- TLS -------------------------------------------------------------------------------------

def test_tls_right_ca_works_wrong_ca_fails():
    with Emulator(tls=True) as emu:
        assert emu.base_url.startswith("https://127.0.0.1:") and emu.root.startswith("https://")
        status, _, body = emu.request("GET", "/v1/instances")
        assert status == 200 and json.loads(body)[0]["name"] == "Contoso"
        good = ssl.create_default_context(cafile=emu.ca_file)
        for host in ("127.0.0.1", "localhost"):          # both are in the certificate's SAN
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen("https://%s:%d/nothing" % (host, emu.port), context=good)
            assert e.value.code == 404                   # TLS verified; the route is unknown
        other = os.path.join(os.path.dirname(emu.ca_file), "other-ca.pem")
        wrong = ssl.create_default_context(cafile=other)
        with pytest.raises(urllib.error.URLError) as e:
            urllib.request.urlopen(emu.root + "/v1/instances", context=wrong)
        assert isinstance(e.value.reason, ssl.SSLCertVerificationError)
        system = ssl.create_default_context()
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(emu.root + "/v1/instances", context=system)
        # The server survives failed handshakes.
        assert emu.request("GET", "/v1/instances")[0] == 200
        # The CA is readable by other users (PostgreSQL runs as postgres).
        assert stat.S_IMODE(os.stat(emu.ca_file).st_mode) == 0o644
        assert stat.S_IMODE(os.stat(os.path.dirname(emu.ca_file)).st_mode) == 0o755
        tmp = emu.tmpdir
    assert not os.path.exists(tmp)


def test_tls_token_and_links():
    with Emulator("--nextlink", "absolute", tls=True) as emu:
        r = emu.request("GET", "/v1/instances/%s/data/Customer?$top=50" % emu.state()["instances"][0]["instanceId"])
        link = json.loads(r[2])["@odata.nextLink"]
        assert link.startswith("https://127.0.0.1:%d/v1/" % emu.port)
        assert emu.request("GET", link)[0] == 200


# -- dataverse ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dv():
    with Emulator("--flavor", "dataverse") as emu:
        yield emu


@pytest.fixture
def dve(dv):
    dv.reset()
    return dv


DV = "/api/data/v9.2/"


def dv_get(emu, path, prefer=None, **kw):
    headers = {"OData-Version": "4.0"}
    if prefer:
        headers["Prefer"] = prefer
    status, h, body = emu.request("GET", path, headers=headers, **kw)
    return status, h, body


def test_dataverse_base_url_and_service_document(dve):
    assert dve.base_url.endswith("/api/data/v9.2")
    status, _, body = dv_get(dve, "/api/data/v9.2")
    sets = [x["name"] for x in json.loads(body)["value"]]
    assert status == 200 and "msdynci_customerprofiles" in sets and "msdynci_unifiedactivities" in sets


def test_dataverse_paging_with_maxpagesize(dve):
    expected = dve.rows("Customer")
    url = DV + "msdynci_customerprofiles?$select=CustomerId,FullName"
    rows, links = [], []
    while url:
        status, headers, body = dv_get(dve, url, prefer="odata.maxpagesize=60")
        assert status == 200 and headers["preference-applied"] == "odata.maxpagesize=60"
        page = json.loads(body)
        rows += page["value"]
        url = page.get("@odata.nextLink")
        if url:
            links.append(url)
            assert url.startswith(dve.root + DV + "msdynci_customerprofiles?$select=CustomerId,FullName&$skiptoken=")
            token = url.split("$skiptoken=")[1]
            assert token.startswith("%3Ccookie%20pagenumber=%22") and "pagingcookie=%22%253C" in token
            assert "$top" not in url and "$skip=" not in url
    assert rows == [{"CustomerId": r["CustomerId"], "FullName": r["FullName"]} for r in expected]
    assert len(links) == 4
    for n, link in enumerate(links, 2):
        cookie = urllib.parse.unquote(link.split("$skiptoken=")[1])
        assert cookie.startswith('<cookie pagenumber="%d" pagingcookie="%%3C' % n)
        assert cookie.endswith('" istracking="False" />')


def test_dataverse_default_and_oversized_page(dve):
    dve.set_entity("Customer", {}, generate={"schema": "customer", "rows": 6000, "seed": 3})
    status, headers, body = dv_get(dve, DV + "msdynci_customerprofiles?$select=CustomerId")
    page = json.loads(body)
    assert "preference-applied" not in headers and len(page["value"]) == 5000 and page["@odata.nextLink"]
    status, headers, body = dv_get(dve, DV + "msdynci_customerprofiles?$select=CustomerId",
                                   prefer="odata.maxpagesize=9000")
    assert headers["preference-applied"] == "odata.maxpagesize=5000" and len(json.loads(body)["value"]) == 5000
    rows, _ = pull_links(dve, DV + "msdynci_customerprofiles?$select=CustomerId")
    assert len(rows) == 6000 and len(set(keys_of(rows))) == 6000


def test_dataverse_top_caps_the_total_and_skip_is_400(dve):
    status, headers, body = dv_get(dve, DV + "msdynci_customerprofiles?$top=7", prefer="odata.maxpagesize=5")
    page = json.loads(body)
    assert status == 200 and len(page["value"]) == 7 and "@odata.nextLink" not in page
    status, _, body = dv_get(dve, DV + "msdynci_customerprofiles?$skip=5")
    assert status == 400 and json.loads(body)["error"]["message"] == "The query parameter $skip is not supported."
    status, _, body = dv_get(dve, DV + "msdynci_customerprofiles?$search=x")
    assert status == 400 and "error" in json.loads(body)


def test_dataverse_filter_count_and_errors(dve):
    status, _, body = dv_get(dve, DV + "msdynci_customerprofiles?$filter=IsActive eq false&$count=true")
    page = json.loads(body)
    expected = [r for r in dve.rows("Customer") if not r["IsActive"]]
    assert page["value"] == expected and page["@odata.count"] == len(expected)
    assert page["@odata.context"] == dve.root + DV + "$metadata#msdynci_customerprofiles"
    status, _, body = dv_get(dve, DV + "nosuchtable")
    assert status == 404 and "error" in json.loads(body)
    status, _, body = dv_get(dve, DV + "msdynci_customerprofiles?$filter=Nope eq 1")
    assert status == 400 and set(json.loads(body)) == {"error"}


def test_dataverse_tampered_cookie(dve):
    status, _, body = dv_get(dve, DV + "msdynci_customerprofiles", prefer="odata.maxpagesize=10")
    link = json.loads(body)["@odata.nextLink"]
    forged = link.replace("offset%253D%252210%2522", "offset%253D%252220%2522")
    assert forged != link
    assert dv_get(dve, forged, prefer="odata.maxpagesize=10")[0] == 400
    assert dv_get(dve, link, prefer="odata.maxpagesize=10")[0] == 200


def test_dataverse_auth(dve):
    # No subscription key is needed; the scope is the org root.
    assert dv_get(dve, DV + "msdynci_customerprofiles?$top=1", auth=True)[0] == 200
    r = token_form(dve, scope=SCOPE)
    assert r.status == 400 and r.json["error"] == "invalid_scope"
    assert token_form(dve, scope=dve.root + "/.default").status == 200
    assert token_form(dve, scope="http://localhost:%d/.default" % dve.port).status == 200
    status, headers, body = dve.request("GET", DV + "msdynci_customerprofiles", auth=False)
    assert status == 401 and body == b""
    assert dve.request("GET", "/v1/instances")[0] == 404          # the CI routes are gone


def test_dataverse_rate_limit_per_client(dve):
    dve.settings(clock="manual", rate="2/300")
    assert [dv_get(dve, DV + "msdynci_customerprofiles?$top=1")[0] for _ in range(3)] == [200, 200, 429]
    status, headers, body = dv_get(dve, DV + "msdynci_customerprofiles?$top=1")
    assert headers["retry-after"] == "300" and json.loads(body)["error"]["code"] == "0x80072322"


def test_dataverse_change_tracking(dve):
    dve.set_entity("Things", {"attributes": [["Id", "Edm.Int32"], ["Name", "Edm.String"]], "keys": [["Id"]],
                              "entitySet": "new_things"}, rows=[{"Id": k, "Name": "n%d" % k} for k in range(5)])
    url = DV + "new_things?$select=Id,Name"
    rows, delta = [], None
    while url:
        status, headers, body = dv_get(dve, url, prefer="odata.track-changes, odata.maxpagesize=2")
        assert status == 200 and "odata.track-changes" in headers["preference-applied"]
        page = json.loads(body)
        rows += page["value"]
        url = page.get("@odata.nextLink")
        delta = page.get("@odata.deltaLink")
        assert bool(url) != bool(delta)               # the delta link only on the last page
    assert [r["Id"] for r in rows] == list(range(5))
    assert delta.startswith(dve.root + DV + "new_things?$select=Id,Name&$deltatoken=")
    # Nothing changed yet.
    page = json.loads(dv_get(dve, delta)[2])
    assert page["value"] == [] and page["@odata.context"].endswith("#new_things/$delta")
    # Change, add and delete rows through control and E10-style writes.
    dve.control("POST", "entities/Things/rows", {"mode": "upsert", "rows": [{"Id": 1, "Name": "changed"},
                                                                           {"Id": 9, "Name": "new"}]})
    dve.control("DELETE", "entities/Things/rows/3")
    dve.control("POST", "entities/Things/rows", {"rows": [{"Id": 10, "Name": "appended"}]})
    status, _, body = dv_get(dve, delta)
    page = json.loads(body)
    assert status == 200
    assert page["value"] == [{"Id": 1, "Name": "changed"}, {"Id": 9, "Name": "new"},
                             {"@odata.context": dve.root + DV + "$metadata#new_things/$deletedEntity",
                              "id": 3, "reason": "deleted"},
                             {"Id": 10, "Name": "appended"}]
    assert [r["Id"] for r in dve.rows("Things")] == [0, 1, 2, 4, 9, 10]
    # The new delta link starts from here; the old one still answers the same question.
    again = json.loads(dv_get(dve, page["@odata.deltaLink"])[2])
    assert again["value"] == []
    assert len(json.loads(dv_get(dve, delta)[2])["value"]) == 4
    # A replace expires every token; a forged one is refused.
    dve.control("POST", "entities/Things/rows", {"mode": "replace", "rows": [{"Id": 1, "Name": "x"}]})
    status, _, body = dv_get(dve, delta)
    assert status == 400 and json.loads(body)["error"]["code"] == "0x80044352"
    forged = delta.replace("%21", "1%21", 1)
    assert dv_get(dve, forged)[0] == 400


def test_dataverse_change_tracking_limits(dve):
    status, _, body = dv_get(dve, DV + "msdynci_customerprofiles?$filter=IsActive", prefer="odata.track-changes")
    assert status == 400 and "only $select" in json.loads(body)["error"]["message"]
    dve.set_entity("Customer", {"changeTracking": False})
    status, headers, body = dv_get(dve, DV + "msdynci_customerprofiles?$select=CustomerId", prefer="odata.track-changes")
    assert status == 200 and "@odata.deltaLink" not in json.loads(body) and "preference-applied" not in headers


def test_files_and_links_on_another_host_name(emu):
    """files_root / link_root put URLs on another host name of the same emulator, so a client's
    "never send credentials elsewhere" and "refuse foreign links" rules can be tested."""
    other = "http://localhost:%d" % emu.port
    emu.settings(files_root=other, link_root=other, nextlink="absolute")
    uri = get(emu, DATA + "Customer?proxy=true").json["httpRequests"][0]["uri"]
    assert uri.startswith(other + "/_files/")
    link = get(emu, DATA + "Customer?$top=10").json["@odata.nextLink"]
    assert link.startswith(other + "/v1/")
    assert get(emu, link).status == 200
    # The log shows which credentials reached /_files/: none here, the key and token there.
    assert emu.request("GET", uri, auth=False)[0] == 200
    clean = emu.log()[-1]
    assert clean["route"] == "file" and clean["key"] is None and clean["token"] is None
    assert emu.request("GET", uri)[0] == 200          # the client adds key and bearer
    leaked = emu.log()[-1]
    assert leaked["key"] == "primary" and leaked["token"].startswith("tok-")
    assert emu.settings(files_root="off")["files_root"] == "off"
    with pytest.raises(Exception):
        emu.settings(link_root="not a url")
