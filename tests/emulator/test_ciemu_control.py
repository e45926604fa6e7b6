"""The control interface (C.5), scenarios, E10 writes, and the emulator_client module."""

import hashlib
import json
import os
import signal
import subprocess
import time

import pytest

from conftest import DATA, I, TESTS, V1, Emulator, call, get

DEMO = os.path.join(TESTS, "scenarios", "demo.json")


def normalized_state(emu):
    st = emu.state()
    for k in ("clock", "seq", "tokens", "faults"):
        st.pop(k)
    return st


def test_demo_json_is_the_default_instance(server):
    server.reset()
    default = normalized_state(server)
    with Emulator(scenario=DEMO) as emu:
        assert normalized_state(emu) == default
        for name in ("Customer", "RetailPos_Transactions", "UnifiedActivity", "RevenueByCountry"):
            assert emu.stats(name) == server.stats(name)
    printed = subprocess.run(["/usr/bin/python3", os.path.join(TESTS, "ciemu.py"), "default-scenario"],
                             check=True, capture_output=True).stdout
    with open(DEMO, "rb") as f:
        assert json.loads(f.read()) == json.loads(printed)


def test_reset_restores_everything(emu):
    emu.settings(max_top=5, nextlink="rooted")
    emu.add_fault({"path": "/nope"}, {"status": 500})
    emu.set_entity("Extra", {"attributes": [["Id", "Edm.Int32"]], "keys": [["Id"]]}, rows=[{"Id": 1}])
    emu.control("POST", "datasources/RetailPos", {"refreshState": "updating"})
    get(emu, "/v1/instances")
    tok = emu.token()
    emu.reset()
    assert emu.control("GET", "settings")["max_top"] == 100
    assert emu.control("GET", "faults") == [] and emu.log() == []
    assert "Extra" not in [e["name"] for e in emu.control("GET", "entities")]
    assert emu.control("GET", "state")["instances"][0]["datasources"][0]["refreshState"] == "updated"
    assert get(emu, "/v1/instances", token=tok).status == 200          # tokens survive a reset


def test_load_scenario_and_shorthand(emu):
    scen = {"settings": {"max_top": 3},
            "entities": [{"name": "Things", "attributes": [["Id", "Edm.Int64"], ["Price", "Edm.Decimal"]],
                          "keys": [["Id"]], "rows": [{"Id": k, "Price": 1.5} for k in range(5)]}]}
    emu.control("POST", "load", scen)
    assert [e["name"] for e in emu.control("GET", "entities")] == ["Things"]
    r = get(emu, DATA + "Things?$top=10")
    assert [x["Id"] for x in r.json["value"]] == [0, 1, 2] and b'"Price":1.5' in r.body
    emu.reset()
    assert "Customer" in [e["name"] for e in emu.control("GET", "entities")]


def test_scenario_with_two_instances_and_ndjson(tmp_path):
    (tmp_path / "rows.ndjson").write_text('{"Id": 1, "Name": "a"}\n{"Id": 2, "Name": "b"}\n')
    scen = {"auth": {"tenant": "t2", "clients": [{"client_id": "c2", "client_secret": "s2"}],
                     "scope": "https://api.ci.ai.microsoft.com/.default", "subscription_keys": ["k1"]},
            "instances": [{"instanceId": "inst-a", "entities": [
                {"name": "Files", "attributes": ["Id", "Name"], "keys": ["Id"], "ndjson": "rows.ndjson"}]},
                {"instanceId": "inst-b", "name": "Other", "entities": []}]}
    path = tmp_path / "scen.json"
    path.write_text(json.dumps(scen))
    with Emulator(scenario=str(path)) as emu:
        import urllib.parse
        form = urllib.parse.urlencode({"grant_type": "client_credentials", "client_id": "c2", "client_secret": "s2",
                                       "scope": "https://api.ci.ai.microsoft.com/.default"})
        status, _, body = emu.request("POST", "/t2/oauth2/v2.0/token", auth=False, body=form,
                                      headers={"Content-Type": "application/x-www-form-urlencoded"})
        tok = json.loads(body)["access_token"]
        hdrs = {"Ocp-Apim-Subscription-Key": "k1", "Authorization": "Bearer " + tok}
        status, _, body = emu.request("GET", "/v1/instances", auth=False, headers=hdrs)
        assert [x["instanceId"] for x in json.loads(body)] == ["inst-a", "inst-b"]
        status, _, body = emu.request("GET", "/v1/instances/inst-a/data/Files", auth=False, headers=hdrs)
        assert json.loads(body)["value"] == [{"Id": 1, "Name": "a"}, {"Id": 2, "Name": "b"}]
        assert emu.control("GET", "entities?instance=inst-b") == []
        with pytest.raises(Exception):
            emu.control("GET", "entities?instance=nope")


def test_bad_scenario_file_fails_start(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"entities": [{"name": "X", "attributes": ["A"], "rows": [{"B": 1}]}]}')
    with pytest.raises(Exception) as e:
        Emulator(scenario=str(path)).start()
    assert "unknown attributes" in str(e.value)


def test_set_entity_metadata_rows_and_generate(emu):
    meta = {"attributes": [{"name": "Id", "dataType": "Edm.Int32"}, {"name": "When", "dataType": "Edm.DateTimeOffset"}],
            "keys": [["Id"]], "entityType": "activity", "dataSourceName": "RetailPos",
            "incrementalAttribute": "When", "refreshTime": "2025-01-02T03:04:05Z"}
    made = emu.set_entity("Src_Events", meta, rows=[{"Id": 1, "When": "2025-01-01T00:00:00Z"}])
    assert made["rowCount"] == 1 and made["dataSourceName"] == "RetailPos"
    e = get(emu, V1 + "/manage/entities/Src_Events").json
    assert e["incrementalAttribute"] == "When" and e["refreshTime"] == "2025-01-02T03:04:05.0000000Z"
    assert e["keys"] == [[{"name": "Id"}]] and e["entityType"] == "activity"
    # Metadata only: rows and unspecified fields are kept.
    emu.set_entity("Src_Events", {"entityType": "unknownKind"})
    assert emu.rows("Src_Events") == [{"Id": 1, "When": "2025-01-01T00:00:00Z"}]
    assert get(emu, V1 + "/manage/entities/Src_Events").json["dataSourceName"] == "RetailPos"
    gen = emu.set_entity("People", {}, generate={"schema": "customer", "rows": 10, "seed": 5})
    assert gen["entityType"] == "profile" and gen["keys"] == [[{"name": "CustomerId"}]] and gen["rowCount"] == 10
    with pytest.raises(Exception) as err:
        emu.set_entity("Bad", {"attributes": ["A"], "keys": [["B"]]})
    assert err.value.status == 400
    emu.control("DELETE", "entities/People")
    assert get(emu, DATA + "People").status == 404


def test_rows_append_replace_and_refresh_time(emu):
    emu.settings(clock="manual")
    emu.set_entity("T", {"attributes": [["Id", "Edm.Int32"]], "keys": [["Id"]], "refreshTime": "2025-01-01T00:00:00Z"},
                   rows=[{"Id": 1}])
    now = emu.control("GET", "clock")["now"]
    r = emu.control("POST", "entities/T/rows", {"rows": [{"Id": 2}, {"Id": 3}]})
    assert r == {"name": "T", "rowCount": 3, "refreshTime": now}
    emu.control("POST", "entities/T/rows", {"mode": "replace", "rows": [{"Id": 9}], "refreshTime": "keep"})
    assert emu.rows("T") == [{"Id": 9}]
    assert get(emu, V1 + "/manage/entities/T").json["refreshTime"] == now
    emu.control("POST", "entities/Customer/rows", {"generate": {"schema": "customer", "rows": 5, "seed": 1,
                                                                "start": 250}})
    import ciemu
    assert [x["CustomerId"] for x in emu.rows("Customer")] == [ciemu.CustomerGenerator(1).key(i) for i in range(255)]
    with pytest.raises(Exception) as e:
        emu.control("POST", "entities/T/rows", {"mode": "merge", "rows": []})
    assert e.value.status == 400


def test_rows_paging_and_one_row(emu):
    page = emu.control("GET", "entities/Customer/rows?offset=245&limit=10")
    assert page["total"] == 250 and page["offset"] == 245 and len(page["rows"]) == 5
    assert page["rows"][0] == emu.row("Customer", 245)
    assert emu.control("GET", "entities/Customer/rows?offset=300")["rows"] == []
    for bad in ("250", "-1", "x"):
        with pytest.raises(Exception) as e:
            emu.control("GET", "entities/Customer/rows/" + bad)
        assert e.value.status == 404


def test_stats_of_literal_rows(emu):
    rows = [{"Id": 1, "Amount": "10.25", "At": "2025-01-01T10:00:00+02:00", "Day": "2024-12-31", "Big": 9007199254740993},
            {"Id": 2, "Amount": None, "At": "2025-01-01T09:00:00Z", "Day": None, "Big": 1},
            {"Id": 3, "Amount": "-0.25", "At": None, "Day": "2024-01-01", "Big": None}]
    for r in rows:
        if r["Amount"] is not None:
            r["Amount"] = float(r["Amount"])
    emu.set_entity("S", {"attributes": [["Id", "Edm.Int32"], ["Amount", "Edm.Decimal"], ["At", "Edm.DateTimeOffset"],
                                        ["Day", "Edm.Date"], ["Big", "Edm.Int64"]], "keys": [["Id"]]}, rows=rows)
    st = emu.stats("S")
    assert st["row_count"] == 3
    assert st["null_counts"] == {"Id": 0, "Amount": 1, "At": 1, "Day": 1, "Big": 1}
    assert st["sums"] == {"Id": "6", "Amount": "10.00", "Big": "9007199254740994"}
    assert st["min"] == {"At": "2025-01-01T10:00:00+02:00", "Day": "2024-01-01"}    # 08:00Z < 09:00Z
    assert st["max"] == {"At": "2025-01-01T09:00:00Z", "Day": "2024-12-31"}
    raw = emu.request("GET", emu.root + "/_control/entities/S/rows", auth=False)[2].decode()
    lines = raw[raw.index("[") + 1:-2].replace("},{", "}\n{").split("\n")
    assert st["sha256"] == hashlib.sha256(("\n".join(lines) + "\n").encode()).hexdigest()


def test_settings_validation_and_listing(emu):
    s = emu.control("GET", "settings")
    assert s["flavor"] == "customer_insights" and s["rate"] == "off" and s["auto_advance"] == "off"
    for bad in ({"max_top": 0}, {"nextlink": "sideways"}, {"nope": 1}, {"count": 3}, {"numbers_as_strings": "maybe"},
                {"write_status": 200}, {"clock": "fast"}):
        with pytest.raises(Exception) as e:
            emu.settings(**bad)
        assert e.value.status == 400
    assert emu.settings(numbers_as_strings="on", auto_advance=2.5)["auto_advance"] == 2.5


def test_clock_control(emu):
    c = emu.control("POST", "clock", {"mode": "manual", "set": "2030-01-01T00:00:00Z"})
    assert c == {"mode": "manual", "now": "2030-01-01T00:00:00.0000000Z"}
    assert emu.advance_clock(90.5)["now"] == "2030-01-01T00:01:30.5000000Z"
    time.sleep(0.05)
    assert emu.control("GET", "clock")["now"] == "2030-01-01T00:01:30.5000000Z"
    c = emu.control("POST", "clock", {"mode": "real"})
    assert c["mode"] == "real" and c["now"].startswith("2030-01-01T00:01:3")        # continuous


def test_unknown_control_routes(emu):
    for method, path in (("GET", "nope"), ("POST", "state"), ("GET", "entities/Customer/rows/1/extra"),
                         ("POST", "jobs/x/y/z")):
        with pytest.raises(Exception) as e:
            emu.control(method, path, {} if method == "POST" else None)
        assert e.value.status == 404


def test_no_control():
    with Emulator("--no-control") as emu:
        status, _, body = emu.request("GET", "/_control/state", auth=False)
        assert status == 404 and json.loads(body) == {"statusCode": 404, "message": "Resource not found"}
        assert emu.request("GET", "/v1/instances")[0] == 200


# -- E10 writes --------------------------------------------------------------------------------

def test_write_updates_a_profile_visible_at_once(emu):
    cid = emu.row("Customer", 3)["CustomerId"]
    body = '{"CustomerId": "%s", "Email": "jane@example.com", "LifetimeValue": 12.30}' % cid
    r = call(emu, "POST", DATA + "Customer?caller=test", body=body, headers={"Content-Type": "application/json"})
    assert r.status == 201 and r.json["statusCode"] == 201 and r.json["location"].endswith("/Customer/" + cid)
    got = get(emu, DATA + "Customer?$filter=CustomerId eq '%s'" % cid)
    assert got.json["value"][0]["Email"] == "jane@example.com" and b'"LifetimeValue":12.30' in got.body
    assert emu.row("Customer", 3)["Email"] == "jane@example.com"
    assert len(emu.rows("Customer")) == 250
    r = call(emu, "POST", DATA + "Customer", body={"CustomerId": "nobody", "Email": "x"})
    assert r.status == 404
    emu.settings(write_status=202)
    assert call(emu, "POST", DATA + "Customer", body={"CustomerId": cid, "City": "Oslo"}).status == 202


def test_write_valid_until_and_bad_bodies(emu):
    cid = emu.row("Customer", 0)["CustomerId"]
    emu.settings(clock="manual")
    emu.control("POST", "clock", {"set": "2025-03-01T00:00:00Z"})
    ok = call(emu, "POST", DATA + "Customer?validUntil=2025-03-31T00:00:00Z", body={"CustomerId": cid})
    assert ok.status == 201
    far = call(emu, "POST", DATA + "Customer?validUntil=2025-03-31T00:00:01Z", body={"CustomerId": cid})
    assert far.status == 400 and "30 days" in far.json["error"]["message"]
    assert call(emu, "POST", DATA + "Customer?validUntil=soon", body={"CustomerId": cid}).status == 400
    assert call(emu, "POST", DATA + "Customer", body={"CustomerId": cid, "Nope": 1}).status == 400
    assert call(emu, "POST", DATA + "Customer", body=b"not json").status == 400
    assert call(emu, "POST", DATA + "Customer", body={"Email": "x"}).status == 400
    assert call(emu, "POST", DATA + "HighValue", body={"CustomerId": cid}).status == 400


def test_write_appends_activities_and_patch(emu):
    row = {"ActivityId": "ua-new", "CustomerId": "c", "ActivityType": "Call", "ActivityTime": "2025-03-02T00:00:00Z"}
    assert call(emu, "POST", DATA + "UnifiedActivity", body=row).status == 201
    assert call(emu, "POST", DATA + "UnifiedActivity", body=row).status == 409
    last = emu.rows("UnifiedActivity")[-1]
    assert last["ActivityId"] == "ua-new" and last["Amount"] is None
    r = call(emu, "PATCH", DATA + "UnifiedActivity/ua-new", body={"Subject": "patched"})
    assert r.status == 204 and r.body == b""
    assert emu.rows("UnifiedActivity")[-1]["Subject"] == "patched"
    assert call(emu, "PATCH", DATA + "UnifiedActivity/nope", body={"Subject": "x"}).status == 404
    assert call(emu, "PATCH", DATA + "UnifiedActivity/ua-new", body={"ActivityId": "other"}).status == 400
    assert call(emu, "PATCH", DATA + "RetailPos_Transactions/9007199254740993", body={"Quantity": 2}).status == 204
    assert emu.row("RetailPos_Transactions", 35)["Quantity"] == 2


# -- emulator_client ------------------------------------------------------------------------------

def test_client_constants_and_attributes(server):
    import emulator_client as ec
    assert (ec.TENANT, ec.CLIENT_ID, ec.CLIENT_SECRET, ec.SUB_KEY, ec.SUB_KEY2, ec.INSTANCE_ID) == (
        "tenant-0001", "ciflow-client", "ciflow-secret-value", "key-primary-0001", "key-secondary-0001", I)
    assert ec.SCOPE == "https://api.ci.ai.microsoft.com/.default"
    assert server.base_url == "http://127.0.0.1:%d/v1" % server.port
    assert server.root == "http://127.0.0.1:%d" % server.port
    assert server.token_url == server.root + "/tenant-0001/oauth2/v2.0/token"
    assert server.ca_file is None


def test_client_stop_reaps_and_sigterm_exits_cleanly():
    emu = Emulator().start()
    proc = emu.proc
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    emu.stop()
    assert emu.proc is None and emu.tmpdir is None
    emu.stop()                                    # idempotent


def test_client_control_errors_carry_the_body(emu):
    from emulator_client import EmulatorError
    with pytest.raises(EmulatorError) as e:
        emu.control("GET", "entities/Nope")
    assert e.value.status == 404 and "Nope" in e.value.body


def test_ready_line_and_help():
    out = subprocess.run(["/usr/bin/python3", os.path.join(TESTS, "ciemu.py"), "--help"], check=True,
                         capture_output=True, text=True).stdout
    for word in ("--nextlink", "--rate", "--auto-advance", "DEFAULT INSTANCE", "CONTROL API", "FAULT RULES",
                 "CHOICES WHERE THE CONTRACT IS SILENT", "times", "tenant-0001", "stats"):
        assert word in out
    proc = subprocess.Popen(["/usr/bin/python3", os.path.join(TESTS, "ciemu.py"), "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("CIEMU READY http://127.0.0.1:") and line.rstrip().endswith("/v1")
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    assert proc.stdout.read() == ""


def test_narrowed_metadata_of_a_generated_entity(emu):
    emu.set_entity("Customer", {"attributes": [["CustomerId", "Edm.String"], ["LifetimeValue", "Edm.Decimal"]]})
    page = get(emu, DATA + "Customer?$top=2")
    assert list(page.json["value"][0]) == ["CustomerId", "LifetimeValue"]
    assert b'"LifetimeValue":31431.10}' in page.body
    assert emu.row("Customer", 0) == {"CustomerId": "85cfd850936565341da2be1a2f997a6e", "LifetimeValue": 31431.1}
    assert list(emu.stats("Customer")["null_counts"]) == ["CustomerId", "LifetimeValue"]


def test_refresh_times_are_derived_from_history():
    import ciemu
    scen = ciemu.default_scenario()
    for e in scen["instances"][0]["entities"]:
        e.pop("refreshTime", None)
    scen["instances"][0]["entities"].append({"name": "Loose", "attributes": ["A"], "rows": []})
    with Emulator(scenario=json.loads(ciemu.dumps(ciemu.mark_decimals(scen)))) as emu:
        times = {e["qualifiedEntityName"]: e["refreshTime"] for e in json.loads(emu.request(
            "GET", V1 + "/manage/entities")[2])["entities"]}
        now = emu.control("GET", "clock")["now"]
    assert times["Customer"] == times["UnifiedActivity"] == "2025-03-01T02:19:40.0000000Z"      # last merge
    assert times["RetailPos_Transactions"] == "2025-03-01T02:05:11.1234567Z"    # last good ingestion
    assert times["WebEvents_PageViews"] == "2025-03-01T02:06:02.5000000Z"       # the later one failed
    assert times["HighValue"] == "2025-03-01T02:30:00.0000000Z"
    assert times["RevenueByCountry"] == "2025-03-01T02:34:10.0000000Z"
    assert times["Customer_Measure"] == "2025-03-01T02:34:10.0000000Z"
    assert times["Loose"][:16] == now[:16]
