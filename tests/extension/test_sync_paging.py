"""ciflow.sync, full mode: paging correctness (A.3 paging rules, A.6).

Every case syncs an entity of the emulator's deterministic `customer`
generator (all Edm types of the contract's list, nulls, Int64 above 2^53,
decimals, 7-digit timestamps, awkward notes) and compares the EXACT row set
in PostgreSQL with the emulator's rows: canonical values of every column,
SHA-256 over the sorted set, plus the emulator's stats (count, sums) against
SQL aggregates. The request log shows how the pull paged.
"""

import decimal

import pytest

from extension.cihelpers import (assert_table_matches_emulator, data_requests, query_of, sync,
                                 last_seq)

ENTITY = "Paged"
TABLE = "emu.paged"


def load(emu, rows, seed=7):
    emu.set_entity(ENTITY, {"entityType": "profile"},
                   generate={"schema": "customer", "rows": rows, "seed": seed})


def check_stats(db, emu):
    """Cross-check with the emulator's stats: row count, null counts, exact sums."""
    stats = emu.stats(ENTITY)
    count, loyalty, purchases, ltv, no_email, no_birth = db.sql(
        f"SELECT count(*), sum(loyalty_points), sum(purchase_count), sum(lifetime_value),"
        f" count(*) - count(email), count(*) - count(birth_date) FROM {TABLE}")[0]
    assert count == stats["row_count"]
    sums = stats["sums"]
    assert (loyalty or 0) == int(sums.get("LoyaltyPoints", 0))
    assert (purchases or 0) == int(sums.get("PurchaseCount", 0))
    assert (ltv or 0) == decimal.Decimal(sums.get("LifetimeValue", "0"))
    assert (no_email, no_birth) == (stats["null_counts"].get("Email", 0),
                                    stats["null_counts"].get("BirthDate", 0))


# (id, rows, connection page_size, emulator settings, allowed data-call counts)
# Skip mode ends at an empty page; after a page shorter than an earlier one
# it may stop early (A.3 rule 3), hence two allowed counts for ragged ends.
CASES = [
    ("skip_default_page", 250, None, {}, {3, 4}),
    ("skip_server_cap_below_page_size", 100, 100, {"max_top": 30}, {4, 5}),
    ("skip_exactly_k_pages", 150, 50, {}, {4}),
    ("skip_one_row", 1, None, {}, {2}),
    ("skip_empty_entity", 0, None, {}, {1}),
    ("nextlink_absolute", 250, None, {"nextlink": "absolute"}, {3}),
    ("nextlink_relative", 250, None, {"nextlink": "relative"}, {3}),
    ("nextlink_rooted", 250, None, {"nextlink": "rooted"}, {3}),
    ("nextlink_relative_capped", 100, 100, {"nextlink": "relative", "max_top": 30}, {4}),
    ("nextlink_exactly_k_pages", 150, 50, {"nextlink": "absolute"}, {3}),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_paging_exact_rowset(ciflow_db, make_connection, emulator, case):
    _, rows, page_size, settings, allowed_calls = case
    if settings:
        emulator.settings(**settings)
    load(emulator, rows)
    overrides = {"page_size": page_size} if page_size else {}
    make_connection("emu", emulator, **overrides)
    seq = last_seq(emulator)

    run = sync(ciflow_db, "emu", ENTITY)

    assert run["status"] == "succeeded", run
    assert run["rows"] == rows
    assert assert_table_matches_emulator(ciflow_db, TABLE, emulator, ENTITY) == rows
    check_stats(ciflow_db, emulator)

    calls = data_requests(emulator, ENTITY, seq)
    assert len(calls) in allowed_calls, \
        f"{len(calls)} data calls: {[query_of(c) for c in calls]}"
    assert all(c.get("status", 200) == 200 for c in calls)
    expected_top = str(page_size or 100)
    first = query_of(calls[0])
    assert first.get("$top") == expected_top, first
    if settings.get("nextlink"):
        # Link mode: after the first page every request is a followed link.
        assert all("$skiptoken" in query_of(c) for c in calls[1:]), [query_of(c) for c in calls]
    else:
        # Skip mode: $skip advances by the rows received, $top stays the page size.
        skips = [int(query_of(c).get("$skip", "0")) for c in calls]
        served = [c.get("rows") for c in calls]
        if all(isinstance(s, int) for s in served):
            assert skips == [sum(served[:i]) for i in range(len(calls))], (skips, served)
        assert all(query_of(c).get("$top") == expected_top for c in calls)


def test_empty_entity_creates_typed_empty_table(ciflow_db, make_connection, emulator):
    load(emulator, 0)
    make_connection("emu", emulator)
    run = sync(ciflow_db, "emu", ENTITY)
    assert (run["status"], run["rows"]) == ("succeeded", 0)
    assert ciflow_db.sql(f"SELECT count(*) FROM {TABLE}") == [(0,)]
    assert ciflow_db.sql(
        "SELECT data_type FROM information_schema.columns"
        " WHERE table_schema = 'emu' AND table_name = 'paged' AND column_name = 'lifetime_value'"
    ) == [("numeric",)]


def test_page_size_from_alter_connection_is_used(ciflow_db, make_connection, emulator):
    load(emulator, 120)
    make_connection("emu", emulator)
    ciflow_db.sql("SELECT ciflow.alter_connection('emu', page_size => 40)")
    seq = last_seq(emulator)
    run = sync(ciflow_db, "emu", ENTITY)
    assert run["rows"] == 120
    calls = data_requests(emulator, ENTITY, seq)
    assert [query_of(c).get("$top") for c in calls] == ["40"] * 4
    assert [query_of(c).get("$skip") for c in calls] == ["0", "40", "80", "120"]


def test_resync_after_upstream_shrinks(ciflow_db, make_connection, emulator):
    """Rows gone upstream are gone after the next complete pull."""
    load(emulator, 230, seed=3)
    make_connection("emu", emulator)
    sync(ciflow_db, "emu", ENTITY)
    load(emulator, 90, seed=4)
    run = sync(ciflow_db, "emu", ENTITY)
    assert run["rows"] == 90
    assert assert_table_matches_emulator(ciflow_db, TABLE, emulator, ENTITY) == 90
