"""The token endpoint, the gateway's key check, the bearer check and their order (A.2, C.2)."""

import base64
import urllib.parse

import pytest

from conftest import (CLIENT_ID, CLIENT_SECRET, DATA, SCOPE, SUB_KEY2, TENANT, V1, call, get,
                      token_form)


def test_token_success_shape(emu):
    r = token_form(emu)
    assert r.status == 200
    body = r.json
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3599 and body["ext_expires_in"] == 3599
    assert body["access_token"].startswith("eyJ0eXAi")
    assert r.headers["cache-control"].startswith("no-store")
    assert get(emu, "/v1/instances", token=body["access_token"]).status == 200


@pytest.mark.parametrize("tenant,fields,status,error,code", [
    (TENANT, {"grant_type": "password"}, 400, "unsupported_grant_type", 70003),
    (TENANT, {"grant_type": None}, 400, "unsupported_grant_type", 70003),
    (TENANT, {"scope": "https://graph.microsoft.com/.default"}, 400, "invalid_scope", 70011),
    (TENANT, {"scope": None}, 400, "invalid_scope", 70011),
    (TENANT, {"client_id": "someone-else"}, 401, "invalid_client", 700016),
    (TENANT, {"client_secret": "wrong"}, 401, "invalid_client", 7000215),
    (TENANT, {"client_secret": None}, 401, "invalid_client", 7000215),
    (TENANT, {"client_id": None}, 400, "invalid_request", 900144),
    ("other-tenant", {}, 400, "invalid_request", 90002),
])
def test_token_errors_are_entra_shaped(emu, tenant, fields, status, error, code):
    r = token_form(emu, tenant=tenant, **fields)
    assert r.status == status
    body = r.json
    assert body["error"] == error
    assert body["error_codes"] == [code]
    assert body["error_description"].startswith("AADSTS%d: " % code)
    assert {"timestamp", "trace_id", "correlation_id"} <= set(body)


def test_grant_is_checked_before_client_and_client_before_scope(emu):
    assert token_form(emu, grant_type="x", client_secret="bad", scope="bad").json["error"] == "unsupported_grant_type"
    assert token_form(emu, client_secret="bad", scope="bad").json["error"] == "invalid_client"


def test_client_secret_basic(emu):
    basic = base64.b64encode(("%s:%s" % (CLIENT_ID, CLIENT_SECRET)).encode()).decode()
    body = urllib.parse.urlencode({"grant_type": "client_credentials", "scope": SCOPE})
    status, _, raw = emu.request("POST", emu.token_url, auth=False, body=body, headers={
        "Authorization": "Basic " + basic, "Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200


def test_token_expires_in_as_string(emu):
    emu.settings(token_expires_as_string=True, token_ttl=600)
    body = token_form(emu).json
    assert body["expires_in"] == "600" and body["ext_expires_in"] == "600"


def test_missing_key(emu):
    r = get(emu, "/v1/instances", key=None)
    assert r.status == 401
    assert r.json == {"statusCode": 401, "message": "Access denied due to missing subscription key. "
                      "Make sure to include subscription key when making requests to an API."}


def test_invalid_key(emu):
    r = get(emu, "/v1/instances", key="key-nope")
    assert r.status == 401
    assert r.json["statusCode"] == 401 and "invalid subscription key" in r.json["message"]


def test_secondary_key_and_key_in_query(emu):
    assert get(emu, "/v1/instances", key=SUB_KEY2).status == 200
    r = get(emu, "/v1/instances?subscription-key=key-primary-0001", key=None)
    assert r.status == 200
    entry = emu.log()[-1]
    assert entry["key"] == "primary" and entry["query"]["subscription-key"] == "<redacted>"


def _assert_invalid_token(r, description):
    assert r.status == 401
    assert r.body == b""
    www = r.headers["www-authenticate"]
    assert www.startswith("Bearer ") and 'error="invalid_token"' in www and description in www


def test_missing_unknown_and_garbage_bearer(emu):
    _assert_invalid_token(call(emu, "GET", "/v1/instances", auth=False,
                               headers={"Ocp-Apim-Subscription-Key": "key-primary-0001"}), "missing")
    _assert_invalid_token(get(emu, "/v1/instances", token="not-a-token"), "invalid")
    _assert_invalid_token(call(emu, "GET", "/v1/instances", auth=False, headers={
        "Ocp-Apim-Subscription-Key": "key-primary-0001", "Authorization": "Basic abc"}), "missing")
    assert emu.log()[-2]["token"] == "unknown"


def test_token_expiry_with_manual_clock(emu):
    emu.settings(clock="manual")
    tok = emu.token(fresh=True)
    emu.advance_clock(3598)
    assert get(emu, "/v1/instances", token=tok).status == 200
    emu.advance_clock(1)          # 3599 s: expires_in has run out
    _assert_invalid_token(get(emu, "/v1/instances", token=tok), "expired")
    fresh = emu.token(fresh=True)
    assert get(emu, "/v1/instances", token=fresh).status == 200
    state = emu.control("GET", "clock")
    assert state["mode"] == "manual"


def test_token_ttl_setting(emu):
    emu.settings(clock="manual", token_ttl=10)
    body = token_form(emu).json
    assert body["expires_in"] == 10
    emu.advance_clock(9.5)
    assert get(emu, "/v1/instances", token=body["access_token"]).status == 200
    emu.advance_clock(0.5)
    assert get(emu, "/v1/instances", token=body["access_token"]).status == 401


def test_control_expires_tokens(emu):
    tok = emu.token(fresh=True)
    other = token_form(emu).json["access_token"]
    tid = [t for t in emu.control("GET", "tokens") if t["valid"]][-1]["id"]
    assert emu.control("POST", "tokens/expire", {"token_id": tid}) == {"expired": 1}
    assert get(emu, "/v1/instances", token=other).status == 401
    assert get(emu, "/v1/instances", token=tok).status == 200
    emu.expire_tokens()
    _assert_invalid_token(get(emu, "/v1/instances", token=tok), "expired")


# -- check order: route -> faults -> key -> rate limit -> bearer -> handler ----------------------

def test_fault_comes_before_the_key_check(emu):
    emu.add_fault({"path": "/v1/instances$"}, {"status": 503})
    assert get(emu, "/v1/instances", key=None, token="bad").status == 503


def test_key_comes_before_rate_limit(emu):
    emu.settings(rate="1/60")
    for _ in range(3):                         # rejected keys never reach (or use up) the limiter
        assert get(emu, "/v1/instances", key="bad").status == 401
    assert get(emu, "/v1/instances").status == 200
    assert get(emu, "/v1/instances").status == 429


def test_rate_limit_comes_before_bearer(emu):
    emu.settings(rate="1/60")
    assert get(emu, "/v1/instances", token="bad").status == 401     # passed the limiter
    r = get(emu, "/v1/instances", token="bad")
    assert r.status == 429 and int(r.headers["retry-after"]) >= 1


def test_bearer_comes_before_the_handler(emu):
    assert get(emu, DATA + "NoSuchEntity", token="bad").status == 401
    assert get(emu, V1 + "/workflows/other/jobs", token="bad").status == 401
    assert get(emu, "/v1/instances/unknown-instance/manage/entities", key="bad").status == 401
    assert get(emu, DATA + "NoSuchEntity").status == 404


def test_token_endpoint_and_files_skip_key_bearer_and_rate_limit(emu):
    uri = get(emu, DATA + "Customer?proxy=true").json["httpRequests"][0]["uri"]
    emu.settings(rate="1/60")
    assert get(emu, "/v1/instances").status == 200
    assert get(emu, "/v1/instances").status == 429
    for _ in range(3):
        assert token_form(emu).status == 200
        status, _, body = emu.request("GET", uri, auth=False)
        assert status == 200 and body
