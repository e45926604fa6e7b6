"""Fixtures and helpers for the emulator's own tests (tests/emulator/).

One default emulator serves the whole session (`server`); the `emu` fixture resets it before
each test, so tests may change settings, add faults and data freely.  Tests that need command
line options start their own Emulator.
"""

import json
import os
import socket
import sys
import time
import urllib.parse
from decimal import Decimal

import pytest

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, TESTS)

from emulator_client import (CLIENT_ID, CLIENT_SECRET, INSTANCE_ID, SCOPE, SUB_KEY,  # noqa: E402
                             SUB_KEY2, TENANT, Emulator)

__all__ = ["CLIENT_ID", "CLIENT_SECRET", "INSTANCE_ID", "SCOPE", "SUB_KEY", "SUB_KEY2", "TENANT", "Emulator",
           "I", "V1", "DATA", "TESTS", "Resp", "call", "get", "token_form", "raw_exchange", "split_http",
           "keys_of", "pull_links", "pull_skip"]

I = INSTANCE_ID
V1 = "/v1/instances/" + I
DATA = V1 + "/data/"


@pytest.fixture(scope="session")
def server():
    emu = Emulator()
    emu.start()
    yield emu
    emu.stop()


@pytest.fixture
def emu(server):
    server.reset()
    before = len(server.stderr_text())
    yield server
    err = server.stderr_text()[before:]
    assert "Traceback" not in err, err          # an emulator bug shows up in the test that hit it


class Resp:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    @property
    def json(self):
        return json.loads(self.body)

    @property
    def exact(self):
        """JSON with decimals as Decimal: number text checks without float rounding."""
        return json.loads(self.body, parse_float=Decimal)

    def __repr__(self):
        return "<Resp %d %r>" % (self.status, self.body[:300])


def call(emu, method, path, headers=None, body=None, auth=True, key=SUB_KEY, token=None):
    """An API call; auth=True adds the key (unless key=None) and a bearer (token= to override)."""
    hdrs = {}
    if auth:
        if key is not None:
            hdrs["Ocp-Apim-Subscription-Key"] = key
        hdrs["Authorization"] = "Bearer " + (token or emu.token())
    hdrs.update(headers or {})
    return Resp(*emu.request(method, path, headers=hdrs, body=body, auth=False))


def get(emu, path, **kw):
    return call(emu, "GET", path, **kw)


def token_form(emu, tenant=TENANT, **fields):
    form = {"grant_type": "client_credentials", "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET, "scope": SCOPE}
    form.update(fields)
    form = {k: v for k, v in form.items() if v is not None}
    return Resp(*emu.request("POST", "/%s/oauth2/v2.0/token" % tenant, auth=False,
                             headers={"Content-Type": "application/x-www-form-urlencoded"},
                             body=urllib.parse.urlencode(form)))


def raw_exchange(emu, path, headers=None, timeout=10.0, method="GET"):
    """Send one request on a fresh socket and read until the peer closes, resets or the
    timeout passes.  Returns (data, outcome, [(seconds since send, bytes)...]) with outcome
    "eof", "reset" or "timeout"."""
    hdrs = {"Host": "127.0.0.1:%d" % emu.port, "Connection": "close",
            "Ocp-Apim-Subscription-Key": SUB_KEY, "Authorization": "Bearer " + emu.token()}
    hdrs.update(headers or {})
    req = "%s %s HTTP/1.1\r\n%s\r\n" % (method, path, "".join("%s: %s\r\n" % kv for kv in hdrs.items()))
    s = socket.create_connection(("127.0.0.1", emu.port), timeout=timeout)
    chunks, t0 = [], time.monotonic()
    try:
        s.sendall(req.encode())
        while True:
            try:
                b = s.recv(65536)
            except ConnectionResetError:
                return b"".join(c for _, c in chunks), "reset", chunks
            except socket.timeout:
                return b"".join(c for _, c in chunks), "timeout", chunks
            if not b:
                return b"".join(c for _, c in chunks), "eof", chunks
            chunks.append((time.monotonic() - t0, b))
    finally:
        s.close()


def split_http(data):
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


def keys_of(rows, key="CustomerId"):
    return [r[key] for r in rows]


def pull_links(emu, first_path, headers=None, limit=1000):
    """Follow @odata.nextLink from first_path; relative links resolve against the request URL.
    Returns (rows, responses)."""
    url = emu.root + first_path
    rows, responses = [], []
    for _ in range(limit):
        r = get(emu, url, headers=headers)
        assert r.status == 200, r
        responses.append(r)
        d = r.json
        rows.extend(d["value"])
        link = d.get("@odata.nextLink")
        if not link:
            return rows, responses
        url = urllib.parse.urljoin(url, link)
    raise AssertionError("no end after %d pages" % limit)


def pull_skip(emu, entity, top, extra=""):
    """Skip paging as ciflow does: advance $skip by the rows received, stop at an empty page."""
    rows, sizes, skip = [], [], 0
    while True:
        r = get(emu, DATA + "%s?$top=%d&$skip=%d%s" % (entity, top, skip, extra))
        assert r.status == 200, r
        page = r.json["value"]
        sizes.append(len(page))
        if not page:
            return rows, sizes
        rows.extend(page)
        skip += len(page)
