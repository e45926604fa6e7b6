"""HTTPS: ciflow verifies the emulator's certificate against the connection's
ca_file (the throw-away CA of tests/make_test_ca.sh); an unrelated CA, or
none, fails with 08006 before any request is answered.
"""

import os

import pytest

from extension.cihelpers import assert_names, assert_table_matches_emulator, raises_sqlstate, sync

pytestmark = pytest.mark.tls


def test_https_with_test_ca(ciflow_db, make_connection, tls_emulator):
    assert tls_emulator.base_url.startswith("https://")
    make_connection("emu", tls_emulator)
    names = {r[0] for r in ciflow_db.sql("SELECT qualified_name FROM ciflow.get_entities('emu')")}
    assert "Customer" in names
    run = sync(ciflow_db, "emu", "Customer")
    assert run["status"] == "succeeded"
    assert assert_table_matches_emulator(ciflow_db, "emu.customer", tls_emulator, "Customer") \
        == run["rows"] > 0


@pytest.mark.parametrize("ca", ["other", "none"])
def test_wrong_ca_fails(ciflow_db, make_connection, tls_emulator, ca):
    other = os.path.join(os.path.dirname(tls_emulator.ca_file), "other-ca.pem")
    make_connection("emu", tls_emulator, ca_file=other if ca == "other" else None)
    before = len(tls_emulator.log())
    for query in ("SELECT * FROM ciflow.get_entities('emu')",
                  "SELECT * FROM ciflow.sync('emu', 'Customer')"):
        with raises_sqlstate("08006") as err:
            ciflow_db.sql(query)
        assert_names(err, "emu")
    # The handshake failed: the emulator never saw a request.
    assert len(tls_emulator.log()) == before
    assert ciflow_db.sql("SELECT to_regclass('emu.customer')") == [(None,)]
