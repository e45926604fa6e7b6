"""Paging of /data in every mode, with exact row-set checks (C.3)."""

import urllib.parse

import pytest

from conftest import DATA, I, get, keys_of, pull_links, pull_skip

ALL_MODES = ["absolute", "relative", "rooted"]


def make_numbers(emu, name, n):
    emu.set_entity(name, {"attributes": [["Id", "Edm.Int32"], ["Label", "Edm.String"]], "keys": [["Id"]],
                          "entityType": "activity"},
                   rows=[{"Id": k, "Label": "row %d" % k} for k in range(n)])


def test_default_page_is_100_in_insertion_order(emu):
    expected = keys_of(emu.rows("Customer"))
    r = get(emu, DATA + "Customer")
    assert keys_of(r.json["value"]) == expected[:100]
    assert "@odata.nextLink" not in r.json and "@odata.count" not in r.json
    assert r.json["@odata.context"] == "%s/v1/instances/%s/data/$metadata#Customer" % (emu.root, I)


def test_default_page_setting(emu):
    emu.settings(default_page=7)
    assert len(get(emu, DATA + "Customer").json["value"]) == 7


def test_top_is_silently_capped_and_skip_paging_gets_everything(emu):
    emu.settings(max_top=40)
    expected = emu.rows("Customer")
    assert len(get(emu, DATA + "Customer?$top=500").json["value"]) == 40
    rows, sizes = pull_skip(emu, "Customer", 100)
    assert rows == expected                      # exact rows, exact order, no gap, no repeat
    assert sizes == [40] * 6 + [10, 0]


def test_top_within_cap_is_honoured(emu):
    rows, sizes = pull_skip(emu, "RetailPos_Transactions", 10)
    assert sizes == [10, 10, 10, 6, 0]
    assert rows == emu.rows("RetailPos_Transactions")


def test_top_zero_and_skip_past_end(emu):
    assert get(emu, DATA + "Customer?$top=0").json["value"] == []
    emu.settings(nextlink="absolute")
    r = get(emu, DATA + "Customer?$top=0").json
    assert r["value"] == [] and "@odata.nextLink" not in r
    for skip in (250, 251, 10 ** 9):
        r = get(emu, DATA + "Customer?$skip=%d" % skip)
        assert r.status == 200 and r.json["value"] == [] and "@odata.nextLink" not in r.json


@pytest.mark.parametrize("q", ["$top=-1", "$top=abc", "$top=1.5", "$skip=-3", "$skip=x", "$top=",
                               "$top=1&$top=2"])
def test_bad_top_or_skip_is_400(emu, q):
    r = get(emu, DATA + "Customer?" + q)
    assert r.status == 400 and r.json["error"]["code"] == "BadRequest"


@pytest.mark.parametrize("mode", ALL_MODES)
def test_nextlink_modes_exact_rows(emu, mode):
    emu.settings(nextlink=mode, max_top=30)
    rows, responses = pull_links(emu, DATA + "Customer?$top=100")
    assert rows == emu.rows("Customer")
    assert [len(r.json["value"]) for r in responses] == [30] * 8 + [10]
    for r in responses[:-1]:
        link = r.json["@odata.nextLink"]
        token = link.split("$skiptoken=")[1]
        assert "%" in token and "$top=100" in link and "$skip=" not in link.replace("$skiptoken", "")
        if mode == "absolute":
            assert link.startswith("%s/v1/instances/%s/data/Customer?" % (emu.root, I))
        elif mode == "rooted":
            assert link.startswith("/v1/instances/%s/data/Customer?" % I)
        else:
            assert link.startswith("Customer?$top=100&$skiptoken=")
    assert "@odata.nextLink" not in responses[-1].json


def test_nextlink_absolute_uses_the_client_host(emu):
    emu.settings(nextlink="absolute")
    r = get(emu, DATA + "Customer?$top=5", headers={"Host": "localhost:%d" % emu.port})
    assert r.json["@odata.nextLink"].startswith("http://localhost:%d/v1/" % emu.port)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_nextlink_keeps_filter_select_orderby(emu, mode):
    emu.settings(nextlink=mode, max_top=7)
    q = "$filter=LoyaltyPoints%20gt%2030000&$select=CustomerId,LoyaltyPoints&$orderby=LoyaltyPoints%20desc"
    rows, responses = pull_links(emu, DATA + "Customer?" + q)
    expected = sorted([r for r in emu.rows("Customer") if r["LoyaltyPoints"] > 30000],
                      key=lambda r: -r["LoyaltyPoints"])
    assert rows == [{"CustomerId": r["CustomerId"], "LoyaltyPoints": r["LoyaltyPoints"]} for r in expected]
    assert len(responses) == -(-len(expected) // 7)
    assert q in responses[0].json["@odata.nextLink"]


@pytest.mark.parametrize("mode", ["off"] + ALL_MODES)
def test_empty_entity(emu, mode):
    emu.settings(nextlink=mode, count="always")
    make_numbers(emu, "Empty", 0)
    r = get(emu, DATA + "Empty?$top=10").json
    assert r["value"] == [] and r["@odata.count"] == 0 and "@odata.nextLink" not in r


@pytest.mark.parametrize("mode", ALL_MODES)
def test_exactly_k_pages_with_links(emu, mode):
    emu.settings(nextlink=mode)
    make_numbers(emu, "Ninety", 90)
    rows, responses = pull_links(emu, DATA + "Ninety?$top=30")
    assert [r["Id"] for r in rows] == list(range(90))
    assert len(responses) == 3
    assert ["@odata.nextLink" in r.json for r in responses] == [True, True, False]


def test_exactly_k_pages_skip_mode(emu):
    make_numbers(emu, "Ninety", 90)
    rows, sizes = pull_skip(emu, "Ninety", 30)
    assert [r["Id"] for r in rows] == list(range(90)) and sizes == [30, 30, 30, 0]


@pytest.mark.parametrize("mode", ["off"] + ALL_MODES)
def test_one_row(emu, mode):
    emu.settings(nextlink=mode)
    make_numbers(emu, "One", 1)
    r = get(emu, DATA + "One").json
    assert r["value"] == [{"Id": 0, "Label": "row 0"}] and "@odata.nextLink" not in r
    assert get(emu, DATA + "One?$skip=1").json["value"] == []


def test_skip_still_works_in_link_mode(emu):
    emu.settings(nextlink="relative", max_top=50)
    rows, _ = pull_links(emu, DATA + "Customer?$skip=240&$top=50")
    assert rows == emu.rows("Customer")[240:]


def _first_link(emu, query="$top=10"):
    emu.settings(nextlink="absolute")
    return get(emu, DATA + "Customer?" + query).json["@odata.nextLink"]


def test_tampered_skiptoken_is_400(emu):
    link = _first_link(emu)
    prefix, token = link.split("$skiptoken=")
    raw = urllib.parse.unquote(token)
    assert raw.startswith("o=10;")
    forged = urllib.parse.quote(raw.replace("o=10;", "o=20;", 1), safe="")
    r = get(emu, prefix + "$skiptoken=" + forged)
    assert r.status == 400 and r.json["error"]["code"] == "InvalidSkipToken"
    assert get(emu, prefix + "$skiptoken=garbage").status == 400


def test_foreign_skiptoken_is_400(emu):
    token = _first_link(emu, "$top=10&$select=CustomerId").split("$skiptoken=")[1]
    r = get(emu, DATA + "Customer?$top=10&$skiptoken=" + token)      # other options: other query
    assert r.status == 400 and "does not belong" in r.json["error"]["message"]
    assert get(emu, DATA + "RetailPos_Transactions?$top=10&$select=CustomerId&$skiptoken=" + token).status == 400


def test_reencoded_link_is_rejected(emu):
    """A client must follow links verbatim; percent-encoding the token again breaks it."""
    prefix, token = _first_link(emu).split("$skiptoken=")
    assert get(emu, prefix + "$skiptoken=" + urllib.parse.quote(token, safe="")).status == 400
    assert get(emu, prefix + "$skiptoken=" + token).status == 200


def test_skiptoken_wins_over_skip(emu):
    prefix, token = _first_link(emu).split("$skiptoken=")
    r = get(emu, prefix + "$skip=100&$skiptoken=" + token)
    assert keys_of(r.json["value"]) == keys_of(emu.rows("Customer")[10:20])


def test_links_are_stable_across_runs(emu):
    """Tokens are signed with a fixed key: the same request gives the same link."""
    a = _first_link(emu, "$top=25")
    emu.reset()
    assert _first_link(emu, "$top=25") == a


@pytest.mark.parametrize("count,query,expected", [
    ("off", "$count=true", None), ("always", "", 250), ("always", "$filter=IsActive", "active"),
    ("request", "", None), ("request", "$count=true", 250), ("request", "$count=false", None)])
def test_count_modes(emu, count, query, expected):
    emu.settings(count=count)
    r = get(emu, DATA + "Customer?$top=3&" + query).json
    if expected == "active":
        expected = sum(1 for x in emu.rows("Customer") if x["IsActive"])
    assert r.get("@odata.count") == expected
    if expected is not None:
        assert list(r)[:3] == ["@odata.context", "@odata.count", "value"]


def test_bad_count_is_400(emu):
    assert get(emu, DATA + "Customer?$count=yes").status == 400


def test_large_generated_entity_pages_lazily(emu):
    """100,000 generated rows paged by link: every key once, in generator order."""
    import ciemu
    emu.set_entity("Big", {"entityType": "profile"}, generate={"schema": "customer", "rows": 100000, "seed": 42})
    emu.settings(nextlink="relative", max_top=5000)
    rows, responses = pull_links(emu, DATA + "Big?$top=5000&$select=CustomerId")
    gen = ciemu.CustomerGenerator(42)
    assert keys_of(rows) == [gen.key(i) for i in range(100000)]
    assert len(responses) == 20
