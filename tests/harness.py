"""Throwaway PostgreSQL 15 clusters for ciflow's tests and demo.

This module owns the PostgreSQL side of the test harness (issue 2, item 3):
`PgCluster` creates a cluster in a fresh temporary directory, owned by an
unprivileged user (PostgreSQL refuses to run as root), starts it on a free
loopback port with its unix socket in the same directory, and always tears it
down again: `cleanup()` stops the server in immediate mode and removes the
directory, pytest fixtures call it in their finalizers, and an atexit hook
plus SIGTERM/SIGHUP handlers catch whatever a crash or interruption left.

The emulator side lives in tests/emulator_client.py (helper A); tests combine
both through tests/conftest.py.

Typical use:

    with PgCluster(settings={"log_min_messages": "debug1"}) as pg:
        pg.sql("CREATE EXTENSION ciflow")
        rows = pg.sql("SELECT * FROM ciflow.connections")

Only the standard library, psycopg2 (python3-psycopg2) and libpq (through
ctypes, for real server-side bind parameters) are used.
"""

import atexit
import ctypes
import ctypes.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import psycopg2
import psycopg2.extensions

__all__ = [
    "PgCluster",
    "PgError",
    "Database",
    "pg_bindir",
    "free_port",
    "wait_for",
    "pid_alive",
    "exec_params",
]

# The unprivileged account that owns clusters when we run as root.
PG_OS_USER = os.environ.get("CIFLOW_PG_OS_USER", "postgres")

# Settings every throwaway cluster gets; a test's `settings` override them.
# fsync/synchronous_commit off: clusters are disposable, speed matters more.
# PgCluster(durable=True) leaves DURABILITY_SETTINGS out (PostgreSQL's defaults,
# all on): a benchmark must pay for every WAL flush a real server pays for.
DEFAULT_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": 60,
    "shared_buffers": "32MB",
    "log_min_messages": "warning",
    "log_statement": "none",
    "log_line_prefix": "%m [%p] %q%u@%d ",
    "lc_messages": "C",
    "timezone": "UTC",
    "datestyle": "iso, mdy",
}
DURABILITY_SETTINGS = ("fsync", "synchronous_commit", "full_page_writes")


class PgError(Exception):
    """An error reported by the server through exec_params (libpq/ctypes).

    Mirrors the psycopg2 attributes tests look at: pgcode, and the message
    fields in `diag`-like attributes.
    """

    def __init__(self, message, pgcode=None, detail=None, hint=None, context=None):
        super().__init__(message)
        self.pgcode = pgcode
        self.message_primary = message
        self.detail = detail
        self.hint = hint
        self.context = context


def pg_bindir():
    """The PostgreSQL 15 server binaries (never /usr/local/bin's wrappers)."""
    env = os.environ.get("CIFLOW_PG_BINDIR")
    if env:
        return env
    out = subprocess.run(["pg_config", "--bindir"], check=True,
                         capture_output=True, text=True).stdout.strip()
    return out


def free_port(host="127.0.0.1"):
    """A TCP port that was free a moment ago (the caller retries on a clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def pid_alive(pid):
    """True while `pid` runs; a zombie (exited, not yet reaped: pg_ctl's
    daemonised postmaster is reparented to whatever PID 1 is) is dead."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_for(predicate, timeout=30.0, interval=0.05, what="condition"):
    """Poll `predicate` until it returns a truthy value; return that value.

    For waiting on asynchronous effects (a worker starting, a log line),
    never for asserting on durations.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _quote_conf(value):
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (int, float)):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def _quote_dsn(value):
    """A libpq connection-string value: quoted, with \\ and ' escaped."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _quote_ident(name):
    return '"' + name.replace('"', '""') + '"'


# ---------------------------------------------------------------------------
# Teardown safety net: every live cluster is registered here until cleaned.

_LIVE = set()
_LIVE_LOCK = threading.Lock()
_HANDLERS_INSTALLED = False


def _cleanup_all():
    with _LIVE_LOCK:
        clusters = list(_LIVE)
    for cluster in clusters:
        try:
            cluster.cleanup()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


_SIGNALLED = []


def _on_fatal_signal(signum, frame):
    if not _SIGNALLED:
        # First SIGTERM/SIGHUP: unwind like Ctrl-C, so that pytest runs its
        # fixture finalizers (emulators too) and `with` blocks exit; atexit
        # catches whatever is left.
        _SIGNALLED.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")
    # Again while unwinding: clean up our clusters, then die of the signal.
    _cleanup_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_safety_net():
    global _HANDLERS_INSTALLED
    if _HANDLERS_INSTALLED:
        return
    _HANDLERS_INSTALLED = True
    atexit.register(_cleanup_all)
    # Signal handlers only work from the main thread, and we do not replace
    # a handler somebody else installed on purpose.
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, _on_fatal_signal)


# ---------------------------------------------------------------------------
# libpq through ctypes: psycopg2 interpolates parameters on the client, so the
# SQL text would carry them; secrets tests need real bind parameters.

_LIBPQ = None


def _libpq():
    global _LIBPQ
    if _LIBPQ is None:
        name = ctypes.util.find_library("pq") or "libpq.so.5"
        lib = ctypes.CDLL(name)
        lib.PQconnectdb.restype = ctypes.c_void_p
        lib.PQconnectdb.argtypes = [ctypes.c_char_p]
        lib.PQstatus.argtypes = [ctypes.c_void_p]
        lib.PQerrorMessage.restype = ctypes.c_char_p
        lib.PQerrorMessage.argtypes = [ctypes.c_void_p]
        lib.PQfinish.argtypes = [ctypes.c_void_p]
        lib.PQexecParams.restype = ctypes.c_void_p
        lib.PQexecParams.argtypes = [
            ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_char_p), ctypes.c_void_p, ctypes.c_void_p,
            ctypes.c_int]
        lib.PQresultStatus.argtypes = [ctypes.c_void_p]
        lib.PQresultErrorMessage.restype = ctypes.c_char_p
        lib.PQresultErrorMessage.argtypes = [ctypes.c_void_p]
        lib.PQresultErrorField.restype = ctypes.c_char_p
        lib.PQresultErrorField.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.PQntuples.argtypes = [ctypes.c_void_p]
        lib.PQnfields.argtypes = [ctypes.c_void_p]
        lib.PQgetisnull.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        lib.PQgetvalue.restype = ctypes.c_char_p
        lib.PQgetvalue.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        lib.PQclear.argtypes = [ctypes.c_void_p]
        _LIBPQ = lib
    return _LIBPQ


_PGRES_COMMAND_OK, _PGRES_TUPLES_OK = 1, 2
_PG_DIAG = {"C": ord("C"), "M": ord("M"), "D": ord("D"), "H": ord("H"), "W": ord("W")}
_CONNECTION_OK = 0


def exec_params(dsn, query, params=()):
    """Run one statement with server-side bind parameters ($1, $2, ...).

    Returns rows as tuples of str/None (text format). Raises PgError with the
    SQLSTATE on a server error. The parameters travel in a Bind message, so
    neither pg_stat_activity nor log_statement ever shows their values.
    """
    lib = _libpq()
    conn = lib.PQconnectdb(dsn.encode())
    try:
        if lib.PQstatus(conn) != _CONNECTION_OK:
            raise PgError(lib.PQerrorMessage(conn).decode(errors="replace"))
        values = (ctypes.c_char_p * max(1, len(params)))()
        for i, p in enumerate(params):
            values[i] = None if p is None else str(p).encode()
        res = lib.PQexecParams(conn, query.encode(), len(params), None,
                               values, None, None, 0)
        try:
            status = lib.PQresultStatus(res)
            if status not in (_PGRES_COMMAND_OK, _PGRES_TUPLES_OK):
                def field(code):
                    v = lib.PQresultErrorField(res, _PG_DIAG[code])
                    return v.decode(errors="replace") if v is not None else None
                raise PgError(field("M") or
                              lib.PQresultErrorMessage(res).decode(errors="replace"),
                              pgcode=field("C"), detail=field("D"),
                              hint=field("H"), context=field("W"))
            rows = []
            for r in range(lib.PQntuples(res)):
                row = []
                for c in range(lib.PQnfields(res)):
                    if lib.PQgetisnull(res, r, c):
                        row.append(None)
                    else:
                        row.append(lib.PQgetvalue(res, r, c).decode())
                rows.append(tuple(row))
            return rows
        finally:
            lib.PQclear(res)
    finally:
        lib.PQfinish(conn)


# ---------------------------------------------------------------------------

class PgCluster:
    """A throwaway PostgreSQL cluster.

    settings: extra postgresql.conf settings (override DEFAULT_SETTINGS);
    preload:  add shared_preload_libraries = 'ciflow';
    durable:  keep PostgreSQL's default durability (fsync, synchronous_commit
              and full_page_writes on) instead of the tests' all-off.

    The cluster is initialised in the constructor and started by start() (or
    by using it as a context manager). cleanup() always leaves nothing
    behind: no server process, no directory.
    """

    def __init__(self, settings=None, preload=False, prefix="ciflow-pg-", durable=False):
        self.bindir = pg_bindir()
        self.settings = dict(DEFAULT_SETTINGS)
        if durable:
            for name in DURABILITY_SETTINGS:
                del self.settings[name]
        if preload:
            self.settings["shared_preload_libraries"] = "ciflow"
        self.settings.update(settings or {})
        self.host = "127.0.0.1"
        self.port = None
        self._cleaned = False
        self._as_other_user = os.geteuid() == 0
        if self._as_other_user:
            pw = pwd.getpwnam(PG_OS_USER)
            self._uid, self._gid = pw.pw_uid, pw.pw_gid
        else:
            self._uid, self._gid = os.geteuid(), os.getegid()

        _install_safety_net()
        self.basedir = tempfile.mkdtemp(prefix=prefix)
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            os.chmod(self.basedir, 0o700)
            if self._as_other_user:
                os.chown(self.basedir, self._uid, self._gid)
            self.datadir = os.path.join(self.basedir, "data")
            self.sockdir = self.basedir
            self.logfile = os.path.join(self.datadir, "server.log")
            self._run([os.path.join(self.bindir, "initdb"), "-D", self.datadir,
                       "-A", "trust", "--no-sync", "-E", "UTF8", "--locale=C",
                       "-U", "postgres"])
            with open(os.path.join(self.datadir, "postgresql.conf"), "a") as f:
                f.write("\n# throwaway test cluster (tests/harness.py)\n"
                        "include_if_exists = 'harness.conf'\n")
        except BaseException:
            self.cleanup()
            raise

    # -- process helpers ---------------------------------------------------

    def _cmd(self, argv):
        if self._as_other_user:
            return ["runuser", "-u", PG_OS_USER, "--"] + list(argv)
        return list(argv)

    def _run(self, argv, check=True, **kw):
        proc = subprocess.run(self._cmd(argv), capture_output=True, text=True,
                              cwd=self.basedir, **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n"
                               f"{proc.stdout}\n{proc.stderr}")
        return proc

    def _write_conf(self):
        lines = [f"{k} = {_quote_conf(v)}" for k, v in self.settings.items()]
        lines.append(f"port = {self.port}")
        lines.append(f"unix_socket_directories = {_quote_conf(self.sockdir)}")
        path = os.path.join(self.datadir, "harness.conf")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.chown(path, self._uid, self._gid)

    def configure(self, settings, reload=True):
        """Change settings; reload a running server (restart() for others)."""
        self.settings.update(settings)
        if self.port is not None:
            self._write_conf()
            if reload and self.is_running():
                self._run([os.path.join(self.bindir, "pg_ctl"), "-D", self.datadir,
                           "reload", "-s"])

    # -- lifecycle ---------------------------------------------------------

    def start(self, timeout=60):
        """Start the server; picks a new free port if the last one is taken."""
        if self._cleaned:
            raise RuntimeError("cluster already cleaned up")
        last_error = None
        for _attempt in range(5):
            if self.port is None:
                self.port = free_port(self.host)
            self._write_conf()
            proc = self._run([os.path.join(self.bindir, "pg_ctl"), "-D", self.datadir,
                              "-l", self.logfile, "-w", "-t", str(timeout), "start"],
                             check=False)
            if proc.returncode == 0:
                return self
            last_error = proc.stdout + proc.stderr + "\n" + self.log_text()[-4000:]
            if "Address already in use" not in self.log_text():
                break
            self.port = None  # lost the race for that port: try another one
        raise RuntimeError(f"could not start PostgreSQL:\n{last_error}")

    def stop(self, mode="fast"):
        if self.is_running():
            self._run([os.path.join(self.bindir, "pg_ctl"), "-D", self.datadir,
                       "-m", mode, "-w", "-t", "60", "stop"], check=False)

    def restart(self, mode="fast"):
        self.stop(mode)
        return self.start()

    def postmaster_pid(self):
        try:
            with open(os.path.join(self.datadir, "postmaster.pid")) as f:
                return int(f.readline().strip())
        except (OSError, ValueError):
            return None

    def is_running(self):
        pid = self.postmaster_pid()
        return pid is not None and pid_alive(pid)

    def cleanup(self):
        """Immediate stop and directory removal; idempotent, never raises."""
        if self._cleaned:
            return
        self._cleaned = True
        try:
            if os.path.isdir(getattr(self, "datadir", "")):
                pid = self.postmaster_pid()
                self.stop(mode="immediate")
                if pid is not None and pid_alive(pid):
                    # pg_ctl may fail on a damaged data dir: make sure anyway.
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
        finally:
            shutil.rmtree(self.basedir, ignore_errors=True)
            with _LIVE_LOCK:
                _LIVE.discard(self)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.cleanup()
        return False

    # -- clients -----------------------------------------------------------

    def dsn_for(self, dbname="postgres", user="postgres", **extra):
        parts = {"host": self.host, "port": self.port, "dbname": dbname, "user": user}
        parts.update(extra)
        return " ".join(f"{k}={_quote_dsn(v)}" for k, v in parts.items())

    @property
    def dsn(self):
        return self.dsn_for()

    def connect(self, dbname="postgres", user="postgres", autocommit=True, **extra):
        """A psycopg2 connection (autocommit unless asked otherwise)."""
        conn = psycopg2.connect(self.dsn_for(dbname, user, **extra))
        conn.autocommit = autocommit
        return conn

    def sql(self, query, params=None, dbname="postgres", user="postgres"):
        """Run one statement on a fresh connection; return its rows (or [])."""
        conn = self.connect(dbname, user)
        try:
            with conn.cursor() as cur:
                cur.execute(query, params)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def exec_params(self, query, params=(), dbname="postgres", user="postgres"):
        """Like sql(), but with server-side bind parameters (see exec_params)."""
        return exec_params(self.dsn_for(dbname, user), query, params)

    def psql_env(self, user="postgres", dbname="postgres"):
        env = dict(os.environ)
        env.update(PGHOST=self.host, PGPORT=str(self.port), PGUSER=user,
                   PGDATABASE=dbname)
        env.pop("PGPASSWORD", None)
        return env

    def psql(self, args=(), input=None, dbname="postgres", user="postgres",
             check=True, env=None, timeout=600, capture=True):
        """Run psql -X with ON_ERROR_STOP; return the CompletedProcess (text).

        capture=False lets psql write to our stdout/stderr (the demo).
        """
        full_env = self.psql_env(user, dbname)
        full_env.update(env or {})
        argv = [os.path.join(self.bindir, "psql"), "-X", "-v", "ON_ERROR_STOP=1",
                "-h", self.host, "-p", str(self.port), "-U", user, "-d", dbname]
        argv += list(args)
        proc = subprocess.run(argv, input=input, capture_output=capture, text=True,
                              env=full_env, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"psql failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def create_role(self, name, superuser=False, login=True, password=None,
                    options=""):
        """CREATE ROLE; returns the name. `options` is appended verbatim."""
        opts = ["SUPERUSER" if superuser else "NOSUPERUSER",
                "LOGIN" if login else "NOLOGIN"]
        if password is not None:
            quoted = psycopg2.extensions.QuotedString(password).getquoted().decode()
            opts.append("PASSWORD " + quoted)
        self.sql(f"CREATE ROLE {_quote_ident(name)} {' '.join(opts)} {options}")
        return name

    def create_database(self, name, template="template1"):
        self.sql(f"CREATE DATABASE {_quote_ident(name)} TEMPLATE {_quote_ident(template)}")
        return name

    def drop_database(self, name):
        self.sql(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")

    def database(self, name):
        """A Database handle: this cluster's client helpers bound to one database."""
        return Database(self, name)

    # -- introspection -----------------------------------------------------

    def log_text(self):
        try:
            with open(self.logfile, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def log_size(self):
        """Current log length, to read only what follows with log_since()."""
        try:
            return os.path.getsize(self.logfile)
        except OSError:
            return 0

    def log_since(self, offset):
        try:
            with open(self.logfile, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def pids(self, backend_type=None, dbname="postgres"):
        """Server processes from pg_stat_activity, as dicts.

        backend_type: a substring to match (e.g. 'ciflow' for the worker,
        'client backend'); None for all.
        """
        rows = self.sql(
            "SELECT pid, backend_type, datname, usename, application_name, state, query"
            " FROM pg_stat_activity WHERE pid <> pg_backend_pid()", dbname=dbname)
        keys = ("pid", "backend_type", "datname", "usename", "application_name",
                "state", "query")
        out = [dict(zip(keys, r)) for r in rows]
        if backend_type is not None:
            out = [p for p in out if backend_type in (p["backend_type"] or "")
                   or backend_type in (p["application_name"] or "")]
        return out

    def kill_worker(self, backend_type="ciflow", sig=signal.SIGKILL, dbname="postgres"):
        """Send `sig` to every process matching backend_type; returns their pids."""
        victims = [p["pid"] for p in self.pids(backend_type, dbname=dbname)]
        for pid in victims:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return victims

    def install_file(self, src, name=None):
        """Copy a file into the cluster's directory, readable by the server.

        The server runs as an unprivileged user and may not read files under
        root's temporary directories (e.g. a test CA bundle); this copy can.
        """
        dst = os.path.join(self.basedir, name or os.path.basename(src))
        shutil.copyfile(src, dst)
        os.chmod(dst, 0o644)
        os.chown(dst, self._uid, self._gid)
        return dst

    def __repr__(self):
        return f"<PgCluster {self.basedir} port={self.port}>"


class Database:
    """One database of a PgCluster: connect/sql/exec_params/psql default to it."""

    def __init__(self, cluster, name):
        self.cluster = cluster
        self.name = name

    def dsn_for(self, user="postgres", **extra):
        return self.cluster.dsn_for(self.name, user, **extra)

    def connect(self, user="postgres", autocommit=True, **extra):
        return self.cluster.connect(self.name, user, autocommit=autocommit, **extra)

    def sql(self, query, params=None, user="postgres"):
        return self.cluster.sql(query, params, dbname=self.name, user=user)

    def exec_params(self, query, params=(), user="postgres"):
        return self.cluster.exec_params(query, params, dbname=self.name, user=user)

    def psql(self, args=(), input=None, user="postgres", **kw):
        return self.cluster.psql(args, input, dbname=self.name, user=user, **kw)

    def __repr__(self):
        return f"<Database {self.name} on {self.cluster!r}>"
