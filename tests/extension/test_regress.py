"""The lead's pg_regress files (sql/*.sql, expected/*.out, REGRESS in the
Makefile), run against a throwaway cluster and a fresh emulator.

The SQL files read the emulator's addresses with psql's \\getenv from
CIFLOW_EMULATOR_URL and CIFLOW_EMULATOR_TOKEN_URL. pg_regress is a client,
so it runs as whoever runs the tests; its output goes to a temp dir of ours.
"""

import os
import re
import shlex
import subprocess
import tempfile

import pytest

from harness import PgCluster

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def makefile_variable(name, path=os.path.join(REPO, "Makefile")):
    """The words of `name = ...` (with += and line continuations) in a Makefile."""
    with open(path) as f:
        text = f.read().replace("\\\n", " ")
    words = []
    for line in text.splitlines():
        m = re.match(rf"^\s*{name}\s*(\+?|:|\?)=\s*(.*)$", line)
        if m:
            value = m.group(2).split("#", 1)[0].split()
            words = words + value if m.group(1) == "+" else value
    return words


def pg_regress_binary():
    pkglibdir = subprocess.run(["pg_config", "--pkglibdir"], check=True, capture_output=True,
                               text=True).stdout.strip()
    return os.path.join(pkglibdir, "pgxs", "src", "test", "regress", "pg_regress")


DBNAME = "contrib_regression"


@pytest.fixture(scope="module")
def regress_cluster():
    cluster = PgCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()


def create_regress_database(cluster):
    """What pg_regress does itself without --use-existing (which skips it)."""
    cluster.drop_database(DBNAME)
    cluster.sql(f"CREATE DATABASE {DBNAME} TEMPLATE template0")
    for setting, value in (("lc_messages", "C"), ("lc_monetary", "C"), ("lc_numeric", "C"),
                           ("lc_time", "C"), ("bytea_output", "hex"),
                           ("timezone_abbreviations", "Default")):
        cluster.sql(f"ALTER DATABASE {DBNAME} SET {setting} TO '{value}'")


def test_pg_regress(regress_cluster, emulator):
    tests = makefile_variable("REGRESS")
    assert tests, "the Makefile lists no REGRESS tests"
    opts = makefile_variable("REGRESS_OPTS")
    inputdir = REPO
    for o in list(opts):
        if o.startswith("--inputdir="):
            inputdir = os.path.join(REPO, o.split("=", 1)[1])
            opts.remove(o)
    create_regress_database(regress_cluster)
    with tempfile.TemporaryDirectory(prefix="ciflow-regress-") as outdir:
        argv = [pg_regress_binary(), "--use-existing",
                "--host", regress_cluster.host, "--port", str(regress_cluster.port),
                "--user", "postgres", "--inputdir", inputdir, "--outputdir", outdir,
                "--dbname", DBNAME] + opts + tests
        env = dict(os.environ, CIFLOW_EMULATOR_URL=emulator.base_url,
                   CIFLOW_EMULATOR_TOKEN_URL=emulator.token_url,
                   PGHOST=regress_cluster.host, PGPORT=str(regress_cluster.port))
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO,
                              timeout=600)
        diffs = ""
        path = os.path.join(outdir, "regression.diffs")
        if os.path.exists(path):
            with open(path, errors="replace") as f:
                diffs = f.read()
        assert proc.returncode == 0, (
            f"pg_regress failed ({proc.returncode}): {' '.join(map(shlex.quote, argv))}\n"
            f"{proc.stdout}\n{proc.stderr}\n--- regression.diffs ---\n{diffs}")
