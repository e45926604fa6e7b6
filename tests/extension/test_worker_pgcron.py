"""ciflow.sync called by pg_cron (issue 9): the sync runs from someone
else's background worker (cron.use_background_workers) and records its run
as in a session.  pg_cron is Debian's postgresql-15-cron, found in the
server's pkglibdir; the test is skipped where it is not installed.

pg_cron 1.4 runs jobs at minute boundaries: this test waits up to a minute.
"""

import os
import subprocess

import pytest

from harness import PgCluster, pg_bindir, wait_for
from extension.workerhelpers import WORKER_SETTINGS, make_emu_connection, runs


def pg_cron_installed():
    pkglibdir = subprocess.run([os.path.join(pg_bindir(), "pg_config"), "--pkglibdir"],
                               capture_output=True, text=True, check=True).stdout.strip()
    return os.path.exists(os.path.join(pkglibdir, "pg_cron.so"))


@pytest.mark.skipif(not pg_cron_installed(), reason="postgresql-15-cron is not installed")
def test_pg_cron_job_calls_ciflow_sync(emulator):
    settings = dict(WORKER_SETTINGS, **{
        "shared_preload_libraries": "ciflow,pg_cron",
        "cron.database_name": "postgres",
        "cron.use_background_workers": "on",
        "max_worker_processes": 20,
    })
    with PgCluster(settings=settings) as pg:
        pg.sql("CREATE EXTENSION ciflow")
        pg.sql("CREATE EXTENSION pg_cron")
        make_emu_connection(pg, emulator)
        pg.sql("SELECT cron.schedule('ciflow-customer', '* * * * *',"
               " $$SELECT id FROM ciflow.sync('emu', 'Customer')$$)")
        wait_for(lambda: pg.sql("SELECT status FROM cron.job_run_details"
                                " WHERE status IN ('succeeded', 'failed')"),
                 timeout=75, interval=0.5, what="pg_cron's first run")
        details = pg.sql("SELECT status, return_message FROM cron.job_run_details")
        assert details[0][0] == "succeeded", details
        run = runs(pg)[0]
        assert run["status"] == "succeeded" and run["rows"] == 250
        assert pg.sql("SELECT count(*) FROM emu.customer") == [(250,)]
        # No ciflow job took part: the launcher has nothing to do.
        assert pg.sql("SELECT count(*) FROM ciflow.jobs") == [(0,)]
        pg.sql("SELECT cron.unschedule('ciflow-customer')")
