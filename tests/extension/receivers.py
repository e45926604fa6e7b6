"""Receivers of event deliveries (issue 13), started by the tests, and the
shared helpers of their tests (a test CA, one delivery pass).

* ``HttpReceiver``: an HTTP(S) server that records every request (path,
  headers, body, time) and answers each path as scripted: a status (with
  headers), or ``"hang"`` (no answer until the receiver stops);
* ``SmtpReceiver``: an SMTP server (python3-aiosmtpd) that records every
  mail, with STARTTLS, implicit TLS and AUTH on demand.
"""

import json
import os
import ssl
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from harness import free_port

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def tls_dir():
    """A throw-away CA and a certificate for 127.0.0.1 (tests/make_test_ca.sh)."""
    d = tempfile.mkdtemp(prefix="ciflow-receivers-ca-")
    os.chmod(d, 0o755)
    subprocess.run(["sh", os.path.join(HERE, "..", "make_test_ca.sh"), d], check=True)
    return d


def deliver(db, settings=None):
    """One delivery pass, CALL ciflow.deliver() in autocommit with the given
    settings; returns how many deliveries it attempted."""
    conn = db.connect()
    try:
        with conn.cursor() as cur:
            for k, v in (settings or {}).items():
                cur.execute(f"SET {k} = %s", (str(v),))
            cur.execute("CALL ciflow.deliver()")
            return cur.fetchone()[0]
    finally:
        conn.close()


class HttpReceiver:
    def __init__(self, tls_dir=None):
        self.requests = []
        self.scripts = {}          # path -> list of answers, the last one repeats
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.requests.append({
                        "path": self.path, "headers": dict(self.headers.items()),
                        "body": body, "at": time.monotonic()})
                    script = receiver.scripts.get(self.path, [200])
                    answer = script.pop(0) if len(script) > 1 else script[0]
                if answer == "hang":
                    receiver.stopping.wait(60)
                    return
                status, headers = (answer, {}) if isinstance(answer, int) else answer
                reply = b'{"ok": true}' if status < 300 else b"sink says no"
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        scheme = "http"
        if tls_dir:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(f"{tls_dir}/server.pem", f"{tls_dir}/server.key")
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.base = f"{scheme}://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path):
        return self.base + path

    def script(self, path, answers):
        with self.lock:
            self.scripts[path] = list(answers)

    def received(self, path=None):
        with self.lock:
            return [r for r in self.requests if path is None or r["path"] == path]

    def json_bodies(self, path=None):
        return [json.loads(r["body"]) for r in self.received(path)]

    def clear(self):
        with self.lock:
            self.requests.clear()
            self.scripts.clear()

    def stop(self):
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


class SmtpReceiver:
    """aiosmtpd in a thread; mails as (envelope from, recipients, message bytes)."""

    def __init__(self, tls_dir=None, implicit_tls=False, auth=None, require_starttls=False):
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult

        self.mails = []
        self.logins = []
        receiver = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):
                receiver.mails.append({"from": envelope.mail_from,
                                       "to": list(envelope.rcpt_tos),
                                       "data": envelope.original_content or envelope.content,
                                       "tls": session.ssl is not None})
                return "250 OK"

        def authenticator(server, session, envelope, mechanism, auth_data):
            receiver.logins.append((mechanism, auth_data.login, auth_data.password,
                                    session.ssl is not None))
            ok = auth is not None and (auth_data.login, auth_data.password) == \
                (auth[0].encode(), auth[1].encode())
            return AuthResult(success=ok, handled=False,
                              message=None if ok else "535 5.7.8 Authentication credentials invalid")

        ctx = None
        if tls_dir:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(f"{tls_dir}/server.pem", f"{tls_dir}/server.key")
        self.port = free_port()
        kwargs = dict(hostname="127.0.0.1", port=self.port)
        if implicit_tls:
            kwargs["ssl_context"] = ctx
        elif ctx is not None:
            kwargs["tls_context"] = ctx
            kwargs["require_starttls"] = require_starttls
        if auth is not None:
            kwargs["authenticator"] = authenticator
            kwargs["auth_require_tls"] = True
        self.controller = Controller(Handler(), **kwargs)
        if implicit_tls:
            # The controller's readiness probe wraps its socket with the server's
            # context; probe as a client that does not check the test CA instead.
            def trigger():
                import socket
                probe = ssl.create_default_context()
                probe.check_hostname = False
                probe.verify_mode = ssl.CERT_NONE
                with socket.create_connection(("127.0.0.1", self.port), 1.0) as raw:
                    with probe.wrap_socket(raw) as s:
                        s.recv(1024)
            self.controller._trigger_server = trigger
        self.controller.start()

    def url(self, scheme="smtp"):
        return f"{scheme}://127.0.0.1:{self.port}"

    def stop(self):
        self.controller.stop()
