"""Sync benchmark: ciflow.sync against two baselines measured in the same run.

    /usr/bin/python3 tests/bench_sync.py [--rows 20000,200000] [--page-size 1000]

For each entity size it prints:

- transfer: a plain keep-alive HTTP client fetching the same pages from the same
  emulator, without parsing them: the cost no client can avoid;
- copy: COPY of the same rows (the emulator's own CSV) into a table of the same
  shape: PostgreSQL's fastest way in;
- sync: ciflow.sync end to end (metadata, token, every page, publish, ANALYZE);
- ratios against both baselines, and the sync worker's peak private memory
  (RssAnon) while it reads pages, which must not grow with the entity's size,
  and while it publishes (the key index build, bounded by maintenance_work_mem).

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="20000,200000",
                        help="comma-separated entity sizes (default 20000,200000)")
    parser.add_argument("--page-size", type=int, default=1000)
    args = parser.parse_args()
    sizes = [int(n) for n in args.rows.split(",")]

    print(f"{'rows':>9} {'transfer s':>10} {'copy s':>8} {'sync s':>8} {'sync rows/s':>12} "
          f"{'sync/transfer':>13} {'sync/(transfer+copy)':>20} {'pages RssAnon kB':>17} "
          f"{'publish RssAnon':>14}")
    with Emulator("--max-top", str(args.page_size)) as emu, PgCluster() as pg:
        pg.sql("CREATE EXTENSION ciflow")
        pg.exec_params(
            "SELECT ciflow.create_connection('emu', base_url => $1, instance_id => $2,"
            " token_url => $3, client_id => $4, client_secret => $5,"
            " subscription_key => $6, page_size => $7,"
            # Throughput, not the call limit (100 per minute by default), is measured.
            " max_calls => 6000, per_interval => '1 second')",
            (emu.base_url, INSTANCE_ID, emu.token_url, CLIENT_ID, CLIENT_SECRET, SUB_KEY,
             args.page_size))
        for rows in sizes:
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


if __name__ == "__main__":
    main()
