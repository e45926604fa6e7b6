"""Sync benchmark: ciflow.sync against what users would write and against the floors, one run.

    export PATH=/opt/pgtest2/usr/lib/postgresql/15/bin:$PATH   # e.g. a private PostgreSQL
    make PG_CONFIG=$(which pg_config) && make PG_CONFIG=$(which pg_config) install
    /usr/bin/python3 tests/bench_sync.py                       # as root; the full run
    /usr/bin/python3 tests/bench_sync.py --quick               # a smoke run (20,000 rows)
        [--rows 200000,1000000] [--page-sizes 1000,5000] [--resync-rows 200000]
        [--limit-rows 1000000] [--limit-page-sizes 100,1000,5000] [--citus-rows N]
        [--skip-throughput] [--skip-resync]

Run it as root (the cluster runs as the unprivileged user postgres) with the PostgreSQL
whose extension directory got `make install` first on PATH; harness.pg_bindir() takes the
binaries from `pg_config --bindir`.  The cluster keeps PostgreSQL's DEFAULT durability
(fsync, synchronous_commit, full_page_writes on: PgCluster(durable=True)); the other
settings are the test harness's (shared_buffers 32MB among them), printed with the summary.
The emulator serves the same generated Customer entity (18 typed columns, seed 7) to
everything, and renders each page once (tests/ciemu.py --page-cache-mb): every page is
fetched once before anything is timed, so no timing below pays for Python generating rows.

For each entity size N and page size P it prints, all measured in this one run:

- ciflow: ciflow.sync into a new table (a first sync): wall time, rows/s, the sync worker's
  peak RssAnon while it reads pages and while it publishes, and its VmHWM;
- baseline: the Python script a user would write (USER_SCRIPT below: http.client with
  keep-alive, json.loads per page, the csv module into a buffer, psycopg2 copy_expert of
  each page into the same typed table with its primary key, one transaction), run as a
  separate process and timed from its start to its exit;
- F (transfer floor): every page fetched by a separate process and thrown away, by curl
  (every URL in one invocation, keep-alive, to /dev/null) and by a minimal Python
  http.client loop; F is the faster of the two, and the table says which;
- C (load floor): COPY of the same rows, in the same (served) order, from a CSV file into
  an identical typed table whose primary key exists before the COPY: server-side
  COPY ... FROM '/file' and psql's \\copy; C is the faster, and the table says which;
- ratios ciflow/baseline and ciflow/max(F, C);
- calls: the data and metadata calls ciflow made (the emulator's request log; the token
  call is not an API call) and sync_runs.api_calls, against the expected ceil(N/P) + 1 data
  calls (skip paging ends on an empty page).

Floors are the best of two runs (a floor is a lower bound); ciflow and the baseline run once.
Every timed step starts after a CHECKPOINT.

Then, under the real limit of 100 calls per 60 s (issue 12, item 4): for --limit-rows rows at
each of --limit-page-sizes, the time a sync takes, computed from its calls and ciflow's
per-call time measured in this run (pull time / data calls of the first sync at that page
size; page sizes not in --page-sizes are measured on a small entity), calls sent as soon as
the sliding window allows.

Then, for one entity of --resync-rows rows, what a re-sync costs (time of the whole call and
of its publish, and WAL bytes from pg_current_wal_lsn() around the call) against the first
sync of the same rows and against publish => 'swap': the first sync; re-syncs with 0 %, 1 %
and 100 % of the rows changed (publish => 'diff', the default); swaps with 0 % and 100 %
changed.  With --citus-rows, the same for a distributed table (needs Citus).

Last, a Markdown summary ready for the README.  It asserts nothing: a timing is a
measurement, not a test (pytest never collects it: its name does not start with test_).
"""

import argparse
import http.client
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ciemu  # noqa: E402
from emulator_client import (CLIENT_ID, CLIENT_SECRET, INSTANCE_ID, SCOPE, SUB_KEY,  # noqa: E402
                             Emulator)
from harness import PgCluster  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON = "/usr/bin/python3"
SEED = 7
LIMIT_CALLS, LIMIT_WINDOW = 100, 60.0       # the service's real limit: 100 calls / 60 s

# The typed table a user would create for the Customer entity (ciflow creates the same
# column types: see the first sync's emu table).  The key comes with the table.
CUSTOMER_COLUMNS = """customer_id text PRIMARY KEY, first_name text, last_name text,
    full_name text, email text, city text, country text, postal_code text, birth_date date,
    created_on timestamptz, last_purchase_on timestamptz, loyalty_points integer,
    purchase_count bigint, lifetime_value numeric, churn_score double precision,
    is_active boolean, external_ref uuid, notes text"""

# What a user would write: page through the entity with $top/$skip on one keep-alive
# connection, turn each page into CSV and COPY it into a typed table, commit once.
USER_SCRIPT = r'''
import csv, http.client, io, json, sys, urllib.parse
import psycopg2

dsn, base, token_url, client, secret, scope, key, instance, page, table, columns = sys.argv[1:]
t = urllib.parse.urlsplit(token_url)
c = http.client.HTTPConnection(t.hostname, t.port)
c.request("POST", t.path, urllib.parse.urlencode({"grant_type": "client_credentials",
          "client_id": client, "client_secret": secret, "scope": scope}),
          {"Content-Type": "application/x-www-form-urlencoded"})
token = json.loads(c.getresponse().read())["access_token"]
c.close()

names = ["CustomerId", "FirstName", "LastName", "FullName", "Email", "City", "Country",
         "PostalCode", "BirthDate", "CreatedOn", "LastPurchaseOn", "LoyaltyPoints",
         "PurchaseCount", "LifetimeValue", "ChurnScore", "IsActive", "ExternalRef", "Notes"]
db = psycopg2.connect(dsn)
cur = db.cursor()
cur.execute("CREATE TABLE %s (%s)" % (table, columns))
b = urllib.parse.urlsplit(base)
conn = http.client.HTTPConnection(b.hostname, b.port)
headers = {"Authorization": "Bearer " + token, "Ocp-Apim-Subscription-Key": key}
path = "%s/instances/%s/data/Customer?$orderby=CustomerId&$top=%s&$skip=" % (b.path, instance, page)
skip = 0
while True:
    conn.request("GET", path + str(skip), headers=headers)
    resp = conn.getresponse()
    body = resp.read()
    if resp.status != 200:
        sys.exit("HTTP %d: %r" % (resp.status, body[:300]))
    rows = json.loads(body)["value"]
    if not rows:
        break
    buf = io.StringIO()
    w = csv.writer(buf)
    for r in rows:
        w.writerow([r[n] for n in names])
    buf.seek(0)
    cur.copy_expert("COPY %s FROM STDIN WITH (FORMAT csv)" % table, buf)
    skip += len(rows)
db.commit()
print(skip)
'''

# Floor F in Python: the same requests, every body read and dropped.
FETCH_SCRIPT = r'''
import http.client, sys
host, port, token, key = sys.argv[1:5]
conn = http.client.HTTPConnection(host, int(port))
headers = {"Authorization": "Bearer " + token, "Ocp-Apim-Subscription-Key": key}
total = 0
for path in sys.stdin.read().split():
    conn.request("GET", path, headers=headers)
    total += len(conn.getresponse().read())
print(total)
'''


# -- machine and server -------------------------------------------------------------------

def machine(pg):
    with open("/proc/meminfo") as f:
        mem_kb = int(next(line.split()[1] for line in f if line.startswith("MemTotal:")))
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    settings = {name: pg.sql(f"SHOW {name}")[0][0] for name in (
        "fsync", "synchronous_commit", "full_page_writes", "wal_level", "shared_buffers",
        "max_wal_size", "maintenance_work_mem", "work_mem", "checkpoint_timeout")}
    return {"nproc": os.cpu_count(), "ram_gib": mem_kb / 2 ** 20, "cpu": cpu,
            "pg": pg.sql("SHOW server_version")[0][0], "settings": settings}


def checkpoint(pg):
    pg.sql("CHECKPOINT")


class Busy:
    """The machine's CPU use during a step, from /proc/stat: 100 % is every core busy.
    Another user's work on this shared machine shows here, not in our own figures."""

    @staticmethod
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + v[4]
        return sum(v) - idle, sum(v)

    def __enter__(self):
        self.start = self.sample()
        return self

    def __exit__(self, *exc):
        end = self.sample()
        self.percent = 100.0 * (end[0] - self.start[0]) / max(1, end[1] - self.start[1])
        return False


# -- the emulator's pages -----------------------------------------------------------------

def page_paths(emu, entity, rows, page_size, key="CustomerId"):
    """The paths ciflow asks for (skip paging in key order, ending on an empty page)."""
    path = urllib.parse.urlsplit(emu.base_url).path
    return [f"{path}/instances/{INSTANCE_ID}/data/{entity}?$orderby={key}&$top={page_size}"
            f"&$skip={skip}" for skip in range(0, rows + 1, page_size)]


def warm(emu, entity, rows, page_size):
    """Fetches every page once, in this process, so that the emulator renders it; seconds."""
    url = urllib.parse.urlsplit(emu.base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port)
    headers = {"Authorization": "Bearer " + emu.token(), "Ocp-Apim-Subscription-Key": SUB_KEY}
    start = time.perf_counter()
    for path in page_paths(emu, entity, rows, page_size):
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            sys.exit(f"warm-up: HTTP {resp.status} for {path}")
    conn.close()
    return time.perf_counter() - start


def floor_fetch_python(emu, paths):
    url = urllib.parse.urlsplit(emu.base_url)
    start = time.perf_counter()
    out = subprocess.run([PYTHON, "-c", FETCH_SCRIPT, url.hostname, str(url.port), emu.token(),
                          SUB_KEY], input="\n".join(paths), capture_output=True, text=True,
                         check=True).stdout
    return time.perf_counter() - start, int(out)


def floor_fetch_curl(emu, paths, tmpdir):
    """curl with every URL in one invocation (one keep-alive connection), bodies to /dev/null."""
    cfg = os.path.join(tmpdir, "curl.cfg")
    with open(cfg, "w") as f:
        f.write('silent\nfail\nheader = "Authorization: Bearer %s"\n'
                'header = "Ocp-Apim-Subscription-Key: %s"\nwrite-out = "%%{size_download}\\n"\n'
                % (emu.token(), SUB_KEY))
        for p in paths:
            f.write('url = "%s%s"\noutput = "/dev/null"\n' % (emu.root, p))
    start = time.perf_counter()
    out = subprocess.run(["curl", "-K", cfg], capture_output=True, text=True, check=True).stdout
    return time.perf_counter() - start, sum(int(x) for x in out.split())


# -- floor C --------------------------------------------------------------------------------

def write_csv(pg, rows):
    """The rows as the emulator serves them to ciflow (in CustomerId order), as CSV in a file
    the server can read; returns its path."""
    gen = ciemu.CustomerGenerator(SEED)
    order = sorted(range(rows), key=gen.key_sort_value)
    names = gen.NAMES
    path = os.path.join(pg.basedir, f"customer_{rows}.csv")
    with open(path, "wb") as f:
        for a in range(0, rows, 20000):
            f.write(ciemu.to_bytes("".join(ciemu.csv_line(gen.row(i), names)
                                           for i in order[a:a + 20000])))
    os.chmod(path, 0o644)
    os.chown(path, pg._uid, pg._gid)
    return path


def copy_server(pg, path, table):
    pg.sql(f"DROP TABLE IF EXISTS {table}")
    pg.sql(f"CREATE TABLE {table} ({CUSTOMER_COLUMNS})")
    checkpoint(pg)
    conn = pg.connect()
    try:
        with conn.cursor() as cur:
            start = time.perf_counter()
            cur.execute(f"COPY {table} FROM %s WITH (FORMAT csv)", (path,))
            return time.perf_counter() - start
    finally:
        conn.close()


def copy_psql(pg, path, table):
    pg.sql(f"DROP TABLE IF EXISTS {table}")
    pg.sql(f"CREATE TABLE {table} ({CUSTOMER_COLUMNS})")
    checkpoint(pg)
    start = time.perf_counter()
    pg.psql(["-c", f"\\copy {table} FROM '{path}' WITH (FORMAT csv)"])
    return time.perf_counter() - start


# -- baseline ---------------------------------------------------------------------------------

def baseline(pg, emu, page_size, table):
    pg.sql(f"DROP TABLE IF EXISTS {table}")
    checkpoint(pg)
    with Busy() as busy:
        start = time.perf_counter()
        out = subprocess.run([PYTHON, "-c", USER_SCRIPT, pg.dsn, emu.base_url, emu.token_url,
                              CLIENT_ID, CLIENT_SECRET, SCOPE, SUB_KEY, INSTANCE_ID,
                              str(page_size), table, CUSTOMER_COLUMNS],
                             capture_output=True, text=True)
        elapsed = time.perf_counter() - start
    if out.returncode != 0:
        sys.exit(f"baseline failed: {out.stderr[-2000:]}")
    return elapsed, int(out.stdout), busy.percent


# -- ciflow -----------------------------------------------------------------------------------

class WorkerMemory(threading.Thread):
    """Samples the sync worker's memory, per phase of the run, every 10 ms.

    The worker is the dynamic background worker whose pg_stat_activity backend_type is
    'ciflow sync'; its phase comes from its query text ("ciflow sync: reading pages",
    "... publishing", ...), so page loading is measured apart from the key index build at
    publish, which maintenance_work_mem bounds.

    RssAnon (private anonymous memory: palloc'd pages, libcurl and jansson buffers) is the
    figure compared across entity sizes.  VmHWM, the peak of the whole RSS, also counts every
    page of shared_buffers the worker has touched (shared memory is resident in each process
    that maps it), so it grows with the data written up to shared_buffers whatever the
    worker itself holds; it is printed for completeness only.
    """

    def __init__(self, pg):
        super().__init__(daemon=True)
        self.conn = pg.connect()
        self.peak_kb = {}
        self.hwm_kb = 0
        self.cpu_s = 0.0         # the worker's user + system CPU time, last sample
        self.first_seen = {}     # phase -> perf_counter() when first sampled
        self.done = threading.Event()

    def run(self):
        tick = os.sysconf("SC_CLK_TCK")
        workers, polled = [], 0.0
        with self.conn.cursor() as cur:
            while not self.done.is_set():
                # The phase changes a few times a run: ask the server every 50 ms, and read
                # /proc (which costs the server nothing) every 10 ms.
                if time.perf_counter() - polled > 0.05:
                    cur.execute("SELECT pid, query FROM pg_stat_activity"
                                " WHERE backend_type = 'ciflow sync'")
                    workers, polled = cur.fetchall(), time.perf_counter()
                for pid, phase in workers:
                    try:
                        with open(f"/proc/{pid}/stat") as f:
                            fields = f.read().rsplit(")", 1)[1].split()
                        self.cpu_s = (int(fields[11]) + int(fields[12])) / tick
                    except (OSError, IndexError, ValueError):
                        pass
                    status = {}
                    try:
                        with open(f"/proc/{pid}/status") as f:
                            for line in f:
                                if line.startswith(("RssAnon:", "VmHWM:")):
                                    status[line.split(":")[0]] = int(line.split()[1])
                    except OSError:
                        continue
                    if "RssAnon" not in status:
                        continue
                    phase = (phase or "").replace("ciflow sync: ", "")
                    self.first_seen.setdefault(phase, time.perf_counter())
                    self.peak_kb[phase] = max(self.peak_kb.get(phase, 0), status["RssAnon"])
                    self.hwm_kb = max(self.hwm_kb, status.get("VmHWM", 0))
                time.sleep(0.01)
        self.conn.close()


def calls_of(entries):
    """(data calls, metadata calls, other API calls) among request log entries."""
    data = sum(1 for e in entries if e["route"] in ("data", "dv_data"))
    meta = sum(1 for e in entries if e["route"] in ("entity", "entities", "ci_metadata",
                                                    "dv_metadata", "instances", "ci_service",
                                                    "dv_service"))
    other = sum(1 for e in entries if e["route"] != "token") - data - meta
    return data, meta, other


def first_sync(pg, emu, connection, target, expected_rows):
    """A first sync into a new table, with its memory, phases and calls."""
    checkpoint(pg)
    last_seq = emu.control("GET", "log?since=%d" % (1 << 62))["seq"]
    memory = WorkerMemory(pg)
    memory.start()
    with Busy() as busy:
        start = time.perf_counter()
        run = pg.sql(f"SELECT rows, pages, api_calls, retries FROM ciflow.sync('{connection}',"
                     f" 'Customer', target => '{target}')")[0]
        end = time.perf_counter()
    memory.done.set()
    memory.join()
    entries = emu.log(since=last_seq)
    if run[0] != expected_rows:
        sys.exit(f"ciflow loaded {run[0]} rows, expected {expected_rows}")
    queries = {tuple(sorted(e["query"])) for e in entries if e["route"] == "data"}
    reading = memory.first_seen.get("reading pages", start)
    published = memory.first_seen.get("publishing", end)
    return {"seconds": end - start, "rows": run[0], "pages": run[1], "api_calls": run[2],
            "retries": run[3], "calls": calls_of(entries), "queries": queries,
            "pull_s": published - reading, "rest_s": (end - start) - (published - reading),
            "anon_pages_kb": memory.peak_kb.get("reading pages", 0),
            "anon_publish_kb": memory.peak_kb.get("publishing", 0), "hwm_kb": memory.hwm_kb,
            "cpu_s": memory.cpu_s, "busy": busy.percent}


def measured_sync(pg, entity, publish="diff", target=None):
    """(seconds, publish seconds, WAL bytes, (inserted, updated, deleted)) of one sync.

    The publish is timed from the worker's phases as pg_stat_activity shows
    them (sampled every 10 ms): from "publishing" to "analyzing" or the end.
    """
    checkpoint(pg)
    phases = WorkerMemory(pg)
    lsn = pg.sql("SELECT pg_current_wal_lsn()")[0][0]
    phases.start()
    start = time.perf_counter()
    to = f", target => '{target}'" if target else ""
    counts = pg.sql(f"SELECT inserted, updated, deleted FROM ciflow.sync('emu', '{entity}',"
                    f" publish => '{publish}'{to})")[0]
    end = time.perf_counter()
    phases.done.set()
    phases.join()
    wal = pg.sql("SELECT pg_current_wal_lsn() - %s::pg_lsn", (lsn,))[0][0]
    published = phases.first_seen.get("publishing", end)
    return end - start, phases.first_seen.get("analyzing", end) - published, int(wal), counts


def connect(pg, emu, page_size, name="emu"):
    pg.exec_params(
        "SELECT ciflow.create_connection($8, base_url => $1, instance_id => $2,"
        " token_url => $3, client_id => $4, client_secret => $5,"
        " subscription_key => $6, page_size => $7,"
        # Throughput, not the call limit (100 per minute by default), is measured.
        " max_calls => 6000, per_interval => '1 second')",
        (emu.base_url, INSTANCE_ID, emu.token_url, CLIENT_ID, CLIENT_SECRET, SUB_KEY,
         page_size, name))


# -- under the real limit -----------------------------------------------------------------------

def under_limit_seconds(calls, per_call):
    """Wall time of `calls` sequential calls of `per_call` seconds each when at most
    LIMIT_CALLS may start in any LIMIT_WINDOW seconds (a sliding window, as the gateway's)."""
    starts = []
    t = 0.0
    for k in range(calls):
        s = t if k < LIMIT_CALLS else max(t, starts[k - LIMIT_CALLS] + LIMIT_WINDOW)
        starts.append(s)
        t = s + per_call
    return t


# -- re-sync and Citus (issue 11) ---------------------------------------------------------------

def generated(rows, seed=SEED):
    return {"generate": {"schema": "customer", "rows": rows, "seed": seed}}


def changed_rows(emu, entity, offset, count, delta):
    """Rows offset.. of the entity, each with LoyaltyPoints moved by delta."""
    out = []
    while len(out) < count:
        page = emu.control("GET", f"entities/{entity}/rows?offset={offset + len(out)}"
                                  f"&limit={min(5000, count - len(out))}")
        out.extend(dict(r, LoyaltyPoints=(r["LoyaltyPoints"] or 0) + delta) for r in page["rows"])
    return out


def set_rows(emu, entity, first, literal):
    """The entity's rows: `first` (a generator spec or None), then literal rows."""
    mode = "replace"
    if first is not None:
        emu.control("POST", f"entities/{entity}/rows", dict(first, mode=mode))
        mode = "append"
    for i in range(0, len(literal), 20000):
        emu.control("POST", f"entities/{entity}/rows", {"mode": mode,
                                                         "rows": literal[i:i + 20000]})
        mode = "append"


def resync_table(emu, pg, rows, page_size, out):
    """Re-syncs of `rows` rows: 0 %, 1 %, 100 % changed, diff against swap."""
    entity = "Resync"
    emu.set_entity(entity, {"entityType": "profile"}, **generated(rows))
    emu.control("POST", f"entities/{entity}/rows", dict(generated(rows), mode="replace"))
    all_changed = changed_rows(emu, entity, 0, rows, 2)
    one_pct = rows // 100
    steps = [
        ("first sync", None, "diff"),
        ("diff, 0 % changed", None, "diff"),
        ("swap, 0 % changed", None, "swap"),
        ("diff, 1 % changed", lambda: set_rows(emu, entity, generated(rows - one_pct),
                                               changed_rows(emu, entity, rows - one_pct,
                                                            one_pct, 1)), "diff"),
        ("diff, 100 % changed", lambda: set_rows(emu, entity, None, all_changed), "diff"),
        ("swap, 100 % changed", lambda: set_rows(emu, entity, generated(rows), []), "swap"),
    ]
    print(f"\nre-sync of {rows} rows at {page_size}-row pages (publish time and WAL against the"
          f" first sync of the same rows; every page rendered by the emulator before each sync)")
    print(f"{'step':<22} {'ins/upd/del':>22} {'sync s':>8} {'publish s':>9} {'WAL MB':>9} "
          f"{'publish ratio':>13} {'WAL ratio':>10}")
    base = None
    for name, change, publish in steps:
        if change:
            change()
        warm(emu, entity, rows, page_size)
        seconds, publish_s, wal, counts = measured_sync(pg, entity, publish)
        base = base or (publish_s, wal)
        out.append((name, counts, seconds, publish_s, wal))
        print(f"{name:<22} {'/'.join(map(str, counts)):>22} {seconds:>8.2f} {publish_s:>9.2f} "
              f"{wal / 1e6:>9.2f} {publish_s / base[0]:>13.2f} {wal / base[1]:>10.4f}",
              flush=True)


def citus_cluster():
    """A coordinator and two workers with Citus, or None (and why) without it."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "extension"))
    from test_citus import citus_available
    reason = citus_available()
    if reason:
        return None, reason
    settings = {"shared_preload_libraries": "citus,ciflow", "max_worker_processes": 24}
    nodes = [PgCluster(settings=settings, durable=True) for _ in range(3)]
    for n in nodes:
        n.start()
        n.sql("CREATE EXTENSION citus")
    nodes[0].sql("SELECT citus_set_coordinator_host('127.0.0.1', %s)", (nodes[0].port,))
    for w in nodes[1:]:
        nodes[0].sql("SELECT citus_add_node('127.0.0.1', %s)", (w.port,))
    return nodes, None


def citus_table(emu, rows, page_size):
    """First sync and 1 %-changed re-sync into a distributed table, against
    the same into a plain table of the same coordinator."""
    nodes, reason = citus_cluster()
    if nodes is None:
        print(f"\nCitus: not measured ({reason})")
        return
    try:
        pg = nodes[0]
        pg.sql("CREATE EXTENSION ciflow")
        connect(pg, emu, page_size)
        entity = "Resync"
        emu.set_entity(entity, {"entityType": "profile"}, **generated(rows))
        emu.control("POST", f"entities/{entity}/rows", dict(generated(rows), mode="replace"))
        warm(emu, entity, rows, page_size)
        pg.sql("CREATE SCHEMA crm")
        first_plain = measured_sync(pg, entity, target="crm.plain")
        pg.sql("CREATE TABLE crm.dist (LIKE crm.plain INCLUDING ALL)")
        pg.sql("SELECT create_distributed_table('crm.dist', 'customer_id')")
        first_dist = measured_sync(pg, entity, target="crm.dist")
        one_pct = rows // 100
        set_rows(emu, entity, generated(rows - one_pct),
                 changed_rows(emu, entity, rows - one_pct, one_pct, 1))
        warm(emu, entity, rows, page_size)
        re_plain = measured_sync(pg, entity, target="crm.plain")
        re_dist = measured_sync(pg, entity, target="crm.dist")
        print(f"\nCitus: {rows} rows, a coordinator and two workers (distributed against plain"
              f" on the same coordinator)")
        print(f"{'step':<32} {'ins/upd/del':>14} {'sync s':>8} {'publish s':>9} {'ratio':>7}")
        for name, plain, dist in (("first sync", first_plain, first_dist),
                                  ("re-sync, 1 % changed", re_plain, re_dist)):
            for kind, m in (("plain", plain), ("distributed", dist)):
                print(f"{name + ', ' + kind:<32} {'/'.join(map(str, m[3])):>14} {m[0]:>8.2f} "
                      f"{m[1]:>9.2f} {m[1] / plain[1]:>7.2f}")
    finally:
        for n in nodes:
            n.cleanup()


# -- the run --------------------------------------------------------------------------------------

def ints(text):
    return [int(x) for x in text.split(",") if x.strip()]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="200000,1000000",
                        help="comma-separated entity sizes (default 200000,1000000)")
    parser.add_argument("--page-sizes", default="1000,5000",
                        help="comma-separated page sizes (default 1000,5000)")
    parser.add_argument("--resync-rows", type=int, default=200000,
                        help="entity size of the re-sync measurements (default 200000)")
    parser.add_argument("--limit-rows", type=int, default=1000000,
                        help="entity size of the under-the-limit table (default 1000000)")
    parser.add_argument("--limit-page-sizes", default="100,1000,5000",
                        help="page sizes of the under-the-limit table (default 100,1000,5000)")
    parser.add_argument("--citus-rows", type=int, default=0,
                        help="entity size of the Citus measurements (0: none; needs Citus)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 20,000 rows at 1000-row pages, re-sync of 20,000")
    parser.add_argument("--skip-throughput", action="store_true",
                        help="no first-sync table (nor the limit table)")
    parser.add_argument("--skip-resync", action="store_true", help="no re-sync table")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.page_sizes, args.resync_rows = "20000", "1000", 20000
    sizes, page_sizes = ints(args.rows), ints(args.page_sizes)
    limit_sizes = ints(args.limit_page_sizes)
    if shutil.which("curl") is None:
        sys.exit("curl is needed for floor F (apt-get install curl)")

    tmpdir = tempfile.mkdtemp(prefix="ciflow-bench-")
    try:
        run(args, sizes, page_sizes, limit_sizes, tmpdir)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def run(args, sizes, page_sizes, limit_sizes, tmpdir):
    started = time.perf_counter()
    max_top = max(page_sizes + limit_sizes + [1000])
    # Every page of the largest entity at every page size stays rendered (~650 B a row).
    cache_mb = max(512, int(max(sizes + [args.resync_rows]) * 700 * len(page_sizes) / 2 ** 20) + 256)
    results, resync = [], []
    with Emulator("--max-top", str(max_top), "--page-cache-mb", str(cache_mb)) as emu, \
            PgCluster(durable=True) as pg:
        info = machine(pg)
        print(f"machine: {info['nproc']} cores ({info['cpu']}), {info['ram_gib']:.1f} GiB RAM;"
              f" PostgreSQL {info['pg']}; " +
              ", ".join(f"{k}={v}" for k, v in sorted(info["settings"].items())), flush=True)
        pg.sql("CREATE EXTENSION ciflow")
        pg.sql("CREATE SCHEMA bench")
        for p in page_sizes:
            connect(pg, emu, p, f"emu{p}")
        connect(pg, emu, page_sizes[0])          # 'emu': the re-sync and Citus tables
        for rows in [] if args.skip_throughput else sizes:
            emu.control("POST", "entities/Customer/rows", dict(generated(rows), mode="replace"))
            t = time.perf_counter()
            csv_path = write_csv(pg, rows)
            csv_s = time.perf_counter() - t
            copies = {"server COPY": min(copy_server(pg, csv_path, "bench.copy_floor")
                                         for _ in range(2)),
                      "psql \\copy": min(copy_psql(pg, csv_path, "bench.copy_floor")
                                         for _ in range(2))}
            pg.sql("DROP TABLE bench.copy_floor")
            os.unlink(csv_path)
            c_how = min(copies, key=copies.get)
            print(f"\n{rows} rows: CSV file written in {csv_s:.1f} s; floor C: " +
                  ", ".join(f"{k} {v:.2f} s" for k, v in copies.items()), flush=True)
            for p in page_sizes:
                render = warm(emu, "Customer", rows, p)
                again = warm(emu, "Customer", rows, p)
                paths = page_paths(emu, "Customer", rows, p)
                fetch_py = min(floor_fetch_python(emu, paths) for _ in range(2))
                fetch_curl = min(floor_fetch_curl(emu, paths, tmpdir) for _ in range(2))
                fetches = {"curl": fetch_curl[0], "python": fetch_py[0]}
                f_how = min(fetches, key=fetches.get)
                user_s, user_rows, user_busy = baseline(pg, emu, p, "bench.user_copy")
                pg.sql("DROP TABLE bench.user_copy")
                target = f"bench.customer_{rows}_{p}"
                sync = first_sync(pg, emu, f"emu{p}", target, rows)
                pg.sql(f"DROP TABLE {target}")
                r = {"rows": rows, "page": p, "sync": sync, "user_s": user_s,
                     "user_rows": user_rows, "user_busy": user_busy, "F": fetches[f_how], "F_how": f_how,
                     "C": copies[c_how], "C_how": c_how, "fetches": fetches,
                     "bytes": fetch_curl[1], "render_s": render, "cached_s": again}
                results.append(r)
                print(f"  pages of {p}: emulator first render {render:.2f} s, served again"
                      f" {again:.2f} s ({fetch_curl[1] / 1e6:.0f} MB); floor F: curl"
                      f" {fetch_curl[0]:.2f} s, python {fetch_py[0]:.2f} s; baseline"
                      f" {user_s:.2f} s ({user_rows} rows, machine {user_busy:.0f} % busy);"
                      f" ciflow {sync['seconds']:.2f} s (pull {sync['pull_s']:.2f} s, the rest"
                      f" {sync['rest_s']:.2f} s; worker CPU {sync['cpu_s']:.2f} s; machine"
                      f" {sync['busy']:.0f} % busy)", flush=True)
                if sync["queries"] != {("$orderby", "$skip", "$top")}:
                    print(f"  NOTE: ciflow asked {sync['queries']}, not the pages rendered"
                          f" beforehand: its pull paid for rendering")

        if results:
            print_first_sync(results)
            limit_rows = limit_table(pg, emu, results, args.limit_rows, limit_sizes, tmpdir)
        else:
            limit_rows = []
        if args.resync_rows and not args.skip_resync:
            resync_table(emu, pg, args.resync_rows, page_sizes[0], resync)
        if args.citus_rows:
            citus_table(emu, args.citus_rows, page_sizes[0])
        total = time.perf_counter() - started
        print_summary(info, results, limit_rows, resync, args, total)


def print_first_sync(results):
    print("\nfirst sync (ratios < 1: ciflow is faster; F and C: the faster way, best of two;"
          " busy %: the whole machine's CPU use during ciflow's sync, 100 = both cores)")
    print(f"{'rows':>8} {'page':>5} {'ciflow s':>8} {'rows/s':>8} {'base s':>7} {'F s':>6} "
          f"{'F by':>6} {'C s':>6} {'C by':>11} {'/base':>6} {'/max(F,C)':>9} "
          f"{'anon pages kB':>13} {'anon publish kB':>15} {'VmHWM kB':>9} "
          f"{'data calls':>10} {'expected':>8} {'meta':>4} {'api_calls':>9} {'worker CPU s':>12} "
          f"{'busy %':>6}")
    for r in results:
        s = r["sync"]
        expected = math.ceil(r["rows"] / r["page"]) + 1
        print(f"{r['rows']:>8} {r['page']:>5} {s['seconds']:>8.2f} {r['rows'] / s['seconds']:>8.0f} "
              f"{r['user_s']:>7.2f} {r['F']:>6.2f} {r['F_how']:>6} {r['C']:>6.2f} {r['C_how']:>11} "
              f"{s['seconds'] / r['user_s']:>6.2f} {s['seconds'] / max(r['F'], r['C']):>9.2f} "
              f"{s['anon_pages_kb']:>13} {s['anon_publish_kb']:>15} {s['hwm_kb']:>9} "
              f"{s['calls'][0]:>10} {expected:>8} {s['calls'][1]:>4} {s['api_calls']:>9} "
              f"{s['cpu_s']:>12.2f} {s['busy']:>6.0f}")
        if s["calls"][2] or s["retries"]:
            print(f"  NOTE: {s['calls'][2]} other API calls, {s['retries']} retries")


def limit_table(pg, emu, results, rows, page_sizes, tmpdir):
    """Issue 12 item 4: time of a `rows`-row sync under 100 calls / 60 s."""
    measured = {}
    for p in page_sizes:
        best = [r for r in results if r["page"] == p]
        if best:
            r = max(best, key=lambda r: r["rows"])
            s = r["sync"]
            # publish, ANALYZE: taken as linear in rows
            measured[p] = (s["pull_s"] / s["calls"][0], s["calls"][1],
                           s["rest_s"] * rows / r["rows"], f"ciflow, {r['rows']} rows",
                           r["F"] / s["calls"][0])
            continue
        # Not among the measured page sizes: a small entity at that page size.
        n = min(rows, max(200 * p, 20000), 200000)
        emu.control("POST", "entities/Customer/rows", dict(generated(n), mode="replace"))
        warm(emu, "Customer", n, p)
        connect(pg, emu, p, f"emu{p}")
        s = first_sync(pg, emu, f"emu{p}", f"bench.limit_{p}", n)
        pg.sql(f"DROP TABLE bench.limit_{p}")
        paths = page_paths(emu, "Customer", n, p)
        f = min(floor_fetch_curl(emu, paths, tmpdir)[0] for _ in range(2))
        rest = s["rest_s"] * rows / n             # publish, ANALYZE: taken as linear in rows
        measured[p] = (s["pull_s"] / s["calls"][0], s["calls"][1], rest,
                       f"ciflow, {n} rows", f / len(paths))
    print(f"\nunder the real limit ({LIMIT_CALLS} calls / {LIMIT_WINDOW:.0f} s): {rows} rows,"
          f" per-call time measured in this run")
    print(f"{'page':>5} {'data calls':>10} {'meta':>4} {'per call s':>10} {'F per call s':>12} "
          f"{'measured on':>20} {'unthrottled s':>13} {'under limit s':>13} {'under limit':>11}")
    out = []
    for p in page_sizes:
        per_call, meta, rest, where, f_call = measured[p]
        data = math.ceil(rows / p) + 1
        calls = data + meta
        free = rest + calls * per_call
        limited = rest + under_limit_seconds(calls, per_call)
        out.append((p, data, meta, per_call, free, limited))
        print(f"{p:>5} {data:>10} {meta:>4} {per_call:>10.4f} {f_call:>12.4f} {where:>20} "
              f"{free:>13.1f} {limited:>13.0f} {limited / 60:>8.1f} min")
    return out


def print_summary(info, results, limit_rows, resync, args, total):
    st = info["settings"]
    print("\n## Sync benchmark (summary, Markdown)\n")
    print(f"`/usr/bin/python3 tests/bench_sync.py --rows {args.rows} --page-sizes {args.page_sizes}`"
          f" as root after `make install`; one run, {total / 60:.1f} min.")
    print(f"Machine: {info['nproc']} cores, {info['ram_gib']:.0f} GiB RAM; PostgreSQL {info['pg']};"
          f" default durability (fsync={st.get('fsync')}, synchronous_commit="
          f"{st.get('synchronous_commit')}, full_page_writes={st.get('full_page_writes')}),"
          f" wal_level={st.get('wal_level')}, shared_buffers={st.get('shared_buffers')},"
          f" max_wal_size={st.get('max_wal_size')}.\n")
    if results:
        print("| rows | page | ciflow s | rows/s | baseline s | F s | C s | ciflow/baseline |"
              " ciflow/max(F,C) | worker RssAnon MB (pages / publish) | worker CPU s |"
              " data calls (expected) |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in results:
            s = r["sync"]
            print(f"| {r['rows']:,} | {r['page']} | {s['seconds']:.2f} | {r['rows'] / s['seconds']:,.0f} |"
                  f" {r['user_s']:.2f} | {r['F']:.2f} ({r['F_how']}) | {r['C']:.2f} ({r['C_how']}) |"
                  f" {s['seconds'] / r['user_s']:.2f} | {s['seconds'] / max(r['F'], r['C']):.2f} |"
                  f" {s['anon_pages_kb'] / 1024:.1f} / {s['anon_publish_kb'] / 1024:.1f} |"
                  f" {s['cpu_s']:.1f} |"
                  f" {s['calls'][0]} + {s['calls'][1]} metadata ({math.ceil(r['rows'] / r['page']) + 1}) |")
        print("\nBaseline: Python, http.client keep-alive, json.loads, csv, psycopg2 COPY per page,"
              " one transaction. F: every page fetched by one separate process and discarded."
              " C: COPY of the same rows from a file into a typed table with its key.")
    if limit_rows:
        print(f"\nUnder the real limit ({LIMIT_CALLS} calls / {LIMIT_WINDOW:.0f} s), {args.limit_rows:,} rows:\n")
        print("| page size | calls | unthrottled | under the limit |")
        print("|---:|---:|---:|---:|")
        for p, data, meta, per_call, free, limited in limit_rows:
            print(f"| {p} | {data + meta} | {free:.0f} s | {limited / 60:.1f} min |")
    if resync:
        print(f"\nRe-sync of {args.resync_rows:,} rows:\n")
        print("| step | inserted/updated/deleted | sync s | publish s | WAL MB |")
        print("|---|---:|---:|---:|---:|")
        for name, counts, seconds, publish_s, wal in resync:
            print(f"| {name} | {'/'.join(map(str, counts))} | {seconds:.2f} | {publish_s:.2f} |"
                  f" {wal / 1e6:.1f} |")


if __name__ == "__main__":
    main()
