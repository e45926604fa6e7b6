"""jansson against PostgreSQL's JSON parser on a real page (src/pageparse.c's choice).

    /usr/bin/python3 tests/bench_json_parsers.py [--rows 1000] [--iterations 50]

Starts the emulator, saves one page of the generated Customer entity, builds
tests/bench_json_parsers.c against the server's libpgcommon (frontend) and
jansson, and prints each parser's MB/s.  It asserts nothing.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from emulator_client import INSTANCE_ID, SUB_KEY, Emulator  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def pg_config(what):
    return subprocess.run(["pg_config", what], check=True, capture_output=True,
                          text=True).stdout.strip()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--iterations", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        page = os.path.join(tmp, "page.json")
        with Emulator("--max-top", str(args.rows)) as emu:
            emu.control("POST", "entities/Customer/rows",
                        {"mode": "replace",
                         "generate": {"schema": "customer", "rows": args.rows, "seed": 7}})
            req = urllib.request.Request(
                f"{emu.base_url}/instances/{INSTANCE_ID}/data/Customer?$top={args.rows}",
                headers={"Authorization": "Bearer " + emu.token(),
                         "Ocp-Apim-Subscription-Key": SUB_KEY})
            with urllib.request.urlopen(req) as resp, open(page, "wb") as out:
                out.write(resp.read())
        exe = os.path.join(tmp, "bench_json_parsers")
        libdir = pg_config("--pkglibdir")   # Debian keeps libpgcommon.a there
        subprocess.run(["gcc", "-O2", "-I" + pg_config("--includedir-server"),
                        "-I" + pg_config("--includedir") + "/internal",
                        os.path.join(HERE, "bench_json_parsers.c"), "-o", exe,
                        os.path.join(libdir, "libpgcommon.a"),
                        os.path.join(libdir, "libpgport.a"), "-ljansson"], check=True)
        subprocess.run([exe, page, str(args.iterations)], check=True)


if __name__ == "__main__":
    main()
