"""Every route and alias of the customer_insights flavour (C.2), with the shapes of part A."""

import re

import pytest

from conftest import DATA, I, V1, call, get

TS7 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{7}Z$")
DEFAULT_ENTITIES = ["Customer", "RetailPos_Transactions", "WebEvents_PageViews", "UnifiedActivity",
                    "Customer_Measure", "RevenueByCountry", "HighValue", "Churners"]


def test_instances(emu):
    r = get(emu, "/v1/instances")
    assert r.status == 200
    assert r.json == [{"instanceId": I, "name": "Contoso", "instanceType": "production"}]
    assert r.headers["content-type"].startswith("application/json")


@pytest.mark.parametrize("alias", ["entities", "tables"])
def test_manage_entities_and_alias(emu, alias):
    r = get(emu, V1 + "/manage/" + alias)
    assert r.status == 200
    body = r.json
    assert body["instanceId"] == I
    ents = {e["qualifiedEntityName"]: e for e in body["entities"]}
    assert list(ents) == DEFAULT_ENTITIES
    cust = ents["Customer"]
    assert cust["dataSourceName"] is None and cust["entityType"] == "profile"
    assert cust["keys"] == [[{"name": "CustomerId"}]]
    assert [a["name"] for a in cust["attributes"]][:3] == ["CustomerId", "FirstName", "LastName"]
    assert {a["name"]: a["dataType"] for a in cust["attributes"]}["PurchaseCount"] == "Edm.Int64"
    assert cust["refreshTime"] == "2025-03-01T02:19:40.0000000Z"
    assert len(cust["partitions"]) == 1 and "/_files/" in cust["partitions"][0]["location"]
    pos = ents["RetailPos_Transactions"]
    assert pos["dataSourceName"] == "RetailPos" and pos["keys"] == [[{"name": "TransactionId"}]]
    assert ents["UnifiedActivity"]["incrementalAttribute"] == "ActivityTime"
    assert ents["HighValue"]["entityType"] == "segment"
    for e in ents.values():
        assert TS7.match(e["refreshTime"]), e


@pytest.mark.parametrize("alias", ["entities", "tables"])
def test_manage_one_entity_and_size(emu, alias):
    r = get(emu, V1 + "/manage/%s/RetailPos_Transactions" % alias)
    assert r.status == 200 and r.json["qualifiedEntityName"] == "RetailPos_Transactions"
    size = get(emu, V1 + "/manage/%s/RetailPos_Transactions/entitysize" % alias).json
    # The size is the partition CSV's exact byte count for literal rows.
    csv_uri = r.json["partitions"][0]["location"]
    status, _, csv_bytes = emu.request("GET", csv_uri, auth=False)
    assert status == 200
    assert size == {"qualifiedEntityName": "RetailPos_Transactions", "size": len(csv_bytes), "rowCount": 36}
    cust = get(emu, V1 + "/manage/%s/Customer/entitysize" % alias).json
    assert cust["rowCount"] == 250 and cust["size"] > 250 * 100


def test_unknown_entity_and_instance(emu):
    r = get(emu, V1 + "/manage/entities/Nope")
    assert r.status == 404
    assert r.json["errorCode"] == "EntityNotFound" and r.json["exceptionCulprit"] == "user"
    r = get(emu, "/v1/instances/00000000-0000-0000-0000-000000000000/manage/entities")
    assert r.status == 404 and r.json["errorCode"] == "InstanceNotFound"
    r = get(emu, DATA + "Nope")
    assert r.status == 404 and r.json["error"]["code"] == "EntityNotFound"


@pytest.mark.parametrize("method,path", [("GET", "/v1/nothing"), ("GET", "/v2/instances"),
                                         ("DELETE", "/v1/instances"), ("GET", "/"),
                                         ("PUT", V1 + "/data/Customer"), ("POST", V1 + "/data/")])
def test_unknown_routes_are_gateway_404_before_any_check(emu, method, path):
    r = call(emu, method, path, auth=False)      # no key, no token: the route check comes first
    assert r.status == 404
    assert r.json == {"statusCode": 404, "message": "Resource not found"}


@pytest.mark.parametrize("path", ["/manage/datasources", "/manage/datasources/v2"])
def test_datasources_and_v2_alias(emu, path):
    r = get(emu, V1 + path)
    assert r.status == 200
    metas = [d["dataSourceMetadata"] for d in r.json]
    assert [(m["name"], m["refreshState"], m["lastRefresh"]) for m in metas] == [
        ("RetailPos", "updated", "2025-03-01T02:05:11.1234567Z"),
        ("WebEvents", "updateFailed", "2025-03-01T03:12:30.0000000Z")]
    assert r.json[0]["model"]["entities"][0]["name"] == "RetailPos_Transactions"
    assert get(emu, V1 + path + "?includeModel=false").json[1]["model"] is None


@pytest.mark.parametrize("prefix", ["/manage/datasources/", "/manage/datasources/v2/"])
def test_one_datasource(emu, prefix):
    ds_id = "d8d3b26a-0000-4000-8000-000000000002"
    r = get(emu, V1 + prefix + ds_id + "?includeModel=false")
    assert r.status == 200
    assert r.json["dataSourceMetadata"]["name"] == "WebEvents" and r.json["model"] is None
    assert get(emu, V1 + prefix + ds_id).json["model"]["entities"][0]["name"] == "WebEvents_PageViews"
    r = get(emu, V1 + prefix + "nope")
    assert r.status == 404 and r.json["errorCode"] == "DataSourceNotFound"


@pytest.mark.parametrize("wf", ["/workflows/main", "/manage/workflows/main"])
def test_workflow_routes_and_alias(emu, wf):
    jobs = get(emu, V1 + wf + "/jobs").json
    assert [j["jobStatus"] for j in jobs] == ["failed", "successful"]      # newest first
    assert "tasks" not in jobs[0]
    full = get(emu, V1 + wf + "/jobs?includeTasks=true&top=1").json
    assert len(full) == 1 and full[0]["tasks"][0]["taskStatus"] == "failed"
    assert full[0]["tasks"][0]["ciErrors"][0]["errorCode"] == "IngestionFailed"
    one = get(emu, V1 + wf + "/jobs/" + jobs[1]["jobId"]).json
    assert one["operationType"] == "all" and len(one["tasks"]) == 9
    assert get(emu, V1 + wf + "/jobs/nope").status == 404
    status = get(emu, V1 + wf + "/status").json
    merge = [n for n in status if n["operationType"] == "merge"]
    assert merge == [{"operationType": "merge", "identifier": "Merge", "taskStatus": "successful",
                      "endTimestamp": "2025-03-01T02:19:40.0000000Z",
                      "lastSuccessfulTimestamp": "2025-03-01T02:19:40.0000000Z"}]
    created = call(emu, "POST", V1 + wf + "/jobs?operationType=all&forceRunRequested=true")
    assert created.status == 200
    job = created.json
    assert (job["jobStatus"], job["jobSubmissionKind"], job["jobType"]) == ("queued", "onDemand", "full")
    cancelled = call(emu, "POST", V1 + wf + "/jobs/%s/cancel" % job["jobId"])
    assert cancelled.status == 200 and cancelled.json["jobStatus"] == "aborted"
    assert call(emu, "POST", V1 + wf + "/jobs/%s/cancel" % job["jobId"]).status == 400


@pytest.mark.parametrize("wf", ["/workflows/other", "/manage/workflows/Main"])
def test_other_workflow_names_404(emu, wf):
    r = get(emu, V1 + wf + "/jobs")
    assert r.status == 404 and r.json["errorCode"] == "WorkflowNotFound"


def test_jobs_top_validation(emu):
    assert get(emu, V1 + "/workflows/main/jobs?top=0").status == 400
    assert get(emu, V1 + "/workflows/main/jobs?top=x").status == 400
    assert call(emu, "POST", V1 + "/workflows/main/jobs").status == 400
    assert call(emu, "POST", V1 + "/workflows/main/jobs?operationType=bogus").status == 400


def test_segments_and_measures(emu):
    segs = get(emu, V1 + "/manage/segments").json
    assert [s["name"] for s in segs] == ["HighValue", "Churners"]
    hv = segs[0]["evaluationStatus"]
    assert hv["jobStatus"] == "CompletedSuccess" and hv["evaluationDate"] == "2025-03-01T02:30:00.0000000Z"
    members = get(emu, DATA + "HighValue?$top=100").json["value"]
    assert hv["entityCount"] == len(members) > 0
    ms = get(emu, V1 + "/manage/measures").json
    assert [m["name"] for m in ms] == ["TotalRevenue", "RevenueByCountry"]
    total = get(emu, V1 + "/manage/measures/TotalRevenue").json
    assert total["definition"]["isScalar"] is True
    pos = emu.stats("RetailPos_Transactions")
    assert total["output"]["values"] == {"TotalRevenue": pos["sums"]["Amount"]}
    by = get(emu, V1 + "/manage/measures/RevenueByCountry").json
    assert by["definition"]["isScalar"] is False and by["definition"]["dimensions"][0]["name"] == "Country"
    assert get(emu, V1 + "/manage/measures/Nope").status == 404


def test_query_encoded_into_the_data_path(emu):
    r = get(emu, DATA + "Customer%3F%24top%3D3%26%24select%3DCustomerId%2CCountry")
    assert r.status == 200
    rows = r.json["value"]
    assert len(rows) == 3 and all(list(x) == ["CustomerId", "Country"] for x in rows)
    assert [x["CustomerId"] for x in rows] == [x["CustomerId"] for x in emu.rows("Customer")[:3]]


def test_encoded_dollar_and_plus_as_space(emu):
    assert len(get(emu, DATA + "Customer?%24top=4").json["value"]) == 4
    plus = get(emu, DATA + "Customer?$filter=Country+eq+'Germany'&$select=CustomerId").json["value"]
    pct = get(emu, DATA + "Customer?$filter=Country%20eq%20'Germany'&$select=CustomerId").json["value"]
    assert plus == pct and len(plus) > 0


@pytest.mark.parametrize("op,ids", [("Ingestion", "'RetailPos'"), ("ingestion", "RetailPos"),
                                    ("INGESTION", "d8d3b26a-0000-4000-8000-000000000001")])
def test_enum_query_values_any_case_and_quoted_identifiers(emu, op, ids):
    r = call(emu, "POST", V1 + "/workflows/main/jobs?operationType=%s&identifiers=%s" % (op, ids))
    assert r.status == 200, r
    assert r.json["operationType"] == "ingestion"
    assert [(t["operationType"], t["identifier"]) for t in r.json["tasks"]] == [("ingestion", "RetailPos")]


def test_reply_sequence_header(emu):
    a = int(get(emu, "/v1/instances").headers["x-emulator-seq"])
    b = int(get(emu, "/v1/instances").headers["x-emulator-seq"])
    assert b == a + 1
    assert get(emu, "/nothing", auth=False).headers["x-emulator-seq"] == str(b + 1)


def test_keep_alive_many_requests_on_one_connection(emu):
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=10)
    hdrs = {"Ocp-Apim-Subscription-Key": "key-primary-0001", "Authorization": "Bearer " + emu.token()}
    socks = set()
    for k in range(5):
        conn.request("GET", DATA + "Customer?$top=2&$skip=%d" % k, headers=hdrs)
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Connection") == "keep-alive"
        assert len(resp.read()) == int(resp.getheader("Content-Length"))
        socks.add(id(conn.sock))
    conn.close()
    assert len(socks) == 1
