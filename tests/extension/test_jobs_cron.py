"""Cron schedules of ciflow jobs (issue 9), read as pg_cron reads them: five
fields in UTC with lists, ranges, steps, names and @hourly-style nicknames;
the next run is checked against a brute-force reading of the same rules.
Runs on the shared cluster: no launcher is needed to compute a schedule,
except for the last test, which has one of its own.
"""

import datetime as dt

import pytest

from extension.cihelpers import dict_rows, raises_sqlstate
from extension.workerhelpers import make_emu_connection, preloaded_cluster, wait_job

MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
DAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
NICKNAMES = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
             "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
             "@hourly": "0 * * * *"}


def field_values(text, lo, hi, names=None):
    values = set()
    for item in text.split(","):
        step = 1
        if "/" in item:
            item, step = item.split("/")
            step = int(step)
        if item == "*":
            a, b = lo, hi
        else:
            def num(s):
                return lo + names.index(s.lower()) if names and not s.isdigit() else int(s)
            if "-" in item:
                a, b = (num(x) for x in item.split("-"))
            else:
                a = num(item)
                b = hi if step > 1 else a
        values.update(range(a, b + 1, step))
    return values


def reference_next(spec, after):
    spec = NICKNAMES.get(spec, spec)
    f = spec.split()
    minutes = field_values(f[0], 0, 59)
    hours = field_values(f[1], 0, 23)
    doms = field_values(f[2], 1, 31)
    months = field_values(f[3], 1, 12, MONTHS)
    dows = {d % 7 for d in field_values(f[4], 0, 7, DAYS)}
    star = f[2].startswith("*") or f[4].startswith("*")
    t = after.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
    for _ in range(3 * 366 * 1440):
        if t.month in months:
            dom_ok, dow_ok = t.day in doms, (t.isoweekday() % 7) in dows
            if (dom_ok and dow_ok) if star else (dom_ok or dow_ok):
                if t.hour in hours and t.minute in minutes:
                    return t
                t += dt.timedelta(minutes=1)
                continue
            t = (t + dt.timedelta(days=1)).replace(hour=0, minute=0)
            continue
        t = (t + dt.timedelta(days=1)).replace(hour=0, minute=0)
    raise AssertionError("no match")


@pytest.fixture
def emu_conn(ci_connection, ciflow_db):
    yield ci_connection
    ciflow_db.sql("DELETE FROM ciflow.job_definitions")


@pytest.mark.parametrize("spec", [
    "*/15 * * * *", "15 2 * * *", "0 0 1 * *", "0 12 * * 1-5", "0 0 13 * 5",
    "5,10-12 */6 * jan,jul *", "30 4 1,15 * wed", "0 22 * * SAT", "7/20 3-5 * * *",
    "0 0 29 2 *", "59 23 31 12 *", "0 0 * * 7", "@hourly", "@daily", "@weekly",
    "@monthly", "@yearly",
])
def test_next_run_is_the_next_matching_minute_utc(ciflow_db, emu_conn, spec):
    job_id = ciflow_db.sql("SELECT ciflow.watch('emu', cron => %s)", (spec,))[0][0]
    row = dict_rows(ciflow_db, "SELECT created_at, next_run_at, cron FROM ciflow.job_definitions"
                               " WHERE id = %s", (job_id,))[0]
    after = row["created_at"].astimezone(dt.timezone.utc).replace(tzinfo=None)
    want = reference_next(spec, after)
    assert row["next_run_at"].astimezone(dt.timezone.utc).replace(tzinfo=None) == want
    shown = ciflow_db.sql("SELECT schedule FROM ciflow.jobs WHERE id = %s", (job_id,))
    assert shown == [(spec,)]


@pytest.mark.parametrize("spec", [
    "61 * * * *", "* * *", "* * * * * *", "@never", "*/0 * * * *", "0 0 31 2 *",
    "a b c d e", "1-2-3 * * * *", "5-1 * * * *", "* 24 * * *", "* * 0 * *", "",
])
def test_bad_cron_schedules_are_refused(ciflow_db, emu_conn, spec):
    with raises_sqlstate("22023") as info:
        ciflow_db.sql("SELECT ciflow.schedule_sync('emu', 'Customer', cron => %s)", (spec,))
    assert "cron" in info.message and info.hint


def test_a_cron_job_runs_and_its_next_run_is_the_next_minute(emulator):
    pg = preloaded_cluster()
    try:
        pg.sql("CREATE EXTENSION ciflow")
        make_emu_connection(pg, emulator)
        job_id = pg.sql("SELECT ciflow.watch('emu', cron => '* * * * *')")[0][0]
        # Due now instead of at the next minute; alter_job wakes the launcher.
        pg.sql("UPDATE ciflow.job_definitions SET next_run_at = now() WHERE id = %s", (job_id,))
        pg.sql("SELECT ciflow.alter_job(%s, enabled => true)", (job_id,))
        row = wait_job(pg, job_id, lambda r: r["last_status"] == "succeeded", what="a run")
        nxt = row["next_run_at"]
        assert nxt.second == 0 and nxt.microsecond == 0
        assert dt.timedelta(0) < nxt - row["last_finished_at"] <= dt.timedelta(minutes=1)
    finally:
        pg.cleanup()
