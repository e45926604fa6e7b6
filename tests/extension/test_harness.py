"""Self-tests of tests/harness.py: the cluster helpers every suite stands on.

Two clusters side by side, settings and preload written to the config,
restart keeping data and port, server-side bind parameters that reach
neither the log nor pg_stat_activity, pids()/kill_worker(), and a cleanup
that leaves no process and no directory behind.
"""

import os
import signal

import psycopg2
import pytest

from harness import PgCluster, PgError, pid_alive, wait_for


def test_two_clusters_side_by_side_and_cleanup():
    a = PgCluster(settings={"log_statement": "all", "work_mem": "3MB"})
    b = PgCluster()
    try:
        a.start()
        b.start()
        assert a.port != b.port
        assert a.sql("SELECT 1") == [(1,)] and b.sql("SELECT 2") == [(2,)]
        assert a.sql("SHOW work_mem") == [("3MB",)]
        assert b.sql("SHOW work_mem") == [("4MB",)]
        assert a.sql("SHOW fsync") == [("off",)]
        # Served on TCP loopback and on the socket in the cluster's own dir.
        assert a.sql("SELECT inet_server_addr()::text") == [("127.0.0.1/32",)]
        sock = psycopg2.connect(host=a.sockdir, port=a.port, user="postgres", dbname="postgres")
        sock.close()
        a.sql("SELECT 'logged-statement-marker'")
        assert "logged-statement-marker" in a.log_text()
        pid, basedir = a.postmaster_pid(), a.basedir
    finally:
        a.cleanup()
        b.cleanup()
    assert not os.path.exists(basedir)
    assert not pid_alive(pid)
    a.cleanup()  # idempotent


def test_restart_keeps_data_and_port():
    with PgCluster() as pg:
        pg.sql("CREATE TABLE t AS SELECT 42 AS x")
        port = pg.port
        pg.restart()
        assert pg.port == port
        assert pg.sql("SELECT x FROM t") == [(42,)]
        pg.configure({"work_mem": "5MB"})
        assert wait_for(lambda: pg.sql("SHOW work_mem") == [("5MB",)], what="reload")


def test_preload_writes_shared_preload_libraries():
    with PgCluster(preload=True) as pg:
        assert pg.sql("SHOW shared_preload_libraries") == [("ciflow",)]


def test_exec_params_binds_on_the_server(pg_cluster):
    marker = "bound-value-5e1f"
    offset = pg_cluster.log_size()
    pg_cluster.configure({"log_statement": "all", "log_parameter_max_length": 0})
    try:
        rows = pg_cluster.exec_params(
            "SELECT $1::text, $2::int + 1, $3::text IS NULL, query"
            " FROM pg_stat_activity WHERE pid = pg_backend_pid()", [marker, 41, None])
    finally:
        pg_cluster.configure({"log_statement": "none", "log_parameter_max_length": -1})
    value, answer, is_null, query = rows[0]
    assert (value, answer, is_null) == (marker, "42", "t")
    assert marker not in query
    assert marker not in pg_cluster.log_since(offset)
    with pytest.raises(PgError) as err:
        pg_cluster.exec_params("SELECT 1 / $1::int", [0])
    assert err.value.pgcode == "22012"


def test_create_role_psql_pids_and_kill(pg_cluster):
    role = pg_cluster.create_role("harness_probe")
    try:
        assert pg_cluster.sql("SELECT rolsuper, rolcanlogin FROM pg_roles WHERE rolname = %s",
                              (role,)) == [(False, True)]
        out = pg_cluster.psql(["-At", "-c", "SELECT current_user"], user=role).stdout
        assert out.strip() == role
        victim = pg_cluster.connect(application_name="harness-victim")
        try:
            [proc] = pg_cluster.pids("harness-victim")
            assert proc["backend_type"] == "client backend"
            killed = pg_cluster.kill_worker("harness-victim", sig=signal.SIGTERM)
            assert killed == [proc["pid"]]
            wait_for(lambda: not pg_cluster.pids("harness-victim"), what="backend exit")
            with pytest.raises(psycopg2.OperationalError):
                victim.cursor().execute("SELECT 1")
        finally:
            victim.close()
    finally:
        pg_cluster.sql(f"DROP ROLE {role}")
