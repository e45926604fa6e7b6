#!/usr/bin/env bash
# ciflow's full test run (the README's test command: `bash tests/run_tests.sh`).
#
# Installs the Debian packages the build and the tests need, builds and
# installs the extension (a compiler warning fails the build), then runs every
# pytest suite under tests/ (the emulator's, the extension's, pg_regress).
# The last line printed is pytest's own summary ("N passed, N failed in ...").
#
# Works as root on a fresh Debian 12 machine from a clean clone. As another
# user the packages must already be installed and `make install` must be
# allowed. CIFLOW_SKIP_APT=1 skips the package step (quick local reruns).
#
# tests/demo.sh sources this file for ciflow_install_deps and
# ciflow_build_and_install, so the two commands install and build alike.
set -euo pipefail

CIFLOW_DEBS=(postgresql-15 postgresql-server-dev-15 libcurl4-openssl-dev
             libjansson-dev python3-pytest python3-psycopg2 openssl make gcc
             libxml2-dev nodejs python3-aiosmtpd postgresql-15-cron)

ciflow_install_deps() {
    if [[ "${CIFLOW_SKIP_APT:-0}" == 1 ]]; then
        return 0
    fi
    if [[ "$(id -u)" != 0 ]]; then
        echo "run_tests: not root, assuming ${CIFLOW_DEBS[*]} are installed" >&2
        return 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${CIFLOW_DEBS[@]}"
}

ciflow_build_and_install() {
    local log
    log="$(mktemp)"
    # Build output goes to a log first so that warnings can be caught even
    # when the compiler does not treat them as errors.
    if ! { make clean && make; } >"$log" 2>&1; then
        cat "$log"; rm -f "$log"
        echo "run_tests: build failed" >&2
        return 1
    fi
    cat "$log"
    if grep -qi 'warning:' "$log"; then
        rm -f "$log"
        echo "run_tests: the build printed compiler warnings (see above)" >&2
        return 1
    fi
    rm -f "$log"
    make install
}

ciflow_run_tests() {
    # Exit code 5 (no tests collected) is non-zero too, so it fails the run.
    exec /usr/bin/python3 -m pytest tests/ -v -p no:cacheprovider "$@"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    cd "$(dirname "${BASH_SOURCE[0]}")/.."
    ciflow_install_deps
    ciflow_build_and_install
    ciflow_run_tests "$@"
fi
