#!/usr/bin/env bash
# ciflow's demo (the README's demo command: `bash tests/demo.sh`).
#
# Installs the Debian packages, builds and installs the extension exactly as
# the test run does (tests/run_tests.sh), then runs tests/demo.py: a
# throwaway PostgreSQL cluster, the Customer Insights emulator with the
# sample instance of tests/scenarios/demo.json, a ciflow connection, and
# tests/demo.sql through psql with its queries echoed. Everything it started
# is torn down at the end, also on failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tests/run_tests.sh

build_log="$(mktemp)"
trap 'rm -f "$build_log"' EXIT
echo "== Installing packages and building ciflow (output in case of failure only)"
if ! { ciflow_install_deps && ciflow_build_and_install; } >"$build_log" 2>&1; then
    cat "$build_log"
    echo "demo: install or build failed" >&2
    exit 1
fi
/usr/bin/python3 tests/demo.py "$@"
