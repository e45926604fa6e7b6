"""Start, drive and stop the Customer Insights emulator (tests/ciemu.py) from Python.

Used by the emulator's own pytest suite (tests/emulator/) and by the extension harness
(tests/harness.py).  Standard library only.

Constants (the emulator's default instance, see ``ciemu.py --help``)::

    TENANT, CLIENT_ID, CLIENT_SECRET, SCOPE, SUB_KEY, SUB_KEY2, INSTANCE_ID

Typical use::

    from emulator_client import Emulator, SUB_KEY
    with Emulator("--max-top", "50", scenario={"instances": [...]}, tls=True) as emu:
        emu.base_url    # e.g. https://127.0.0.1:41234/v1   (or .../api/data/v9.2 for dataverse)
        emu.root        # https://127.0.0.1:41234
        emu.port        # 41234
        emu.token_url   # https://127.0.0.1:41234/tenant-0001/oauth2/v2.0/token
        emu.ca_file     # CA bundle that verifies the server (None without tls=True)
        emu.reset()
        fid = emu.add_fault({"path": "/data/Customer", "nth": 2}, {"status": 503})
        emu.settings(nextlink="relative", max_top=100)
        emu.set_entity("Things", {"attributes": [{"name": "Id", "dataType": "Edm.Int32"}],
                                  "keys": [["Id"]]}, rows=[{"Id": 1}])
        emu.rows("Things")        # every row, in served order
        emu.stats("Customer")     # row count, null counts, sums, date ranges, sha256
        emu.log(since=0)          # request log entries
        status, headers, body = emu.request("GET", "/v1/instances")   # raw API call with auth

``Emulator(*extra_args, scenario=None, tls=False, cwd=None)``
    extra_args are passed to ciemu.py after ``--port 0``; scenario is a path or a dict (a dict
    is written to a JSON file in the emulator's temp dir).  tls=True creates a throw-away CA with
    tests/make_test_ca.sh and starts the emulator with --tls-cert/--tls-key.
``start()``      spawn ``/usr/bin/python3 tests/ciemu.py --port 0 ...`` and wait (15 s) for
                 ``CIEMU READY <base-url>``; raises EmulatorError with stderr on failure.
``stop()``       SIGTERM, then SIGKILL after 5 s; always reaps the child and removes the temp dir.
``control(method, path, body=None)``  JSON call to ``<root>/_control/<path>``; returns the parsed
                 JSON (None for an empty body); raises EmulatorError(status, body) on HTTP errors.
Wrappers: ``reset()``, ``settings(**kw)``, ``add_fault(match, action) -> id``, ``clear_faults()``,
``log(since=0)``, ``clear_log()``, ``set_entity(name, metadata, rows=None, generate=None)``,
``rows(name)``, ``row(name, index)``, ``stats(name)``, ``state()``, ``advance_clock(seconds)``,
``expire_tokens()``, ``token(client_id=CLIENT_ID, ...)`` (fetches an access token),
``request(method, path_or_url, headers=None, body=None, auth=True)`` (raw call; adds the
subscription key and a bearer token unless auth=False; returns (status, headers, body bytes)).

``token()`` caches the default client's token; ``reset()`` and ``expire_tokens()`` drop the
cache, ``token(fresh=True)`` bypasses it.  ``stats(name)`` returns {"row_count", "null_counts",
"sums" (exact, strings), "min", "max" (date columns), "sha256" (of the entity's NDJSON)}.
``log()`` entries are recorded before the reply is sent, so a request is in the log as soon as
its response arrives (its duration_ms is completed just after).

The temp dir (CA files, scenario file, emulator stderr) is world-readable (0755 dirs, 0644
files) because the PostgreSQL server under test runs as user postgres and reads the CA file.
"""

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request

# The default instance's credentials are defined once, by the emulator itself.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ciemu import (CLIENT_ID, CLIENT_SECRET, INSTANCE_ID, SCOPE, SUB_KEY,  # noqa: E402
                   SUB_KEY2, TENANT)

PYTHON = "/usr/bin/python3"
HERE = os.path.dirname(os.path.abspath(__file__))
CIEMU = os.path.join(HERE, "ciemu.py")
MAKE_CA = os.path.join(HERE, "make_test_ca.sh")
READY_TIMEOUT = 15.0


class EmulatorError(Exception):
    """An emulator that would not start, or a control call answered with an HTTP error."""

    def __init__(self, message, status=None, body=None):
        super().__init__(message)
        self.status = status
        self.body = body


def _make_world_readable(path):
    """0755 for directories, 0644 for files: the postgres user must read the CA file."""
    os.chmod(path, 0o755)
    for dirpath, dirnames, filenames in os.walk(path):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o644)


class Emulator:
    """One emulator process on an ephemeral loopback port (see the module docstring)."""

    def __init__(self, *extra_args, scenario=None, tls=False, cwd=None):
        self.extra_args = [str(a) for a in extra_args]
        self.scenario = scenario
        self.tls = tls
        self.cwd = cwd
        self.proc = None
        self.tmpdir = None
        self.base_url = self.root = self.token_url = self.ca_file = None
        self.port = None
        self.stderr_path = None
        self._ssl_ctx = None
        self._token = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self):
        try:
            return self._start()
        except BaseException:
            self.stop()                 # never leak a process or a temp dir
            raise

    def _start(self):
        self.tmpdir = tempfile.mkdtemp(prefix="ciemu-")
        args = [PYTHON, CIEMU, "--port", "0"]
        if self.tls:
            subprocess.run(["/bin/sh", MAKE_CA, self.tmpdir], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            args += ["--tls-cert", os.path.join(self.tmpdir, "server.pem"),
                     "--tls-key", os.path.join(self.tmpdir, "server.key")]
            self.ca_file = os.path.join(self.tmpdir, "ca.pem")
            self._ssl_ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.scenario is not None:
            path = self.scenario
            if isinstance(self.scenario, dict):
                path = os.path.join(self.tmpdir, "scenario.json")
                with open(path, "w", encoding="utf-8") as f:
                    json.dump(self.scenario, f)
            args += ["--scenario", os.path.abspath(path)]
        args += self.extra_args
        _make_world_readable(self.tmpdir)
        self.stderr_path = os.path.join(self.tmpdir, "stderr.log")
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err,
                                         stdin=subprocess.DEVNULL, cwd=self.cwd)
        ready = threading.Event()
        found = []

        def drain():
            # Keep reading stdout for the process's whole life so it can never block on a pipe.
            for raw in self.proc.stdout:
                line = raw.decode("utf-8", "replace").strip()
                if not found and line.startswith("CIEMU READY "):
                    found.append(line.split(" ", 2)[2])
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        ready.wait(READY_TIMEOUT)
        if not found:
            raise EmulatorError("emulator did not become ready: " + self.stderr_text()[-4000:])
        self.base_url = found[0]
        parsed = urllib.parse.urlsplit(self.base_url)
        self.root = "%s://%s" % (parsed.scheme, parsed.netloc)
        self.port = parsed.port
        self.token_url = "%s/%s/oauth2/v2.0/token" % (self.root, TENANT)
        return self

    def stop(self):
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            if self.proc.stdout:
                self.proc.stdout.close()
            self.proc = None
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    def stderr_text(self):
        try:
            with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except (OSError, TypeError):
            return ""

    # -- HTTP --------------------------------------------------------------------------------

    def _open(self, req, timeout):
        return urllib.request.urlopen(req, timeout=timeout, context=self._ssl_ctx)

    def request(self, method, path_or_url, headers=None, body=None, auth=True, timeout=60):
        """A raw API call.  Returns (status, headers as a dict with lower-case names, body bytes).

        path_or_url is absolute or relative to root (e.g. "/v1/instances").  auth=True adds
        Ocp-Apim-Subscription-Key (customer_insights flavour) and a bearer token; a caller that
        passes its own header of the same name wins.  body: bytes, str or a JSON-able object.
        Characters a URL cannot hold (spaces, '"', non-ASCII) are percent-encoded; existing
        escapes are kept, so server links can be passed back verbatim."""
        url = path_or_url if "://" in path_or_url else self.root + path_or_url
        # Spaces, double quotes and non-ASCII are escaped; existing %XX escapes stay as they are.
        url = urllib.parse.quote(url, safe=":/?&=$,;'()*!@%+[]~#")
        hdrs = {}
        if auth:
            if not self.base_url.endswith("/api/data/v9.2"):
                hdrs["Ocp-Apim-Subscription-Key"] = SUB_KEY
            hdrs["Authorization"] = "Bearer " + self.token()
        hdrs.update(headers or {})
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
            hdrs.setdefault("Content-Type", "application/json")
        if isinstance(body, str):
            body = body.encode("utf-8")
        req = urllib.request.Request(url, data=body, headers=hdrs, method=method)
        try:
            with self._open(req, timeout) as resp:
                return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
        except urllib.error.HTTPError as e:
            with e:
                return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()

    def token(self, client_id=CLIENT_ID, client_secret=CLIENT_SECRET, scope=None, fresh=False):
        """An access token from the emulator's token endpoint (cached unless fresh=True)."""
        if self._token and not fresh and client_id == CLIENT_ID and scope is None:
            return self._token
        if scope is None:
            scope = SCOPE if not self.base_url.endswith("/api/data/v9.2") else self.root + "/.default"
        form = urllib.parse.urlencode({"grant_type": "client_credentials", "client_id": client_id,
                                       "client_secret": client_secret, "scope": scope}).encode()
        req = urllib.request.Request(self.token_url, data=form, method="POST", headers={
            "Content-Type": "application/x-www-form-urlencoded"})
        try:
            with self._open(req, 30) as resp:
                tok = json.loads(resp.read())["access_token"]
        except urllib.error.HTTPError as e:
            with e:
                raise EmulatorError("token request failed: HTTP %d %s" % (e.code, e.read()[:500]),
                                    e.code) from None
        if client_id == CLIENT_ID:
            self._token = tok
        return tok

    def control(self, method, path, body=None):
        """Call <root>/_control/<path>; parsed JSON back, EmulatorError on an HTTP error."""
        url = "%s/_control/%s" % (self.root, path.lstrip("/"))
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with self._open(req, 300) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            with e:
                text = e.read().decode("utf-8", "replace")
            raise EmulatorError("control %s %s: HTTP %d %s" % (method, path, e.code, text),
                                e.code, text) from None
        return json.loads(raw) if raw else None

    # -- control wrappers --------------------------------------------------------------------

    def reset(self):
        self._token = None
        return self.control("POST", "reset", {})

    def state(self):
        return self.control("GET", "state")

    def settings(self, **kw):
        return self.control("POST", "settings", kw)

    def add_fault(self, match, action):
        return self.control("POST", "faults", {"match": match, "action": action})["id"]

    def clear_faults(self):
        return self.control("DELETE", "faults")

    def log(self, since=0):
        return self.control("GET", "log?since=%d" % since)["entries"]

    def clear_log(self):
        return self.control("DELETE", "log")

    def advance_clock(self, seconds):
        return self.control("POST", "clock", {"advance_s": seconds})

    def expire_tokens(self):
        self._token = None
        return self.control("POST", "tokens/expire", {})

    def set_entity(self, name, metadata, rows=None, generate=None):
        body = dict(metadata)
        if rows is not None:
            body["rows"] = rows
        if generate is not None:
            body["generate"] = generate
        return self.control("POST", "entities/" + urllib.parse.quote(name, safe=""), body)

    def rows(self, name, chunk=5000):
        out, offset = [], 0
        q = urllib.parse.quote(name, safe="")
        while True:
            page = self.control("GET", "entities/%s/rows?offset=%d&limit=%d" % (q, offset, chunk))
            out.extend(page["rows"])
            offset += len(page["rows"])
            if not page["rows"] or offset >= page["total"]:
                return out

    def row(self, name, index):
        return self.control("GET", "entities/%s/rows/%d" % (urllib.parse.quote(name, safe=""), index))

    def stats(self, name):
        return self.control("GET", "entities/%s/stats" % urllib.parse.quote(name, safe=""))
