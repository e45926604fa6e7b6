"""Sync benchmark: ciflow.sync against two baselines measured in the same run.

    /usr/bin/python3 tests/bench_sync.py [--rows 20000,200000] [--page-size 1000]
                                         [--resync-rows 200000] [--skip-throughput]

For each entity size it prints:

- transfer: a plain keep-alive HTTP client fetching the same pages from the same
  emulator, without parsing them: the cost no client can avoid;
- copy: COPY of the same rows (the emulator's own CSV) into a table of the same
  shape: PostgreSQL's fastest way in;
- sync: ciflow.sync end to end (metadata, token, every page, publish, ANALYZE);
- ratios against both baselines, and the sync worker's peak private memory
  (RssAnon) while it reads pages, which must not grow with the entity's size,
  and while it publishes (the key index build, bounded by maintenance_work_mem).

Then, for one entity of --resync-rows rows, what a re-sync costs (time of
the whole call and of its publish, and WAL bytes from pg_current_wal_lsn()
around the call) against the first sync
of the same rows and against publish => 'swap', all measured in this run:
the first sync; re-syncs with 0 %, 1 % and 100 % of the rows changed
(publish => 'diff', the default); swaps with 0 % and 100 % changed.

It asserts nothing: a timing is a measurement, not a test.  Run it as root
(the cluster runs as postgres) after `make install`.
"""

import argparse
import http.client
import os
import subprocess
import sys
import threading
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from emulator_client import (CLIENT_ID, CLIENT_SECRET, INSTANCE_ID, SUB_KEY,  # noqa: E402
                             Emulator)
from harness import PgCluster  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

CUSTOMER_DDL = """CREATE TABLE bench_copy (
    customer_id text PRIMARY KEY, first_name text, last_name text, full_name text,
    email text, city text, country text, postal_code text, birth_date date,
    created_on timestamptz, last_purchase_on timestamptz, loyalty_points integer,
    purchase_count bigint, lifetime_value numeric, churn_score double precision,
    is_active boolean, external_ref uuid, notes text)"""


def transfer_seconds(emu, rows, page_size):
    """Fetches every page over one keep-alive connection; returns (seconds, bytes)."""
    token = emu.token()
    url = urllib.parse.urlsplit(emu.base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port)
    headers = {"Authorization": "Bearer " + token, "Ocp-Apim-Subscription-Key": SUB_KEY}
    path = f"{url.path}/instances/{INSTANCE_ID}/data/Customer"
    total = 0
    start = time.perf_counter()
    for skip in range(0, rows + 1, page_size):
        conn.request("GET", f"{path}?$top={page_size}&$skip={skip}", headers=headers)
        total += len(conn.getresponse().read())
    conn.close()
    return time.perf_counter() - start, total


def copy_seconds(pg, rows):
    """COPY of the same rows from the emulator's CSV generator."""
    csv = subprocess.run(["/usr/bin/python3", os.path.join(HERE, "ciemu.py"), "generate",
                          "--schema", "customer", "--rows", str(rows), "--seed", "7",
                          "--format", "csv"], check=True, capture_output=True, text=True).stdout
    pg.sql("DROP TABLE IF EXISTS bench_copy")
    pg.sql(CUSTOMER_DDL)
    start = time.perf_counter()
    pg.psql(["-c", "\\copy bench_copy FROM STDIN WITH (FORMAT csv)"], input=csv)
    return time.perf_counter() - start


class WorkerMemory(threading.Thread):
    """Samples the peak RssAnon of the sync worker, per phase of the run.

    The phase comes from the worker's pg_stat_activity entry ("ciflow sync:
    reading pages", "... publishing", ...), so page loading is measured apart
    from the key index build at publish, which maintenance_work_mem bounds.
    """

    def __init__(self, pg):
        super().__init__(daemon=True)
        self.conn = pg.connect()
        self.peak_kb = {}
        self.first_seen = {}     # phase -> perf_counter() when first sampled
        self.done = threading.Event()

    def run(self):
        with self.conn.cursor() as cur:
            while not self.done.is_set():
                cur.execute("SELECT pid, query FROM pg_stat_activity"
                            " WHERE backend_type = 'ciflow sync'")
                for pid, phase in cur.fetchall():
                    try:
                        with open(f"/proc/{pid}/status") as f:
                            kb = next(int(line.split()[1]) for line in f
                                      if line.startswith("RssAnon:"))
                    except (OSError, StopIteration):
                        continue
                    phase = (phase or "").replace("ciflow sync: ", "")
                    self.first_seen.setdefault(phase, time.perf_counter())
                    self.peak_kb[phase] = max(self.peak_kb.get(phase, 0), kb)
                time.sleep(0.02)
        self.conn.close()


def sync_seconds(pg, memory):
    memory.start()
    start = time.perf_counter()
    rows = pg.sql("SELECT rows, pages FROM ciflow.sync('emu', 'Customer')")
    elapsed = time.perf_counter() - start
    memory.done.set()
    memory.join()
    return elapsed, rows[0]


def measured_sync(pg, entity, publish="diff", target=None):
    """(seconds, publish seconds, WAL bytes, (inserted, updated, deleted)) of one sync.

    The publish is timed from the worker's phases as pg_stat_activity shows
    them (sampled every 20 ms): from "publishing" to "analyzing" or the end.
    """
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


def generated(rows, seed=7):
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


def resync_table(emu, pg, rows):
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
    print(f"\nre-sync of {rows} rows (publish time and WAL against the first sync of the"
          f" same rows; sync s includes the pull, which the emulator serves more slowly"
          f" for rows set through its control interface than for generated ones)")
    print(f"{'step':<22} {'ins/upd/del':>22} {'sync s':>8} {'publish s':>9} {'WAL MB':>9} "
          f"{'publish ratio':>13} {'WAL ratio':>10}")
    base = None
    for name, change, publish in steps:
        if change:
            change()
        seconds, publish_s, wal, counts = measured_sync(pg, entity, publish)
        base = base or (publish_s, wal)
        print(f"{name:<22} {'/'.join(map(str, counts)):>22} {seconds:>8.2f} {publish_s:>9.2f} "
              f"{wal / 1e6:>9.2f} {publish_s / base[0]:>13.2f} {wal / base[1]:>10.4f}")


def citus_cluster():
    """A coordinator and two workers with Citus, or None (and why) without it."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "extension"))
    from test_citus import citus_available
    reason = citus_available()
    if reason:
        return None, reason
    settings = {"shared_preload_libraries": "citus,ciflow", "max_worker_processes": 24}
    nodes = [PgCluster(settings=settings) for _ in range(3)]
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
        pg.sql("CREATE SCHEMA crm")
        first_plain = measured_sync(pg, entity, target="crm.plain")
        pg.sql("CREATE TABLE crm.dist (LIKE crm.plain INCLUDING ALL)")
        pg.sql("SELECT create_distributed_table('crm.dist', 'customer_id')")
        first_dist = measured_sync(pg, entity, target="crm.dist")
        one_pct = rows // 100
        set_rows(emu, entity, generated(rows - one_pct),
                 changed_rows(emu, entity, rows - one_pct, one_pct, 1))
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


def connect(pg, emu, page_size):
    pg.exec_params(
        "SELECT ciflow.create_connection('emu', base_url => $1, instance_id => $2,"
        " token_url => $3, client_id => $4, client_secret => $5,"
        " subscription_key => $6, page_size => $7,"
        # Throughput, not the call limit (100 per minute by default), is measured.
        " max_calls => 6000, per_interval => '1 second')",
        (emu.base_url, INSTANCE_ID, emu.token_url, CLIENT_ID, CLIENT_SECRET, SUB_KEY,
         page_size))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="20000,200000",
                        help="comma-separated entity sizes (default 20000,200000)")
    parser.add_argument("--page-size", type=int, default=1000)
    parser.add_argument("--resync-rows", type=int, default=200000,
                        help="entity size of the re-sync measurements (0: none)")
    parser.add_argument("--citus-rows", type=int, default=0,
                        help="entity size of the Citus measurements (0: none; needs Citus)")
    parser.add_argument("--skip-throughput", action="store_true",
                        help="only the re-sync measurements")
    args = parser.parse_args()
    sizes = [int(n) for n in args.rows.split(",")]

    print(f"{'rows':>9} {'transfer s':>10} {'copy s':>8} {'sync s':>8} {'sync rows/s':>12} "
          f"{'sync/transfer':>13} {'sync/(transfer+copy)':>20} {'pages RssAnon kB':>17} "
          f"{'publish RssAnon':>14}")
    with Emulator("--max-top", str(args.page_size)) as emu, PgCluster() as pg:
        pg.sql("CREATE EXTENSION ciflow")
        connect(pg, emu, args.page_size)
        for rows in [] if args.skip_throughput else sizes:
            emu.control("POST", "entities/Customer/rows",
                        {"mode": "replace",
                         "generate": {"schema": "customer", "rows": rows, "seed": 7}})
            transfer, _ = transfer_seconds(emu, rows, args.page_size)
            copy = copy_seconds(pg, rows)
            memory = WorkerMemory(pg)
            sync, (synced, _) = sync_seconds(pg, memory)
            if synced != rows:
                sys.exit(f"sync loaded {synced} rows, expected {rows}")
            print(f"{rows:>9} {transfer:>10.2f} {copy:>8.2f} {sync:>8.2f} {rows / sync:>12.0f} "
                  f"{sync / transfer:>13.2f} {sync / (transfer + copy):>20.2f} "
                  f"{memory.peak_kb.get('reading pages', 0):>17} "
                  f"{memory.peak_kb.get('publishing', 0):>14}")
        if args.resync_rows:
            resync_table(emu, pg, args.resync_rows)
        if args.citus_rows:
            citus_table(emu, args.citus_rows, args.page_size)


if __name__ == "__main__":
    main()
