"""Fault rules (every action, at the socket level where it matters), the rate limit and the
request log (C.6)."""

import email.utils
import json
import os
import time

import pytest

from conftest import DATA, SUB_KEY2, V1, Emulator, call, get, raw_exchange, split_http, token_form

CUST = DATA + "Customer"


# -- transport-level actions ------------------------------------------------------------------

def test_reset_sends_tcp_rst(emu):
    fid = emu.add_fault({"path": "/data/Customer$"}, {"reset": True})
    data, outcome, _ = raw_exchange(emu, CUST)
    assert (data, outcome) == (b"", "reset")
    entry = emu.log()[-1]
    assert entry["fault"] == fid and entry["status"] is None
    emu.clear_faults()
    assert raw_exchange(emu, CUST)[1] == "eof"


def test_truncate_at_keeps_full_content_length_then_closes(emu):
    emu.add_fault({"path": "/data/Customer$"}, {"truncate_at": 100})
    data, outcome, _ = raw_exchange(emu, CUST, headers={"Connection": "keep-alive"})
    assert outcome == "eof"                       # closed even though the client asked keep-alive
    status, headers, body = split_http(data)
    assert status == 200 and len(body) == 100
    assert int(headers["content-length"]) > 10000
    assert headers["connection"] == "close"
    assert emu.log()[-1]["bytes"] == 100


def test_truncate_with_open_chunking(emu):
    emu.add_fault({"path": "/data/Customer$"}, {"truncate_at": 64, "chunked": True})
    data, outcome, _ = raw_exchange(emu, CUST)
    status, headers, body = split_http(data)
    assert outcome == "eof" and headers["transfer-encoding"] == "chunked" and "content-length" not in headers
    size_line, _, rest = body.partition(b"\r\n")
    assert int(size_line, 16) > 10000 and len(rest) == 64 and not body.endswith(b"0\r\n\r\n")


def test_chunked_complete_body(emu):
    emu.add_fault({"path": "/data/Customer$"}, {"chunked": True})
    data, outcome, _ = raw_exchange(emu, CUST + "?$top=2")
    status, headers, body = split_http(data)
    assert status == 200 and headers["transfer-encoding"] == "chunked" and body.endswith(b"\r\n0\r\n\r\n")
    size_line, _, rest = body.partition(b"\r\n")
    assert len(json.loads(rest[:int(size_line, 16)])["value"]) == 2


def test_stall_pauses_mid_body(emu):
    emu.add_fault({"path": "/data/Customer$"}, {"stall": {"after_bytes": 20, "ms": 800}})
    data, outcome, chunks = raw_exchange(emu, CUST + "?$top=5")
    status, headers, body = split_http(data)
    assert status == 200 and len(body) == int(headers["content-length"]) and json.loads(body)
    # The longest silence on the wire is the stall, and it comes right after head + 20 bytes.
    gaps = [(chunks[k + 1][0] - chunks[k][0], k) for k in range(len(chunks) - 1)]
    gap, k = max(gaps)
    assert gap >= 0.7
    assert sum(len(c) for _, c in chunks[:k + 1]) == data.index(b"\r\n\r\n") + 4 + 20


def test_trickle_bps(emu):
    emu.add_fault({"path": "/data/Customer$"}, {"trickle_bps": 4000})
    t0 = time.monotonic()
    data, outcome, chunks = raw_exchange(emu, CUST + "?$top=10")
    elapsed = time.monotonic() - t0
    status, headers, body = split_http(data)
    size = int(headers["content-length"])
    assert status == 200 and len(body) == size and json.loads(body)
    assert size / 4000 * 0.8 <= elapsed <= size / 4000 + 10
    assert len(chunks) > 5


def test_delay_ms_before_status_line(emu):
    emu.add_fault({"path": "/v1/instances$"}, {"delay_ms": 600})
    data, outcome, chunks = raw_exchange(emu, "/v1/instances")
    assert chunks[0][0] >= 0.55 and split_http(data)[0] == 200


def test_delay_then_status(emu):
    emu.add_fault({"path": "/v1/instances$"}, {"delay_ms": 300, "status": 504})
    t0 = time.monotonic()
    assert get(emu, "/v1/instances").status == 504
    assert time.monotonic() - t0 >= 0.28


# -- status replies -------------------------------------------------------------------------------

@pytest.mark.parametrize("status,body,check", [
    (503, "gateway", lambda r: r.json == {"statusCode": 503, "message": "The service is temporarily "
                                           "unavailable. Please retry later."}),
    (500, "odata", lambda r: r.json["error"]["code"] == "InternalServerError"),
    (500, "apierror", lambda r: r.json["errorCode"] == "InternalServerError" and "exceptionCulprit" in r.json),
    (502, "empty", lambda r: r.body == b"" and "content-type" not in r.headers),
    (502, "html", lambda r: r.headers["content-type"].startswith("text/html") and b"502 Bad Gateway" in r.body),
    (500, "raw", lambda r: r.body == b"boom" and r.headers["content-type"].startswith("text/plain")),
    (503, "entra", lambda r: r.json["error"] == "temporarily_unavailable"),
    (503, "storage", lambda r: b"<Code>ServerBusy</Code>" in r.body),
    (403, None, lambda r: r.json == {"statusCode": 403, "message": "Out of call volume quota. "
                                     "Quota will be replenished in 00:10:00."}),
    (400, None, lambda r: r.json["error"]["code"] == "BadRequest"),            # default on /data: odata
])
def test_status_with_each_body_kind(emu, status, body, check):
    action = {"status": status}
    if body:
        action["body"] = body
    if body == "raw":
        action["raw"] = "boom"
    emu.add_fault({"path": "/data/Customer$"}, action)
    r = get(emu, CUST)
    assert r.status == status
    assert check(r), r


def test_default_body_off_data_is_apierror(emu):
    emu.add_fault({"path": "/manage/"}, {"status": 500})
    assert get(emu, V1 + "/manage/entities").json["errorCode"] == "InternalServerError"


def test_429_with_retry_after_seconds_and_date(emu):
    emu.add_fault({"path": "/data/Customer$", "nth": 1}, {"status": 429, "headers": {"Retry-After": "12"}})
    r = get(emu, CUST)
    assert r.status == 429 and r.headers["retry-after"] == "12"
    assert r.json == {"statusCode": 429, "message": "Rate limit is exceeded. Try again in 12 seconds."}
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    emu.add_fault({"path": "/data/Customer$", "nth": 1}, {"status": 429, "headers": {"Retry-After": date}})
    r = get(emu, CUST)
    assert r.status == 429 and r.headers["retry-after"] == date
    assert get(emu, CUST).status == 200


def test_custom_headers_and_content_type(emu):
    emu.add_fault({"path": "/data/Customer$"}, {"status": 503, "body": "raw", "raw": "<x/>",
                                                "headers": {"Content-Type": "application/xml", "X-Test": 1}})
    r = get(emu, CUST)
    assert r.headers["content-type"] == "application/xml" and r.headers["x-test"] == "1" and r.body == b"<x/>"


def test_expire_token(emu):
    tok = emu.token(fresh=True)
    emu.add_fault({"path": "/data/Customer$", "nth": 2}, {"expire_token": True})
    assert get(emu, CUST, token=tok).status == 200
    r = get(emu, CUST, token=tok)
    assert r.status == 401 and r.body == b"" and 'error="invalid_token"' in r.headers["www-authenticate"]
    assert get(emu, CUST, token=tok).status == 401                       # and later
    assert get(emu, V1 + "/manage/entities", token=tok).status == 401
    assert get(emu, CUST, token=emu.token(fresh=True)).status == 200       # a new token works


def test_malformed(emu):
    emu.add_fault({"path": "/data/Customer$"}, {"malformed": True})
    data, outcome, _ = raw_exchange(emu, CUST)
    status, headers, body = split_http(data)
    assert status == 200 and len(body) == int(headers["content-length"]) > 0
    with pytest.raises(ValueError):
        json.loads(body)


def test_wrong_type(emu):
    emu.add_fault({"path": "/data/Customer$"}, {"wrong_type": True})
    r = get(emu, CUST)
    assert r.status == 200 and r.headers["content-type"].startswith("text/html") and b"<html>" in r.body


# -- matching semantics -------------------------------------------------------------------------

def statuses(emu, n, path="/v1/instances"):
    return [get(emu, path).status for _ in range(n)]


def test_nth_fires_once_by_default(emu):
    emu.add_fault({"path": "/v1/instances$", "nth": 2}, {"status": 500})
    assert statuses(emu, 5) == [200, 500, 200, 200, 200]


def test_nth_with_times(emu):
    emu.add_fault({"path": "/v1/instances$", "nth": 2, "times": 3}, {"status": 500})
    assert statuses(emu, 6) == [200, 500, 500, 500, 200, 200]


def test_every(emu):
    emu.add_fault({"path": "/v1/instances$", "every": 3}, {"status": 503})
    assert statuses(emu, 9) == [200, 200, 503] * 3


def test_every_with_times(emu):
    emu.add_fault({"path": "/v1/instances$", "every": 2, "times": 2}, {"status": 503})
    assert statuses(emu, 8) == [200, 503, 200, 503, 200, 200, 200, 200]


def test_times_alone(emu):
    emu.add_fault({"path": "/v1/instances$", "times": 2}, {"status": 502})
    assert statuses(emu, 4) == [502, 502, 200, 200]


def test_no_nth_no_times_is_unlimited_until_deleted(emu):
    fid = emu.add_fault({"path": "/v1/instances$"}, {"status": 500})
    assert statuses(emu, 25) == [500] * 25
    listed = emu.control("GET", "faults")
    assert listed[0]["id"] == fid and listed[0]["fired"] == 25 and not listed[0]["exhausted"]
    emu.control("DELETE", "faults/%d" % fid)
    assert statuses(emu, 2) == [200, 200]
    with pytest.raises(Exception):
        emu.control("DELETE", "faults/%d" % fid)


def test_first_match_wins_and_later_rules_do_not_count(emu):
    first = emu.add_fault({"path": "/v1/instances$", "nth": 2}, {"status": 500})
    second = emu.add_fault({"path": "/v1/instances$", "nth": 2}, {"status": 503})
    assert statuses(emu, 4) == [200, 500, 503, 200]
    listed = {f["id"]: f for f in emu.control("GET", "faults")}
    assert listed[first]["seen"] == 2 and listed[second]["seen"] == 2
    assert [e["fault"] for e in emu.log()[-4:]] == [None, first, second, None]


def test_match_on_method_and_query(emu):
    emu.add_fault({"method": "POST", "path": "/jobs$"}, {"status": 409})
    emu.add_fault({"path": "/data/Customer$", "query": r"\$skip=100\b"}, {"status": 500})
    assert get(emu, V1 + "/workflows/main/jobs").status == 200
    assert call(emu, "POST", V1 + "/workflows/main/jobs?operationType=all").status == 409
    assert get(emu, CUST + "?$skip=10").status == 200
    assert get(emu, CUST + "?%24skip=100").status == 500          # matched on the decoded query
    assert get(emu, CUST + "?$skip=1000").status == 200


def test_faults_on_token_endpoint_and_files(emu):
    uri = get(emu, CUST + "?proxy=true").json["httpRequests"][0]["uri"]
    emu.add_fault({"path": "/oauth2/", "nth": 1}, {"status": 503})
    emu.add_fault({"path": "^/_files/", "nth": 1}, {"status": 500})
    r = token_form(emu)
    assert r.status == 503 and r.json["error"] == "temporarily_unavailable"
    assert token_form(emu).status == 200
    assert emu.request("GET", uri, auth=False)[0] == 500
    assert emu.request("GET", uri, auth=False)[0] == 200


def test_faults_never_touch_control_or_unknown_routes(emu):
    emu.token()
    emu.add_fault({}, {"status": 500})             # matches every API request (the token endpoint too)
    assert emu.control("GET", "settings")["max_top"] == 100
    assert get(emu, "/v1/nope").status == 404
    assert get(emu, "/v1/instances").status == 500


@pytest.mark.parametrize("rule", [{"match": {}, "action": {}}, {"match": {"bogus": 1}, "action": {"status": 500}},
                                  {"match": {}, "action": {"explode": True}},
                                  {"match": {"nth": 1, "every": 2}, "action": {"status": 500}},
                                  {"match": {"path": "("}, "action": {"status": 500}},
                                  {"match": {}, "action": {"status": 500, "body": "xml"}}])
def test_bad_fault_rules_are_400(emu, rule):
    with pytest.raises(Exception) as e:
        emu.control("POST", "faults", rule)
    assert e.value.status == 400


def test_fault_list_and_ids(emu):
    ids = emu.control("POST", "faults", [{"match": {"nth": 1}, "action": {"status": 500}},
                                         {"match": {"nth": 1}, "action": {"status": 501}}])["ids"]
    assert len(ids) == 2 and ids[1] == ids[0] + 1
    assert emu.add_fault({}, {"status": 500}) == ids[1] + 1
    emu.clear_faults()
    assert emu.control("GET", "faults") == []


# -- rate limit --------------------------------------------------------------------------------

def test_rate_limit_sliding_window_and_retry_after(emu):
    emu.settings(clock="manual", rate="3/10")
    assert statuses(emu, 3) == [200] * 3
    r = get(emu, "/v1/instances")
    assert r.status == 429 and r.headers["retry-after"] == "10"
    assert r.json == {"statusCode": 429, "message": "Rate limit is exceeded. Try again in 10 seconds."}
    emu.advance_clock(4)
    r = get(emu, "/v1/instances")
    assert r.status == 429 and r.headers["retry-after"] == "6"
    emu.advance_clock(5.5)                      # 0.5 s left: still at least 1
    assert get(emu, "/v1/instances").headers["retry-after"] == "1"
    emu.advance_clock(0.5)                      # the first three leave the window together
    assert statuses(emu, 4) == [200, 200, 200, 429]


def test_rate_limit_sliding_not_fixed(emu):
    emu.settings(clock="manual", rate="2/10")
    assert get(emu, "/v1/instances").status == 200
    emu.advance_clock(6)
    assert get(emu, "/v1/instances").status == 200
    emu.advance_clock(4)                        # t=10: only the first call has left
    assert statuses(emu, 2) == [200, 429]
    assert get(emu, "/v1/instances").headers["retry-after"] == "6"


def test_rate_limit_is_per_subscription_key(emu):
    emu.settings(clock="manual", rate="1/60")
    assert get(emu, "/v1/instances").status == 200
    assert get(emu, "/v1/instances").status == 429
    assert get(emu, "/v1/instances", key=SUB_KEY2).status == 200
    assert get(emu, "/v1/instances", key=SUB_KEY2).status == 429


def test_rate_limit_real_clock_recovers(emu):
    emu.settings(rate="2/3")
    assert statuses(emu, 2) == [200, 200]
    r = get(emu, "/v1/instances")
    assert r.status == 429 and 1 <= int(r.headers["retry-after"]) <= 3
    time.sleep(int(r.headers["retry-after"]) + 0.1)
    assert get(emu, "/v1/instances").status == 200


def test_bad_rate_setting(emu):
    for bad in ("3", "0/10", "a/b", "3/0"):
        with pytest.raises(Exception) as e:
            emu.settings(rate=bad)
        assert e.value.status == 400
    assert emu.settings(rate="off")["rate"] == "off"


# -- request log ---------------------------------------------------------------------------------

def test_request_log_entries(emu):
    start = emu.control("GET", "log?since=0")["seq"]
    tok = emu.token()
    get(emu, CUST + "?$top=3&$select=CustomerId", headers={"Prefer": "odata.maxpagesize=3",
                                                           "Accept": "application/json"})
    get(emu, "/v1/instances", key="wrong")
    entries = emu.log(since=start)
    assert [e["seq"] for e in entries] == sorted(e["seq"] for e in entries)
    data = [e for e in entries if e["route"] == "data"][0]
    assert data["method"] == "GET" and data["path"] == CUST
    assert data["query"] == {"$top": "3", "$select": "CustomerId"}
    assert data["prefer"] == "odata.maxpagesize=3" and data["accept"] == "application/json"
    assert data["key"] == "primary" and data["token"].startswith("tok-")
    assert data["status"] == 200 and data["rows"] == 3 and data["bytes"] > 0 and data["fault"] is None
    assert data["duration_ms"] >= 0 and data["time"].endswith("Z")
    bad = entries[-1]
    assert bad["key"] == "invalid" and bad["status"] == 401
    text = json.dumps(entries)
    assert tok not in text and "key-primary-0001" not in text and "wrong" not in text
    assert emu.log(since=entries[-1]["seq"]) == []


def test_token_requests_are_logged_without_secrets(emu):
    token_form(emu)
    entry = emu.log()[-1]
    assert entry["route"] == "token" and entry["client"] == "ciflow-client" and entry["status"] == 200
    assert "ciflow-secret-value" not in json.dumps(emu.log())


def test_log_delete(emu):
    get(emu, "/v1/instances")
    assert emu.log()
    emu.clear_log()
    assert emu.log() == []
    get(emu, "/v1/instances")
    assert len(emu.log()) == 1


def test_log_file(tmp_path):
    path = tmp_path / "requests.ndjson"
    with Emulator("--log-file", str(path)) as emu:
        get(emu, "/v1/instances")
        get(emu, DATA + "Customer?$top=2")
        in_memory = emu.log()
    # Lines are written as requests complete (with their duration), like an
    # access log, so a request can finish after the next one began: order by seq.
    lines = sorted((json.loads(x) for x in path.read_text().splitlines()),
                   key=lambda x: x["seq"])
    assert [x["route"] for x in lines] == ["token", "instances", "data"]
    # duration_ms of the in-memory entry is completed just after the reply is sent.
    assert [dict(x, duration_ms=0) for x in lines] == [dict(x, duration_ms=0) for x in in_memory]
    assert os.path.getsize(path) > 0
