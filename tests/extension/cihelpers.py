"""Shared assertions and helpers for ciflow's integration tests.

Owns what several test modules need: the contract's name and type mapping
(snake_case, Edm -> PostgreSQL types), SQLSTATE assertions, reading the
emulator's request log, and exact row-set comparison between a synced table
and the emulator's own rows (canonical values, SHA-256 over the sorted set).
"""

import base64
import contextlib
import datetime as dt
import decimal
import hashlib
import json
import os
import re
import signal
import uuid

from contextlib import contextmanager

import psycopg2
import pytest

from harness import PgError, wait_for

# Section 3 of the SQL contract; every other Edm type becomes jsonb.
EDM_TO_PG = {
    "Edm.String": "text",
    "Edm.Int16": "smallint",
    "Edm.Byte": "smallint",
    "Edm.SByte": "smallint",
    "Edm.Int32": "integer",
    "Edm.Int64": "bigint",
    "Edm.Single": "real",
    "Edm.Double": "double precision",
    "Edm.Decimal": "numeric",
    "Edm.Boolean": "boolean",
    "Edm.DateTimeOffset": "timestamp with time zone",
    "Edm.Date": "date",
    "Edm.TimeOfDay": "time without time zone",
    "Edm.Duration": "interval",
    "Edm.Guid": "uuid",
    "Edm.Binary": "bytea",
}
INTEGER_EDM = ("Edm.Int16", "Edm.Byte", "Edm.SByte", "Edm.Int32", "Edm.Int64")


def pg_type_for(edm):
    return EDM_TO_PG.get(edm, "jsonb")


def snake(name):
    """FullName -> full_name, RetailPos_Transactions -> retail_pos_transactions.

    Only names without acronyms are used in tests: the contract does not say
    how 'HTTPStatus' splits.
    """
    s = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name)
    s = re.sub(r"_+", "_", s)
    return s.lower()


def qident(name):
    return '"' + name.replace('"', '""') + '"'


# ---------------------------------------------------------------------------
# Connections

def connection_args(emu, **overrides):
    """create_connection's named arguments for `emu`'s default instance."""
    import emulator_client as ec
    args = {
        "base_url": emu.base_url,
        "instance_id": ec.INSTANCE_ID,
        "token_url": emu.token_url,
        "client_id": ec.CLIENT_ID,
        "client_secret": ec.CLIENT_SECRET,
        "scope": ec.SCOPE,
        "subscription_key": ec.SUB_KEY,
    }
    if emu.ca_file:
        args["ca_file"] = emu.ca_file
    args.update(overrides)
    return {k: v for k, v in args.items() if v is not None}


def create_connection_sql(name, args, placeholder="psycopg2"):
    """The create_connection call for `args`, with parameters, not literals.

    placeholder='psycopg2' gives %(arg)s markers (use with a dict);
    placeholder='libpq' gives $n markers and the list of values (for
    harness.exec_params, which binds them on the server).
    """
    if placeholder == "psycopg2":
        named = ", ".join(f"{k} => %({k})s" for k in args)
        return f"SELECT ciflow.create_connection(%(name)s, {named})", dict(args, name=name)
    keys = list(args)
    casts = {"max_calls": "::int", "page_size": "::int", "per_interval": "::interval"}
    named = ", ".join(f"{k} => ${i + 2}{casts.get(k, '::text')}" for i, k in enumerate(keys))
    return (f"SELECT ciflow.create_connection($1::text, {named})",
            [name] + [args[k] for k in keys])


# ---------------------------------------------------------------------------
# Errors

def error_fields(err):
    """SQLSTATE, message, detail, hint and context of a psycopg2 or PgError."""
    if isinstance(err, PgError):
        return {"code": err.pgcode, "message": err.message_primary,
                "detail": err.detail, "hint": err.hint, "context": err.context}
    diag = err.diag
    return {"code": err.pgcode, "message": diag.message_primary,
            "detail": diag.message_detail, "hint": diag.message_hint,
            "context": diag.context}


class ErrorInfo:
    """Filled in by raises_sqlstate once the block has raised."""
    code = message = detail = hint = context = None
    error = None

    def __repr__(self):
        return (f"<SQLSTATE {self.code}: {self.message!r} DETAIL {self.detail!r} "
                f"HINT {self.hint!r}>")


@contextlib.contextmanager
def raises_sqlstate(code):
    """Assert the block raises a server error with SQLSTATE `code`.

    Yields an ErrorInfo whose fields are set after the block.
    """
    info = ErrorInfo()
    with pytest.raises((psycopg2.Error, PgError)) as excinfo:
        yield info
    info.error = excinfo.value
    for k, v in error_fields(excinfo.value).items():
        setattr(info, k, v)
    assert info.code == code, f"expected SQLSTATE {code}, got {info!r}"


def assert_names(info, *names):
    """The error message names each of `names` (connection, entity, ...)."""
    for n in names:
        assert n in (info.message or ""), f"message does not name {n!r}: {info!r}"


def assert_http_detail(info, status):
    assert info.detail and f"HTTP status {status}" in info.detail, \
        f"DETAIL lacks 'HTTP status {status}': {info!r}"


# ---------------------------------------------------------------------------
# The emulator's request log

def is_token_request(entry):
    return "oauth2" in entry.get("path", "")


def api_requests(emu, since=0):
    """Every logged request to the service's API (not the token endpoint)."""
    return [e for e in emu.log(since) if not is_token_request(e)]


def data_requests(emu, entity, since=0):
    """Logged requests to /data/<entity> (the paging calls of one entity)."""
    suffix = "/data/" + entity
    return [e for e in emu.log(since)
            if e.get("path", "").endswith(suffix) and not is_token_request(e)]


def query_of(entry):
    """The decoded query of a log entry as a dict of str -> str."""
    q = entry.get("query") or {}
    if isinstance(q, str):
        from urllib.parse import parse_qsl
        return dict(parse_qsl(q, keep_blank_values=True))
    return {k: (v[0] if isinstance(v, list) and len(v) == 1 else v) for k, v in q.items()}


def last_seq(emu):
    entries = emu.log(0)
    return entries[-1]["seq"] if entries else 0


# ---------------------------------------------------------------------------
# Canonical values: the same text for a value whether it comes from the
# emulator's JSON or from PostgreSQL through psycopg2.

def parse_iso(value):
    m = re.match(r"^(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2}:\d{2})(?:\.(\d+))?(Z|[+-]\d{2}:?\d{2})?$",
                 value)
    if not m:
        raise ValueError(f"not a timestamp: {value!r}")
    day, hms, frac, zone = m.groups()
    micro = int(((frac or "") + "000000")[:6])  # the contract truncates to µs
    base = dt.datetime.fromisoformat(f"{day}T{hms}").replace(microsecond=micro)
    if zone in (None, "Z"):
        tz = dt.timezone.utc
    else:
        sign = -1 if zone[0] == "-" else 1
        hh, mm = int(zone[1:3]), int(zone[-2:])
        tz = dt.timezone(sign * dt.timedelta(hours=hh, minutes=mm))
    return base.replace(tzinfo=tz)


def _canon_decimal(d):
    d = decimal.Decimal(d)
    if d == 0:
        return "0"
    return format(d.normalize(), "f")


def _canon_time(text):
    """hh:mm:ss[.fffffff] as microseconds (PostgreSQL's time keeps six digits)."""
    hms, _, frac = text.partition(".")
    return "%s.%s" % (hms, (frac + "000000")[:6])


def canon_emu(value, edm):
    """Canonical text of a value as the emulator serves it."""
    if value is None:
        return None
    if edm == "Edm.String":
        return str(value)
    if edm in INTEGER_EDM:
        return str(int(value))
    if edm in ("Edm.Double", "Edm.Single"):
        return repr(float(value))
    if edm == "Edm.TimeOfDay":
        return _canon_time(value)
    if edm == "Edm.Binary":
        return base64.b64decode(value.replace("-", "+").replace("_", "/")
                                + "=" * (-len(value) % 4)).hex()
    if edm == "Edm.Decimal":
        return _canon_decimal(str(value))
    if edm == "Edm.Boolean":
        return "true" if value else "false"
    if edm == "Edm.DateTimeOffset":
        return parse_iso(value).astimezone(dt.timezone.utc).isoformat()
    if edm == "Edm.Date":
        return dt.date.fromisoformat(value).isoformat()
    if edm == "Edm.Guid":
        return str(uuid.UUID(value))
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def canon_pg(value, edm):
    """Canonical text of a value as psycopg2 returns it from the typed column."""
    if value is None:
        return None
    if edm == "Edm.String":
        return value
    if edm in INTEGER_EDM:
        return str(value)
    if edm in ("Edm.Double", "Edm.Single"):
        return repr(float(value))
    if edm == "Edm.TimeOfDay":
        return _canon_time(value.isoformat())
    if edm == "Edm.Binary":
        return bytes(value).hex()
    if edm == "Edm.Decimal":
        return _canon_decimal(value)
    if edm == "Edm.Boolean":
        return "true" if value else "false"
    if edm == "Edm.DateTimeOffset":
        return value.astimezone(dt.timezone.utc).isoformat()
    if edm == "Edm.Date":
        return value.isoformat()
    if edm == "Edm.Guid":
        return str(uuid.UUID(str(value)))
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def attributes_of(metadata):
    """[(name, dataType)] from an entity's metadata (emulator or E2 shape)."""
    out = []
    for a in metadata["attributes"]:
        out.append((a["name"], a.get("dataType") or a.get("type")))
    return out


def emu_rowset(rows, attributes):
    return [tuple(canon_emu(r.get(n), t) for n, t in attributes) for r in rows]


def pg_rowset(db, table, attributes):
    cols = ", ".join(qident(snake(n)) for n, _ in attributes)
    rows = db.sql(f"SELECT {cols} FROM {table}")
    return [tuple(canon_pg(v, t) for v, (_, t) in zip(r, attributes)) for r in rows]


def rowset_digest(rowset):
    h = hashlib.sha256()
    for row in sorted(rowset, key=lambda r: json.dumps(r)):
        h.update(json.dumps(row, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def assert_same_rowset(pg_rows, emu_rows, key_index=0):
    """Exact equality of two row sets, with a readable account of differences."""
    if rowset_digest(pg_rows) == rowset_digest(emu_rows) and len(pg_rows) == len(emu_rows):
        return
    pg_keys = [r[key_index] for r in pg_rows]
    emu_keys = [r[key_index] for r in emu_rows]
    dup = len(pg_keys) - len(set(pg_keys))
    missing = set(emu_keys) - set(pg_keys)
    extra = set(pg_keys) - set(emu_keys)
    emu_by_key = {r[key_index]: r for r in emu_rows}
    differing = [(r, emu_by_key[r[key_index]]) for r in pg_rows
                 if r[key_index] in emu_by_key and r != emu_by_key[r[key_index]]]
    pytest.fail(
        f"row sets differ: postgres {len(pg_rows)} rows, emulator {len(emu_rows)}; "
        f"{len(missing)} missing (e.g. {sorted(missing)[:3]}), {len(extra)} extra "
        f"(e.g. {sorted(extra)[:3]}), {dup} duplicate keys, {len(differing)} differing "
        f"(first: {differing[:1]})")


def assert_table_matches_emulator(db, table, emu, entity, metadata=None):
    """The synced table holds exactly the emulator's rows of `entity`."""
    metadata = metadata or entity_metadata(emu, entity)
    attributes = attributes_of(metadata)
    emu_rows = emu_rowset(emu.rows(entity), attributes)
    pg_rows = pg_rowset(db, table, attributes)
    key = first_key(metadata)
    assert_same_rowset(pg_rows, emu_rows, [n for n, _ in attributes].index(key))
    return len(pg_rows)


# ---------------------------------------------------------------------------
# Entity metadata as the service reports it (E2)

def entity_list(emu):
    import emulator_client as ec
    status, _, body = emu.request("GET", f"/v1/instances/{ec.INSTANCE_ID}/manage/entities")
    assert status == 200, body[:500]
    return json.loads(body)["entities"]


def entity_metadata(emu, entity):
    for e in entity_list(emu):
        if e["qualifiedEntityName"] == entity:
            return e
    raise KeyError(entity)


def key_names(keys):
    """Names of the first key from any of the shapes keys come in:
    [[{"name": "A"}]], [["A"]], ["A"], [{"name": "A"}]."""
    if not keys:
        return []
    first = keys[0]
    if isinstance(first, list):
        return [k["name"] if isinstance(k, dict) else k for k in first]
    return [k["name"] if isinstance(k, dict) else k for k in keys]


def first_key(metadata):
    return key_names(metadata["keys"])[0]


# ---------------------------------------------------------------------------
# Table introspection

def table_md5(db, table):
    """md5 over the table's rows as text, in a fixed order: byte-for-byte identity."""
    return db.sql(f"SELECT md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), ''))"
                  f" FROM {table} t")[0][0]


def table_columns(db, schema, table):
    """[(column_name, data_type, comment)] in ordinal order."""
    return db.sql(
        """SELECT c.column_name, c.data_type,
                  col_description(format('%%I.%%I', c.table_schema, c.table_name)::regclass,
                                  c.ordinal_position::int)
             FROM information_schema.columns c
            WHERE c.table_schema = %s AND c.table_name = %s
            ORDER BY c.ordinal_position""", (schema, table))


def primary_key_columns(db, schema, table):
    return [r[0] for r in db.sql(
        """SELECT a.attname
             FROM pg_index i
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
            WHERE i.indrelid = format('%%I.%%I', %s::text, %s::text)::regclass
              AND i.indisprimary
            ORDER BY array_position(i.indkey::int2[], a.attnum)""", (schema, table))]


def dict_rows(db, query, params=None, conn=None):
    """Rows of `query` as dicts, on `conn` or on a fresh connection to `db`."""
    own = conn is None
    conn = conn or db.connect()
    try:
        with conn.cursor() as cur:
            cur.execute(query, params)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]
    finally:
        if own:
            conn.close()


def run_row(db, run_id):
    """The ciflow.sync_runs row `run_id` as a dict (None if there is none)."""
    rows = dict_rows(db, "SELECT * FROM ciflow.sync_runs WHERE id = %s", (run_id,))
    return rows[0] if rows else None


def sync(db, connection, entity, conn=None, **kwargs):
    """ciflow.sync(...) with named arguments; returns the run as a dict."""
    named = "".join(f", {k} => %({k})s" for k in kwargs)
    query = f"SELECT * FROM ciflow.sync(%(connection)s, %(entity)s{named})"
    params = dict(kwargs, connection=connection, entity=entity)
    return dict_rows(db, query, params, conn)[0]


def regclass_of(db, name):
    return db.sql("SELECT to_regclass(%s)::oid", (name,))[0][0]


@contextmanager
def session(db, settings):
    """One connection with session settings applied (SET name = value); closed after."""
    conn = db.connect()
    try:
        with conn.cursor() as cur:
            for name, value in settings.items():
                cur.execute("SELECT set_config(%s, %s, false)", (name, str(value)))
        yield conn
    finally:
        conn.close()


# ---------------------------------------------------------------------------
# Crashes

def wait_up(pg, timeout=60):
    """Until the server accepts connections again (after a crash restart)."""
    def up():
        try:
            return pg.sql("SELECT 1") == [(1,)]
        except Exception:  # noqa: BLE001 - the server is restarting
            return False
    wait_for(up, timeout=timeout, what="the server to accept connections")


def sigkill_and_recover(pg, pid, timeout=60):
    """SIGKILL a backend and wait for the crash restart to end.  A bystander
    session ends only once the postmaster has begun the restart: until then
    the old server could still answer, so it is waited for first."""
    bystander = pg.connect()
    os.kill(pid, signal.SIGKILL)

    def bystander_gone():
        try:
            with bystander.cursor() as cur:
                cur.execute("SELECT 1")
            return False
        except Exception:  # noqa: BLE001 - ended by the crash restart
            return True
    wait_for(bystander_gone, timeout=timeout, what="the crash restart to begin")
    wait_up(pg, timeout)
