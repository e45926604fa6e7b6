"""Rendered data pages (State.rendered_page): a page served from the cache is byte for byte the
page rendering it again gives, and no change of rows or attributes is ever hidden by it.

Each check runs the same calls against the session emulator (cache on, the default) and
against one started with --page-cache-mb 0 (every page rendered), and compares the bodies
with each emulator's own root replaced by ROOT (links and @odata.context name it)."""

import urllib.parse

import pytest

from conftest import DATA, Emulator, call, get

ROOT = "http://ROOT"


@pytest.fixture(scope="module")
def uncached():
    emu = Emulator("--page-cache-mb", "0")
    emu.start()
    yield emu
    emu.stop()


@pytest.fixture
def plain(uncached):
    uncached.reset()
    return uncached


def body(emu, path):
    r = get(emu, path)
    assert r.status == 200, r
    return r.body.replace(emu.root.encode(), ROOT.encode())


def pull(emu, first):
    """Every body of a pull that follows nextLinks from `first`."""
    out, url = [], emu.root + first
    while url:
        r = get(emu, url)
        assert r.status == 200, r
        out.append(r.body.replace(emu.root.encode(), ROOT.encode()))
        link = r.json.get("@odata.nextLink")
        url = urllib.parse.urljoin(url, link) if link else None
    return out


PATHS = ["Customer?$top=40&$skip=0", "Customer?$top=40&$skip=200", "Customer?$top=40&$skip=250",
         "Customer", "Customer?$top=7&$orderby=CustomerId", "Customer?$top=7&$orderby=City desc",
         "Customer?$top=9&$select=CustomerId,Notes", "Customer?$top=5&$filter=IsActive",
         "Customer?$top=5&$search=an", "RetailPos_Transactions?$top=10&$skip=30",
         "UnifiedActivity?$top=15", "HighValue?$top=3"]


@pytest.mark.parametrize("settings", [{}, {"nextlink": "absolute", "count": "always"},
                                      {"numbers_as_strings": True}])
def test_cached_pages_are_the_rendered_bytes(emu, plain, settings):
    emu.settings(**settings)
    plain.settings(**settings)
    for path in PATHS:
        first = body(emu, DATA + path)
        assert body(emu, DATA + path) == first            # served from the cache
        assert first == body(plain, DATA + path), path
    assert pull(emu, DATA + "Customer?$top=33") == pull(plain, DATA + "Customer?$top=33")
    assert pull(emu, DATA + "Customer?$top=33") == pull(plain, DATA + "Customer?$top=33")


def test_a_skip_page_and_a_link_page_of_the_same_rows_share_their_value(emu):
    emu.settings(nextlink="rooted")
    by_link = pull(emu, DATA + "Customer?$top=50")
    by_skip = [body(emu, DATA + "Customer?$top=50&$skip=%d" % s) for s in range(0, 250, 50)]
    value = [b.split(b'"value":', 1)[1].rsplit(b"]", 1)[0] for b in by_link]
    assert value == [b.split(b'"value":', 1)[1].rsplit(b"]", 1)[0] for b in by_skip]


def test_control_changes_of_rows_are_served_at_once(emu, plain):
    path = DATA + "Customer?$top=20&$skip=10"
    before = body(emu, path)
    for e in (emu, plain):
        e.control("POST", "entities/Customer/rows",
                  {"mode": "replace", "generate": {"schema": "customer", "rows": 100, "seed": 9}})
    after = body(emu, path)
    assert after != before and after == body(plain, path)
    for e in (emu, plain):
        e.control("POST", "entities/Customer/rows",
                  {"mode": "append", "rows": [{"CustomerId": "c-extra", "FirstName": "Zoë"}]})
        e.control("POST", "entities/Customer/rows",
                  {"mode": "upsert", "rows": [dict(e.row("Customer", 12), LoyaltyPoints=-5)]})
    assert body(emu, path) == body(plain, path)
    assert b'"LoyaltyPoints":-5' in body(emu, path)
    last = DATA + "Customer?$top=20&$skip=90"
    assert body(emu, last) == body(plain, last) and b"c-extra" in body(emu, last)
    key = emu.row("Customer", 15)["CustomerId"]
    for e in (emu, plain):
        e.control("DELETE", "entities/Customer/rows/" + key)
    assert body(emu, path) == body(plain, path) and key.encode() not in body(emu, path)


def test_api_writes_and_attribute_changes_are_served_at_once(emu, plain):
    path = DATA + "UnifiedActivity?$top=50"
    body(emu, path)
    for e in (emu, plain):
        assert call(e, "PATCH", DATA + "UnifiedActivity/" + e.row("UnifiedActivity", 3)["ActivityId"],
                    body={"Subject": "patched here"}).status == 204
    assert b"patched here" in body(emu, path) and body(emu, path) == body(plain, path)
    page = DATA + "Customer?$top=10"
    body(emu, page)
    for e in (emu, plain):       # the same rows, one attribute fewer: the encoding changes
        e.control("POST", "entities/Customer",
                  {"attributes": [a for a in e.control("GET", "entities/Customer")["attributes"]
                                  if a["name"] != "Notes"]})
    assert b'"Notes"' not in body(emu, page) and body(emu, page) == body(plain, page)


def test_reset_and_load_start_again(emu, plain):
    path = DATA + "Customer?$top=25"
    first = body(emu, path)
    emu.control("POST", "entities/Customer/rows",
                {"mode": "replace", "generate": {"schema": "customer", "rows": 30, "seed": 3}})
    assert body(emu, path) != first
    emu.reset()
    assert body(emu, path) == first == body(plain, path)
