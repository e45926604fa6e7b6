"""Citus distributed and reference tables as sync targets (issue 11).

A coordinator with shared_preload_libraries = 'citus,ciflow' and two
workers, all on loopback.  The user creates the target and distributes it;
ciflow fills it through the executor, so Citus routes every row to its
shard.  The shards are read on the workers themselves, and the
coordinator's local shell relation must stay empty.

Citus is not packaged by Debian: the vendored build in ../shared/vendor/
is installed when it is missing (as root); without it the tests are
skipped, saying why.
"""

import glob
import os
import subprocess

import pytest

from harness import PgCluster
from extension.cihelpers import (connection_args, create_connection_sql, raises_sqlstate,
                                 sync)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENDOR = os.path.join(os.path.dirname(REPO), "shared", "vendor")


def citus_available():
    pkglibdir = subprocess.run(["pg_config", "--pkglibdir"], capture_output=True,
                               text=True).stdout.strip()
    if os.path.exists(os.path.join(pkglibdir, "citus.so")):
        return None
    tarballs = glob.glob(os.path.join(VENDOR, "citus-*-pg15-*.tar.gz"))
    if not tarballs:
        return f"Citus is not installed and no vendored build is in {VENDOR}"
    if os.geteuid() != 0 or pkglibdir != "/usr/lib/postgresql/15/lib":
        return "Citus is not installed, and the vendored build installs only as root into /usr"
    subprocess.run(["tar", "-xzf", tarballs[0], "-C", "/"], check=True)
    return None


@pytest.fixture(scope="module")
def citus():
    reason = citus_available()
    if reason:
        pytest.skip(reason)
    settings = {"shared_preload_libraries": "citus,ciflow", "max_worker_processes": 24,
                "wal_level": "logical", "max_connections": 80}
    nodes = [PgCluster(settings=settings) for _ in range(3)]
    try:
        for n in nodes:
            n.start()
            n.sql("CREATE EXTENSION citus")
        coordinator, workers = nodes[0], nodes[1:]
        coordinator.sql("SELECT citus_set_coordinator_host('127.0.0.1', %s)",
                        (coordinator.port,))
        for w in workers:
            coordinator.sql("SELECT citus_add_node('127.0.0.1', %s)", (w.port,))
        coordinator.sql("CREATE EXTENSION ciflow")
        yield coordinator, workers
    finally:
        for n in nodes:
            n.cleanup()


@pytest.fixture
def emu_connection(citus, emulator):
    coordinator, _ = citus
    query, params = create_connection_sql("emu", connection_args(emulator))
    coordinator.sql(query, params)
    coordinator.sql("CREATE SCHEMA crm")
    yield coordinator
    coordinator.sql("DROP SCHEMA crm CASCADE")
    coordinator.sql("SELECT ciflow.drop_connection('emu')")


CUSTOMERS = """CREATE TABLE crm.customers (
    customer_id text PRIMARY KEY, full_name text, city text, lifetime_value numeric,
    loyalty_points integer, is_active boolean)"""
FIELDS = "CustomerId,FullName,City,LifetimeValue,LoyaltyPoints,IsActive"


def shard_rows(workers, table="customers"):
    """Rows of the table's shards, read on the workers themselves (Citus
    hides shards from pg_class unless told otherwise)."""
    total = 0
    for w in workers:
        conn = w.connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SET citus.override_table_visibility = off")
                cur.execute("SELECT c.relname FROM pg_class c JOIN pg_namespace n"
                            " ON n.oid = c.relnamespace WHERE n.nspname = 'crm'"
                            " AND c.relkind = 'r' AND c.relname ~ %s", (f"^{table}_[0-9]+$",))
                for (shard,) in cur.fetchall():
                    cur.execute(f"SELECT count(*) FROM crm.{shard}")
                    total += cur.fetchone()[0]
        finally:
            conn.close()
    return total


def local_shell_rows(coordinator, table="crm.customers"):
    """Bytes in the coordinator's own relation (the shell): written only
    by something below the executor, which no Citus query would read."""
    return coordinator.sql(f"SELECT pg_relation_size('{table}')")[0][0]


def test_distributed_target_first_sync_resync_and_failure(emu_connection, citus, emulator):
    coordinator, workers = citus
    coordinator.sql(CUSTOMERS)
    coordinator.sql("SELECT create_distributed_table('crm.customers', 'customer_id',"
                    " shard_count => 4)")

    first = sync(coordinator, "emu", "Customer", target="crm.customers", fields=FIELDS)
    assert (first["status"], first["rows"], first["inserted"]) == ("succeeded", 250, 250)
    assert coordinator.sql("SELECT count(*) FROM crm.customers") == [(250,)]
    assert shard_rows(workers) == 250
    assert local_shell_rows(coordinator) == 0

    # Upstream: one row changed, one deleted, one added.
    rows = emulator.rows("Customer")
    changed = dict(rows[3], City="Zürich-changed")
    gone = rows[7]["CustomerId"]
    added = dict(rows[11], CustomerId="zz-new-customer")
    emulator.control("POST", "entities/Customer/rows", {"mode": "upsert", "rows": [changed]})
    emulator.control("DELETE", f"entities/Customer/rows/{gone}")
    emulator.control("POST", "entities/Customer/rows", {"mode": "append", "rows": [added]})

    again = sync(coordinator, "emu", "Customer", target="crm.customers", fields=FIELDS)
    assert (again["status"], again["inserted"], again["updated"], again["deleted"]) == \
        ("succeeded", 1, 1, 1), again
    assert coordinator.sql("SELECT count(*) FROM crm.customers") == [(250,)]
    assert coordinator.sql("SELECT city FROM crm.customers WHERE customer_id = %s",
                           (changed["CustomerId"],)) == [("Zürich-changed",)]
    assert coordinator.sql("SELECT count(*) FROM crm.customers WHERE customer_id = %s",
                           (gone,)) == [(0,)]
    assert shard_rows(workers) == 250
    assert local_shell_rows(coordinator) == 0

    # A re-sync that fails half-way (page 2) changes nothing on any shard.
    before = coordinator.sql("SELECT md5(string_agg(t::text, ',' ORDER BY customer_id))"
                             " FROM crm.customers t")
    emulator.add_fault({"method": "GET", "path": "/data/Customer$",
                        "query": r"(\$|%24)skip=100(&|$)"}, {"status": 400})
    with raises_sqlstate("22023"):
        sync(coordinator, "emu", "Customer", target="crm.customers", fields=FIELDS)
    emulator.clear_faults()
    assert coordinator.sql("SELECT md5(string_agg(t::text, ',' ORDER BY customer_id))"
                           " FROM crm.customers t") == before
    assert shard_rows(workers) == 250

    # No change: nothing written.
    quiet = sync(coordinator, "emu", "Customer", target="crm.customers", fields=FIELDS)
    assert (quiet["inserted"], quiet["updated"], quiet["deleted"]) == (0, 0, 0), quiet


def test_reference_table_target(emu_connection, citus, emulator):
    coordinator, workers = citus
    coordinator.sql("CREATE TABLE crm.countries (country text PRIMARY KEY,"
                    " revenue_by_country numeric)")
    coordinator.sql("SELECT create_reference_table('crm.countries')")
    run = sync(coordinator, "emu", "RevenueByCountry", target="crm.countries")
    assert run["status"] == "succeeded" and run["inserted"] == run["rows"] > 0, run
    # A reference table has one shard, placed on every node.
    assert shard_rows(workers, "countries") == run["rows"] * len(workers)


def test_swap_is_refused_for_distributed_tables(emu_connection, citus, emulator):
    coordinator, workers = citus
    coordinator.sql(CUSTOMERS)
    coordinator.sql("SELECT create_distributed_table('crm.customers', 'customer_id')")
    sync(coordinator, "emu", "Customer", target="crm.customers", fields=FIELDS)
    with raises_sqlstate("55000") as e:
        sync(coordinator, "emu", "Customer", target="crm.customers", fields=FIELDS,
             publish="swap")
    assert "Citus table" in e.detail and e.hint, e
    assert shard_rows(workers) == 250
