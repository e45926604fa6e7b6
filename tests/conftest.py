"""Pytest fixtures shared by every suite under tests/.

Owns the glue between the PostgreSQL harness (tests/harness.py) and helper
A's emulator client (tests/emulator_client.py):

* ``pg_cluster``   (session) one throwaway cluster for the whole run;
* ``ciflow_db``    (module)  a fresh database with ``CREATE EXTENSION ciflow``,
                             dropped when the module ends;
* ``emulator_server`` / ``tls_emulator_server`` (module) one emulator
  process per module (plain HTTP / HTTPS with a throw-away CA);
* ``emulator`` / ``tls_emulator`` (function) the module's emulator after
  ``reset()``, so every test starts from the default instance, no faults,
  default settings and an empty request log;
* ``make_connection`` (function) a factory for ciflow connections pointing at
  an emulator with its default credentials; ``ci_connection`` is the common
  case (connection ``emu`` on ``emulator``). Connections and the schemas
  their syncs create are dropped after the test.

Everything is torn down by fixture finalizers, even when a test fails; the
harness's atexit/signal hooks and Emulator.stop() cover interruptions.

Imports of the emulator client are deferred to fixture time so that a
missing or broken module fails only the tests that need it.
"""

import os
import re
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from harness import PgCluster  # noqa: E402
from extension.cihelpers import connection_args, create_connection_sql  # noqa: E402

# Settings of the shared cluster. ciflow's GUCs are registered when the
# library loads; the worker (later issues) wants preloading, the actions and
# syncs of issue 3 do not, so the shared cluster loads ciflow on demand.
SESSION_SETTINGS = {
    "log_min_messages": "warning",
    "log_min_error_statement": "error",
}

CONNECTION_NAME = "emu"

# Database defaults for test databases: failures that are retried (5xx,
# transport errors) would otherwise wait 1+2+4+8 s each. Tests about
# retries set their own values with SET.
FAST_RETRIES = {"ciflow.max_attempts": 2, "ciflow.retry_base_delay": 20}


def pytest_configure(config):
    config.addinivalue_line("markers", "tls: needs the HTTPS emulator")


# ---------------------------------------------------------------------------
# PostgreSQL

@pytest.fixture(scope="session")
def pg_cluster():
    cluster = PgCluster(settings=SESSION_SETTINGS)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()


def _db_name_for(request):
    base = os.path.splitext(os.path.basename(str(request.node.fspath)))[0]
    return "t_" + re.sub(r"[^a-z0-9_]", "_", base.lower())[:50]


@pytest.fixture(scope="module")
def ciflow_db(pg_cluster, request):
    """A database of its own for the test module, with the extension created."""
    name = _db_name_for(request)
    pg_cluster.drop_database(name)
    pg_cluster.create_database(name)
    db = pg_cluster.database(name)
    try:
        for setting, value in FAST_RETRIES.items():
            db.sql(f"ALTER DATABASE {name} SET {setting} = {value}")
        db.sql("CREATE EXTENSION ciflow")
        yield db
    finally:
        pg_cluster.drop_database(name)


# ---------------------------------------------------------------------------
# Emulator

def _start_emulator(**kw):
    from emulator_client import Emulator
    return Emulator(**kw).start()


@pytest.fixture(scope="module")
def emulator_server():
    emu = _start_emulator()
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture(scope="module")
def tls_emulator_server():
    emu = _start_emulator(tls=True)
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture(scope="module")
def dataverse_server():
    """An emulator of the dataverse flavour (/api/data/v9.2)."""
    from emulator_client import Emulator
    emu = Emulator("--flavor", "dataverse").start()
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture
def dataverse(dataverse_server):
    dataverse_server.reset()
    return dataverse_server


@pytest.fixture
def emulator(emulator_server):
    emulator_server.reset()
    return emulator_server


@pytest.fixture
def tls_emulator(tls_emulator_server):
    tls_emulator_server.reset()
    return tls_emulator_server


# ---------------------------------------------------------------------------
# ciflow connections

@pytest.fixture
def make_connection(ciflow_db, emulator_server):
    """Factory: make_connection(name='emu', emu=None, **overrides) -> name.

    emu defaults to the module's plain emulator; overrides replace or add
    create_connection arguments (None drops one). Cleans up afterwards:
    drops every connection made and the schema named after it.
    """
    made = []

    def make(name=CONNECTION_NAME, emu=None, **overrides):
        args = connection_args(emu or emulator_server, **overrides)
        query, params = create_connection_sql(name, args)
        ciflow_db.sql(query, params)
        made.append(name)
        return name

    yield make
    for name in made:
        ciflow_db.sql("SELECT ciflow.drop_connection(%s, if_exists => true)", (name,))
        ciflow_db.sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture
def private_ciflow(emulator):
    """A cluster of the test's own (for crashes and restarts that would end
    every session of the shared one), with ciflow, the connection 'emu' to
    the test's emulator, and emu.customer synced once."""
    with PgCluster() as pg:
        pg.sql("CREATE EXTENSION ciflow")
        query, params = create_connection_sql("emu", connection_args(emulator))
        pg.sql(query, params)
        pg.sql("SELECT * FROM ciflow.sync('emu', 'Customer')")
        yield pg


@pytest.fixture
def ci_connection(make_connection, emulator):
    """The connection 'emu' on a freshly reset plain emulator."""
    return make_connection(CONNECTION_NAME, emulator)
