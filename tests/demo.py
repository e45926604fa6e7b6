"""The ciflow demo, driven by tests/demo.sh (which builds and installs first).

Starts the emulator with the sample instance (tests/scenarios/demo.json, or
the emulator's identical built-in default instance when that file is
missing), a throwaway PostgreSQL cluster (tests/harness.py), creates the
extension, then runs tests/demo.sql through psql, echoing its input. The
connection's settings reach demo.sql as psql variables, so the echoed SQL
shows `:'client_secret'` rather than a value. Both servers are torn down at
the end, whatever happens.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import demo_delivery  # noqa: E402
import demo_events  # noqa: E402
import emulator_client as ec  # noqa: E402
from harness import PgCluster  # noqa: E402

SCENARIO = os.path.join(HERE, "scenarios", "demo.json")
DEMO_SQL = os.path.join(HERE, "demo.sql")


def main():
    scenario = SCENARIO if os.path.exists(SCENARIO) else None
    print("== Starting the Customer Insights emulator"
          + (f" with {os.path.relpath(SCENARIO)}" if scenario else " (built-in instance)"))
    # The demo's rate limit: the service connector's published 100 calls/minute.
    with ec.Emulator("--rate", "100/60", scenario=scenario) as emu:
        print(f"   listening at {emu.base_url}")
        print("== Starting a throwaway PostgreSQL 15 cluster")
        with PgCluster() as pg:
            print(f"   listening at {pg.host}:{pg.port}")
            variables = {
                "base_url": emu.base_url,
                "token_url": emu.token_url,
                "instance_id": ec.INSTANCE_ID,
                "client_id": ec.CLIENT_ID,
                "client_secret": ec.CLIENT_SECRET,
                "scope": ec.SCOPE,
                "subscription_key": ec.SUB_KEY,
            }
            args = ["--echo-all", "--quiet", "-P", "pager=off"]
            for k, v in variables.items():
                args += ["-v", f"{k}={v}"]
            args += ["-f", DEMO_SQL]
            sys.stdout.flush()
            proc = pg.psql(args, check=False, capture=False)
            if proc.returncode == 0:
                demo_events.run(pg, emu)
                demo_delivery.run(pg, emu)
            print("== Stopping PostgreSQL and the emulator")
    if proc.returncode != 0:
        print(f"demo: psql failed with exit status {proc.returncode}", file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
