#!/usr/bin/python3
"""ciemu -- a local emulator of the Dynamics 365 Customer Insights Data REST API for ciflow's tests.

The real service can never be reached from a test machine, so every test and the demo of the ciflow
PostgreSQL extension talk to this program instead.  It owns part C of the contract
(shared/customer-insights-api.md) and behaves as parts A and B describe the real service:

* the Entra ID token endpoint, the API gateway (subscription keys, rate limit) and bearer checks;
* the CI endpoints E1-E10 (instances, entity metadata, OData data pages, data sources, workflows,
  segments, measures, real-time writes, bulk CSV partitions) and a Dataverse Web API flavour;
* a simulation of refresh jobs and their effects on data sources, segments and measures;
* fault injection, a request log and a control interface under /_control/ for tests;
* a deterministic data generator (splitmix64; row i is a pure function of (seed, i)).

Standard library only.  Run `ciemu.py --help` for the options, the default instance, the control
API and every decision taken where the contract is silent.
"""

import argparse
import base64
import bisect
import calendar
import collections
import hashlib
import hmac
import inspect
import itertools
import json
import os
import re
import signal
import socket
import ssl
import struct
import sys
import threading
import time
import traceback
import urllib.parse
from array import array
from decimal import Decimal, InvalidOperation
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# --------------------------------------------------------------------------------------------
# Default instance credentials (shared with tests/emulator_client.py and notes/interfaces.md)
# --------------------------------------------------------------------------------------------

TENANT = "tenant-0001"
CLIENT_ID = "ciflow-client"
CLIENT_SECRET = "ciflow-secret-value"
SCOPE = "https://api.ci.ai.microsoft.com/.default"
SUB_KEY = "key-primary-0001"
SUB_KEY2 = "key-secondary-0001"
INSTANCE_ID = "8b0c9c54-0000-0000-0000-000000000001"

CI_PREFIX = "/v1"
DV_PREFIX = "/api/data/v9.2"
TICKS = 10_000_000          # 100 ns ticks per second: .NET's 7 fractional digits
LOG_CAP = 100_000           # request log entries kept in memory
PAGE_CACHE_MB = 256         # rendered data pages kept in memory (--page-cache-mb)

# Signs $skiptoken values and /_files/ URLs.  Fixed, so that links are identical across runs
# (tests can compare them) while still being unforgeable by a client that edits them.
SIGNING_KEY = b"ciemu-signing-key-v1"


_json_str = json.encoder.encode_basestring        # the C implementation, non-ASCII kept as is


class ApiError(Exception):
    """A request the emulator answers with an error; `kind` picks the body shape."""

    def __init__(self, status, code, message, kind="apierror", headers=None):
        super().__init__(message)
        self.status, self.code, self.message, self.kind = status, code, message, kind
        self.headers = headers or []


class BadRequest(ApiError):
    """An invalid control request or scenario (400)."""

    def __init__(self, message, code="BadRequest", kind="apierror"):
        super().__init__(400, code, message, kind)


# --------------------------------------------------------------------------------------------
# Time: all timestamps are kept as integer 100 ns ticks since the Unix epoch, so 7 fractional
# digits survive exactly (a float cannot hold them).
# --------------------------------------------------------------------------------------------

_TS_RE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})(?:[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?)?"
                    r"(Z|z|[+-]\d{2}:?\d{2})?$")


def parse_ticks(text, clock=None):
    """ISO-8601 (date, or date-time with up to 9 fractional digits and Z/offset) -> ticks.

    "now" is the emulator clock's current time.  A time without a zone is taken as UTC."""
    if isinstance(text, (int, float, Decimal)) and not isinstance(text, bool):
        return int(Decimal(text) * TICKS)       # epoch seconds
    if not isinstance(text, str):
        raise ValueError("not a timestamp: %r" % (text,))
    if text == "now" and clock is not None:
        return clock.now()
    m = _TS_RE.match(text.strip())
    if not m:
        raise ValueError("not an ISO-8601 timestamp: %r" % text)
    y, mo, d, h, mi, s, frac, zone = m.groups()
    secs = calendar.timegm((int(y), int(mo), int(d), int(h or 0), int(mi or 0), int(s or 0)))
    ticks = secs * TICKS + int(((frac or "") + "0000000")[:7])
    if zone and zone not in ("Z", "z"):
        sign = -1 if zone[0] == "-" else 1
        zz = zone[1:].replace(":", "")
        ticks -= sign * (int(zz[:2]) * 3600 + int(zz[2:]) * 60) * TICKS
    return ticks


def fmt_ticks(ticks):
    """Ticks -> 'YYYY-MM-DDTHH:MM:SS.fffffffZ' (the service's 7 fractional digits)."""
    if ticks is None:
        return None
    secs, frac = divmod(int(ticks), TICKS)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + ".%07dZ" % frac


def fmt_sas_time(ticks):
    """Azure SAS times have whole seconds: 2025-03-01T03:00:00Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ticks // TICKS))


class Clock:
    """The emulator clock: real time plus an offset, or a manual clock that only moves when told.

    Token lifetimes, rate-limit windows, SAS expiry, auto_advance and every "now" use it."""

    def __init__(self, mode="real"):
        self.offset = 0
        self.frozen = None
        self.mode = "real"
        self.set_mode(mode)

    def now(self):
        if self.mode == "manual":
            return self.frozen
        return time.time_ns() // 100 + self.offset

    def set_mode(self, mode):
        if mode not in ("real", "manual"):
            raise BadRequest("clock must be real or manual")
        t = self.now()
        # Switching keeps the current emulator time continuous: no jump back, no jump forward.
        self.mode = mode
        if mode == "manual":
            self.frozen = t
        else:
            self.offset = t - time.time_ns() // 100
            self.frozen = None

    def advance(self, seconds):
        delta = int(Decimal(str(seconds)) * TICKS)
        if self.mode == "manual":
            self.frozen += delta
        else:
            self.offset += delta

    def set(self, ticks):
        if self.mode == "manual":
            self.frozen = ticks
        else:
            self.offset = ticks - time.time_ns() // 100


# --------------------------------------------------------------------------------------------
# Deterministic data generator (C.8).  splitmix64 is used rather than `random` because its
# output is fixed by arithmetic alone: the same on every run and every Python version.  Its
# finaliser is a bijection on 64-bit integers, which gives O(1) key -> row index lookups.
# --------------------------------------------------------------------------------------------

M64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15
_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB
_C1_INV = pow(_C1, -1, 1 << 64)
_C2_INV = pow(_C2, -1, 1 << 64)
_GAMMA_INV = pow(GAMMA, -1, 1 << 64)


def mix64(z):
    """splitmix64's output function."""
    z = ((z ^ (z >> 30)) * _C1) & M64
    z = ((z ^ (z >> 27)) * _C2) & M64
    return z ^ (z >> 31)


def _unxorshift(z, k):
    x = z
    for _ in range(64 // k + 1):
        x = z ^ (x >> k)
    return x


def unmix64(z):
    """Inverse of mix64."""
    z = _unxorshift(z, 31)
    z = (z * _C2_INV) & M64
    z = _unxorshift(z, 27)
    z = (z * _C1_INV) & M64
    return _unxorshift(z, 30)


_FIRST = ["James", "Mary", "Robert", "Patricia", "John", "Jennifer", "Michael", "Linda", "David",
          "Elizabeth", "William", "Barbara", "Richard", "Susan", "Joseph", "Jessica", "Thomas", "Sarah",
          "Charles", "Karen", "Corey", "Nancy", "Daniel", "Lisa", "Matthew", "Betty", "Anthony",
          "Margaret", "Mark", "Sandra", "Zoë", "José", "Chloé", "Søren", "Björn", "Ana", "Łukasz",
          "Noémie", "Hiroshi", "Priya", "Mateo", "Aisha", "Lars", "Ingrid", "Kenji", "Fatima", "Omar",
          "Leilani", "Siobhán", "Dmitri", "Ngozi", "Chen", "Élodie", "Javier", "Astrid", "Tomás",
          "Yuki", "Amara", "Rafael", "Greta", "Nikolai", "Isabella", "Ravi", "Freya"]
_LAST = ["Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez",
         "Martinez", "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson", "Thomas", "Taylor",
         "Moore", "Jackson", "Martin", "Lee", "Perez", "Thompson", "White", "Harris", "Sanchez",
         "Clark", "Ramirez", "Lewis", "Robinson", "Müller", "Schröder", "Ødegaard", "Nguyễn",
         "O'Brien", "Núñez", "Kowalski", "Dubois", "Rossi", "Yamamoto", "Svensson", "Haddad",
         "Okafor", "Papadopoulos", "Novák", "Fernández", "Van der Berg", "MacLeod", "Çelik",
         "Wójcik", "Ivanova", "Kim", "Patel", "Silva", "Jensen", "Moreau", "Bianchi", "Sato",
         "Hansen", "Costa", "Weiß", "Doe", "Tanaka", "García-Márquez"]
_CITIES = [("Seattle", "United States"), ("New York", "United States"), ("Chicago", "United States"),
           ("Austin", "United States"), ("Toronto", "Canada"), ("Montréal", "Canada"),
           ("London", "United Kingdom"), ("Manchester", "United Kingdom"), ("Paris", "France"),
           ("Lyon", "France"), ("Berlin", "Germany"), ("München", "Germany"), ("Zürich", "Switzerland"),
           ("Madrid", "Spain"), ("São Paulo", "Brazil"), ("Kraków", "Poland"), ("Reykjavík", "Iceland"),
           ("Tokyo", "Japan"), ("Sydney", "Australia"), ("Amsterdam", "Netherlands"),
           ("København", "Denmark"), ("Mumbai", "India"), ("Ciudad de México", "Mexico"),
           ("Lagos", "Nigeria")]
_DOMAINS = ["example.com", "contoso.com", "fabrikam.net", "mail.example.org", "outlook.example",
            "adatum.com", "tailspin.io", "wingtip.biz"]
_NOTES_PLAIN = ["Prefers email contact", "Loyalty tier upgraded", "Asked about delivery times",
                "Opted out of SMS", "Long-time customer", "Returned an item last year",
                "Interested in new arrivals", "Visits the downtown store"]
# The ~1 % hostile notes: commas, quotes, newlines, CRLF, tabs, backslashes, non-ASCII, emoji.
_NOTES_TRICKY = ['Said "hello, world" at the till', "Line one\nLine two", "Windows\r\nline end",
                 "Crème brûlée, naïve café, Straße", "🎉 VIP customer, \"gold\" tier 🥇",
                 "tab\tseparated, with 'single' quotes", "back\\slash and \"quote\"",
                 "日本語のメモ、カンマ付き", "Ünïcödé ✓ — em dash, ellipsis…", "a,b,c\n\"d\",e"]


def _ascii_fold(s):
    return "".join(c for c in s.lower().replace("ø", "o").replace("ł", "l").replace("ß", "ss")
                   .replace("'", "").replace(" ", "").replace("-", "")
                   .translate(str.maketrans("àáâãäåçèéêëìíîïñòóôõöùúûüýÿőǎễçğš",
                                            "aaaaaaceeeeiiiinooooouuuuyyoaecgs")) if c.isascii())


_FIRST_ASCII = [_ascii_fold(n) for n in _FIRST]
_LAST_ASCII = [_ascii_fold(n) for n in _LAST]
_NOTES = _NOTES_TRICKY + _NOTES_PLAIN
# JSON-encoded once, so that CustomerGenerator.json escapes nothing per row.
_FIRST_JSON = [_json_str(n) for n in _FIRST]
_LAST_JSON = [_json_str(n) for n in _LAST]
_CITIES_JSON = [(_json_str(c), _json_str(k)) for c, k in _CITIES]
_NOTES_JSON = [_json_str(n) for n in _NOTES]
_EPOCH_1940 = calendar.timegm((1940, 1, 1, 0, 0, 0)) // 86400
_EPOCH_2018 = calendar.timegm((2018, 1, 1, 0, 0, 0))
_BIRTH_DAYS = 25567          # 1940-01-01 .. 2009-12-31
_CREATED_SPAN = 6 * 365 * 86400
_DAY_CACHE = {}


def _day_str(day_number):
    """Days since 1970-01-01 -> 'YYYY-MM-DD', memoised (the generator formats ~2 dates per row)."""
    s = _DAY_CACHE.get(day_number)
    if s is None:
        s = _DAY_CACHE[day_number] = time.strftime("%Y-%m-%d", time.gmtime(day_number * 86400))
    return s


_TIME_OF_DAY = ["%02d:%02d:%02d" % (s // 3600, s // 60 % 60, s % 60) for s in range(86400)]


def _stamp(secs, micros):
    """Epoch seconds + microseconds -> 7-digit timestamp (µs precision, as a lake stores it)."""
    day, rem = divmod(secs, 86400)
    return "%sT%s.%06d0Z" % (_DAY_CACHE.get(day) or _day_str(day), _TIME_OF_DAY[rem], micros)


class CustomerGenerator:
    """The `customer` schema: row i is a pure function of (seed, i); rows are made on demand.

    The first 64 bits of CustomerId are mix64(base + (i+1)*GAMMA), a bijection of i, so a key
    can be mapped back to its index without any table (see index_of)."""

    SCHEMA = "customer"
    KEY = "CustomerId"
    ATTRIBUTES = [("CustomerId", "Edm.String"), ("FirstName", "Edm.String"),
                  ("LastName", "Edm.String"), ("FullName", "Edm.String"), ("Email", "Edm.String"),
                  ("City", "Edm.String"), ("Country", "Edm.String"), ("PostalCode", "Edm.String"),
                  ("BirthDate", "Edm.Date"), ("CreatedOn", "Edm.DateTimeOffset"),
                  ("LastPurchaseOn", "Edm.DateTimeOffset"), ("LoyaltyPoints", "Edm.Int32"),
                  ("PurchaseCount", "Edm.Int64"), ("LifetimeValue", "Edm.Decimal"),
                  ("ChurnScore", "Edm.Double"), ("IsActive", "Edm.Boolean"),
                  ("ExternalRef", "Edm.Guid"), ("Notes", "Edm.String")]
    NAMES = [n for n, _ in ATTRIBUTES]
    SEARCHABLE = ("CustomerId", "FirstName", "LastName", "FullName", "Email", "City", "Country")

    def __init__(self, seed):
        self.seed = int(seed) & M64
        self.base = mix64(self.seed ^ 0x6369656D75)     # "ciemu": seed 0 still mixes well

    def key_bits(self, i):
        h1 = mix64((self.base + (i + 1) * GAMMA) & M64)
        return h1, mix64((h1 + GAMMA) & M64)

    def key(self, i):
        h1, h2 = self.key_bits(i)
        return "%016x%016x" % (h1, h2)

    def key_sort_value(self, i):
        """An int that orders like the 32-hex key string (equal length, lower-case hex)."""
        h1, h2 = self.key_bits(i)
        return (h1 << 64) | h2

    def index_of(self, key, n):
        """Row index whose key is `key`, or None; O(1) thanks to the invertible mix."""
        if not isinstance(key, str) or len(key) != 32:
            return None
        try:
            h1 = int(key[:16], 16)
        except ValueError:
            return None
        i = ((((unmix64(h1) - self.base) & M64) * _GAMMA_INV) - 1) & M64
        if i < n and self.key(i) == key:
            return i
        return None

    def values(self, i, M64=M64, GAMMA=GAMMA, _C1=_C1, _C2=_C2):          # constants as locals: hot path
        """Row i as (CustomerId, first name index, last name index, city index, Email,
        PostalCode, BirthDate, CreatedOn, LastPurchaseOn, LoyaltyPoints, PurchaseCount,
        LifetimeValue in cents, ChurnScore in 1/10000, IsActive, ExternalRef, note index or -1):
        row() and json() render it as a dict or as JSON text."""
        h1 = mix64((self.base + (i + 1) * GAMMA) & M64)
        # Eight splitmix64 steps from state h1, unrolled: this is the generator's hot path.
        s = (h1 + GAMMA) & M64
        z = ((s ^ (s >> 30)) * _C1) & M64
        z = ((z ^ (z >> 27)) * _C2) & M64
        h2 = z ^ (z >> 31)
        s = (s + GAMMA) & M64
        z = ((s ^ (s >> 30)) * _C1) & M64
        z = ((z ^ (z >> 27)) * _C2) & M64
        r1 = z ^ (z >> 31)
        s = (s + GAMMA) & M64
        z = ((s ^ (s >> 30)) * _C1) & M64
        z = ((z ^ (z >> 27)) * _C2) & M64
        r2 = z ^ (z >> 31)
        s = (s + GAMMA) & M64
        z = ((s ^ (s >> 30)) * _C1) & M64
        z = ((z ^ (z >> 27)) * _C2) & M64
        r3 = z ^ (z >> 31)
        s = (s + GAMMA) & M64
        z = ((s ^ (s >> 30)) * _C1) & M64
        z = ((z ^ (z >> 27)) * _C2) & M64
        r4 = z ^ (z >> 31)
        s = (s + GAMMA) & M64
        z = ((s ^ (s >> 30)) * _C1) & M64
        z = ((z ^ (z >> 27)) * _C2) & M64
        r5 = z ^ (z >> 31)
        s = (s + GAMMA) & M64
        z = ((s ^ (s >> 30)) * _C1) & M64
        z = ((z ^ (z >> 27)) * _C2) & M64
        r6 = z ^ (z >> 31)
        s = (s + GAMMA) & M64
        z = ((s ^ (s >> 30)) * _C1) & M64
        z = ((z ^ (z >> 27)) * _C2) & M64
        r7 = z ^ (z >> 31)
        fi = (r1 & 0xFFFF) % len(_FIRST)
        li = ((r1 >> 16) & 0xFFFF) % len(_LAST)
        ci = ((r1 >> 32) & 0xFFFF) % len(_CITIES)
        email = None
        if ((r1 >> 48) & 0x3FF) >= 51:                                   # 5 % null
            email = "%s.%s%d@%s" % (_FIRST_ASCII[fi], _LAST_ASCII[li], (r2 >> 40) % 1000,
                                    _DOMAINS[(r2 >> 58) & 7])
        birth = None
        if ((r2 >> 20) & 0x3FF) >= 31:                                   # 3 % null
            day = _EPOCH_1940 + (r2 >> 30) % _BIRTH_DAYS
            birth = _DAY_CACHE.get(day) or _day_str(day)
        created_s = _EPOCH_2018 + r3 % _CREATED_SPAN
        created = _stamp(created_s, (r3 >> 32) % 1_000_000)
        last_purchase = None
        if ((r3 >> 52) & 0x3FF) >= 102:                                  # 10 % null
            last_purchase = _stamp(created_s + r4 % (400 * 86400), (r4 >> 32) % 1_000_000)
        if ((r5 >> 17) & 0x3FF) < 20:                                    # ~2 % beyond 2^53
            purchases = (1 << 53) + ((r5 >> 27) & ((1 << 37) - 1))
        else:
            purchases = (r5 >> 27) % 1000
        cents = r6 % 6_000_000
        note_sel = (r6 >> 47) & 0x3FF
        if note_sel < 10:                                                # ~1 % hostile
            note = (r6 >> 57) % len(_NOTES_TRICKY)
        elif note_sel < 310:
            note = -1
        else:
            note = len(_NOTES_TRICKY) + (r6 >> 57) % len(_NOTES_PLAIN)
        return ("%016x%016x" % (h1, h2), fi, li, ci, email, "%05d" % (r2 % 100000), birth, created,
                last_purchase, r5 % 100001, purchases, cents, (r6 >> 23) % 10000,
                ((r6 >> 37) & 0x3FF) < 820,
                "%08x-%04x-4%03x-%x%03x-%012x" % (
                    r7 >> 32, (r7 >> 16) & 0xFFFF, r7 & 0xFFF, 8 | (h2 >> 62), (h2 >> 48) & 0xFFF,
                    (r4 >> 8) & 0xFFFFFFFFFFFF),
                note)

    def row(self, i):
        (cid, fi, li, ci, email, postal, birth, created, lastp, loyalty, purchases, cents, churn,
         active, ext, note) = self.values(i)
        first, last = _FIRST[fi], _LAST[li]
        city, country = _CITIES[ci]
        return {"CustomerId": cid, "FirstName": first, "LastName": last, "FullName": first + " " + last,
                "Email": email, "City": city, "Country": country, "PostalCode": postal,
                "BirthDate": birth, "CreatedOn": created, "LastPurchaseOn": lastp,
                "LoyaltyPoints": loyalty, "PurchaseCount": purchases,
                "LifetimeValue": Decimal(cents).scaleb(-2), "ChurnScore": churn / 10000,
                "IsActive": active, "ExternalRef": ext, "Notes": _NOTES[note] if note >= 0 else None}

    _JSON = ('{"CustomerId":"%s","FirstName":%s,"LastName":%s,"FullName":%s,"Email":%s,"City":%s,'
             '"Country":%s,"PostalCode":"%s","BirthDate":%s,"CreatedOn":"%s","LastPurchaseOn":%s,'
             '"LoyaltyPoints":%d,"PurchaseCount":%d,"LifetimeValue":%d.%02d,"ChurnScore":%r,'
             '"IsActive":%s,"ExternalRef":"%s","Notes":%s}')

    def json(self, i):
        """Row i as the same JSON text RowEncoder makes from row(i), without the dict: the
        fast path for whole rows (pages without $select, NDJSON, hashes)."""
        (cid, fi, li, ci, email, postal, birth, created, lastp, loyalty, purchases, cents, churn,
         active, ext, note) = self.values(i)
        first, last = _FIRST_JSON[fi], _LAST_JSON[li]
        city, country = _CITIES_JSON[ci]
        return self._JSON % (
            cid, first, last, first[:-1] + " " + last[1:], "null" if email is None else '"%s"' % email,
            city, country, postal, "null" if birth is None else '"%s"' % birth, created,
            "null" if lastp is None else '"%s"' % lastp, loyalty, purchases, cents // 100, cents % 100,
            churn / 10000, "true" if active else "false", ext, _NOTES_JSON[note] if note >= 0 else "null")


GENERATORS = {"customer": CustomerGenerator}


def make_generator(spec):
    """A generator spec {"schema": "customer", "rows": N, "seed": S, "start": K} -> (gen, start, n)."""
    if not isinstance(spec, dict):
        raise BadRequest("generate must be an object")
    schema = spec.get("schema", "customer")
    if schema not in GENERATORS:
        raise BadRequest("unknown generator schema %r (known: %s)" % (schema, ", ".join(GENERATORS)))
    try:
        n, seed, start = int(spec.get("rows", 0)), int(spec.get("seed", 1)), int(spec.get("start", 0))
    except (TypeError, ValueError):
        raise BadRequest("generate.rows/seed/start must be integers") from None
    if n < 0 or start < 0:
        raise BadRequest("generate.rows and generate.start must be >= 0")
    return GENERATORS[schema](seed), start, n


# --------------------------------------------------------------------------------------------
# Values, rows and entities
# --------------------------------------------------------------------------------------------

INT_TYPES = {"Edm.Int16", "Edm.Int32", "Edm.Int64", "Edm.Byte", "Edm.SByte"}
FLOAT_TYPES = {"Edm.Double", "Edm.Single"}
NUMERIC_TYPES = INT_TYPES | FLOAT_TYPES | {"Edm.Decimal"}
EDM_TYPES = NUMERIC_TYPES | {"Edm.String", "Edm.Boolean", "Edm.Date", "Edm.DateTimeOffset",
                             "Edm.TimeOfDay", "Edm.Guid", "Edm.Binary"}


def coerce_value(value, dtype):
    """A JSON value from a scenario, control call or E10 write -> the stored value.

    Deliberately lenient: only natural conversions are made (numbers of an Edm.Decimal column
    become exact Decimals, of a Double column floats).  Anything else is stored as given, so a
    test can make the emulator serve values that do not fit their declared type."""
    if value is None or isinstance(value, bool):
        return value
    if dtype == "Edm.Decimal" and isinstance(value, (int, Decimal)):
        return Decimal(value)
    if dtype in FLOAT_TYPES and isinstance(value, Decimal):
        return float(value)
    if dtype in INT_TYPES and isinstance(value, Decimal) and value == value.to_integral_value() \
            and "." not in str(value) and "E" not in str(value).upper():
        return int(value)
    return value


class ListPart:
    """Literal rows (inline, NDJSON or written through control/E10)."""

    def __init__(self, rows):
        self.rows = rows
        self._index = {}

    def __len__(self):
        return len(self.rows)

    def row(self, i):
        return dict(self.rows[i])

    def index_of(self, attr, value):
        idx = self._index.get(attr)
        if idx is None:
            idx = {}
            for i, r in enumerate(self.rows):
                v = r.get(attr)
                try:
                    idx.setdefault(v, i)
                except TypeError:        # an unhashable (jsonb) value can never be a key
                    pass
            self._index[attr] = idx
        try:
            return idx.get(value)
        except TypeError:
            return None


class GenPart:
    """`n` generated rows starting at generator index `start`; nothing is stored."""

    def __init__(self, gen, start, n):
        self.gen, self.start, self.n = gen, start, n

    def __len__(self):
        return self.n

    def row(self, i):
        return self.gen.row(self.start + i)

    def index_of(self, attr, value):
        if attr == self.gen.KEY:
            j = self.gen.index_of(value, self.start + self.n)
            return None if j is None or j < self.start else j - self.start
        return next((i for i in range(self.n) if self.row(i).get(attr) == value), None)


_versions = itertools.count(1)
_change_numbers = itertools.count(1)


class RowSet:
    """An immutable sequence of rows: parts in order plus per-index overrides (E10 updates).

    Every change makes a new RowSet with a new version, so a reader that took a reference under
    the state lock can page through it, sort it or hash it without holding the lock."""

    def __init__(self, parts=(), overrides=None):
        self.parts = tuple(parts)
        self.overrides = overrides or {}
        self.starts = []
        n = 0
        for p in self.parts:
            self.starts.append(n)
            n += len(p)
        self.n = n
        self.version = next(_versions)

    def __len__(self):
        return self.n

    def _locate(self, i):
        k = bisect.bisect_right(self.starts, i) - 1
        return self.parts[k], i - self.starts[k]

    def row(self, i):
        if i < 0 or i >= self.n:
            raise IndexError(i)
        o = self.overrides.get(i)
        if o is not None:
            return dict(o)
        part, j = self._locate(i)
        return part.row(j)

    def rows(self, start, stop):
        """Rows start..stop-1, generated lazily."""
        for i in range(max(0, start), min(stop, self.n)):
            yield self.row(i)

    def row_json(self, i, enc):
        """Row i as JSON text; generated rows skip the dict (see CustomerGenerator.json)."""
        o = self.overrides.get(i)
        if o is not None:
            return enc.encode(o)
        part, j = self._locate(i)
        if isinstance(part, GenPart):
            if enc.takes_generated_json(part.gen):
                return part.gen.json(part.start + j)
            return enc.encode(part.row(j))
        return enc.encode(part.rows[j])

    def rows_json(self, start, stop, enc):
        """Rows start..stop-1 as JSON texts, part by part: the hot path of whole-row pages."""
        out = []
        for pstart, part in zip(self.starts, self.parts):
            a, b = max(start, pstart), min(stop, pstart + len(part))
            if a >= b:
                continue
            if isinstance(part, GenPart) and enc.takes_generated_json(part.gen):
                js, off = part.gen.json, part.start - pstart
                out.extend([js(i + off) for i in range(a, b)])
            elif isinstance(part, GenPart):
                out.extend([enc.encode(part.row(i - pstart)) for i in range(a, b)])
            else:
                out.extend([enc.encode(part.rows[i - pstart]) for i in range(a, b)])
        for i, row in self.overrides.items():
            if start <= i < stop:
                out[i - max(0, start)] = enc.encode(row)
        return out

    def index_of(self, attr, value):
        for start, part in zip(self.starts, self.parts):
            j = part.index_of(attr, value)
            if j is not None:
                return start + j
        return None

    def all_generated(self):
        return all(isinstance(p, GenPart) for p in self.parts)

    def with_override(self, i, row):
        o = dict(self.overrides)
        o[i] = row
        return RowSet(self.parts, o)

    def appended(self, part):
        return RowSet(self.parts + (part,), self.overrides)


class Entity:
    """One entity (table): metadata as E2 reports it, and its rows."""

    def __init__(self, name, attributes, keys, entity_type, data_source=None, incremental=None,
                 refresh_time=None, entity_set=None, rows=None, segment=None):
        self.name = name
        self.attributes = attributes            # [{"name", "dataType", "searchProperties"}]
        self.types = {a["name"]: a["dataType"] for a in attributes}
        self.keys = keys                        # [[attr, ...], ...]; first = primary key
        self.entity_type = entity_type
        self.data_source = data_source
        self.incremental = incremental
        self.refresh_time = refresh_time        # ticks
        self.entity_set = entity_set or name.lower()
        self.rows = rows if rows is not None else RowSet()
        self.segment = segment                  # name of the segment whose members these are
        self.change_tracking = True             # dataverse: odata.track-changes is honoured
        self.base_entity = None                 # $metadata: the entity whose type this one derives from
        self.reset_tracking()

    # Change tracking (dataverse delta links): every row change after the floor is recorded
    # as (change number, "upsert"|"delete", key).  A delta token older than the floor has
    # expired: the client must pull everything again.
    def reset_tracking(self):
        self.changes = []
        self.tracking_floor = next(_change_numbers)

    def track(self, op, key):
        self.changes.append((next(_change_numbers), op, key))

    @property
    def key_attr(self):
        return self.keys[0][0] if self.keys and len(self.keys[0]) == 1 else None

    @property
    def is_source(self):
        return self.data_source is not None


def normalize_attributes(attrs):
    """Attributes from a scenario: strings ("Name") or (name, type) or objects -> objects."""
    out = []
    for a in attrs or []:
        if isinstance(a, str):
            a = {"name": a, "dataType": "Edm.String"}
        elif isinstance(a, (list, tuple)):
            a = {"name": a[0], "dataType": a[1]}
        if not isinstance(a, dict) or not isinstance(a.get("name"), str):
            raise BadRequest("an attribute needs a name: %r" % (a,))
        attr = {"name": a["name"], "dataType": a.get("dataType", "Edm.String"),
                "searchProperties": a.get("searchProperties")}
        if "nullable" in a:                 # only $metadata shows it (Nullable="false")
            attr["nullable"] = bool(a["nullable"])
        out.append(attr)
    return out


def normalize_keys(keys):
    """Keys as ["A"], [["A","B"]] or [[{"name":"A"}]] -> [["A"], ...]."""
    out = []
    for k in keys or []:
        if isinstance(k, (str, dict)):
            k = [k]
        out.append([x["name"] if isinstance(x, dict) else x for x in k])
    return out


# --------------------------------------------------------------------------------------------
# JSON and CSV encoding.  The json module cannot emit a Decimal as a bare number, so Decimals
# are turned into marked strings and the marks are removed from the encoded text with one regex
# per response; the C encoder still does all the work.
# --------------------------------------------------------------------------------------------

_NUM_MARK = "\x00ciemu-num:"
_NUM_RE = re.compile(r'"\\u0000ciemu-num:([^"]*)"')


def dumps(obj):
    """Compact UTF-8 JSON text; Decimals (already marked) become exact JSON numbers."""
    s = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return _NUM_RE.sub(r"\1", s) if "ciemu-num:" in s else s


def mark_decimals(obj):
    """Deep copy of a small structure with Decimals marked (for scenarios, state, control)."""
    if isinstance(obj, Decimal):
        return _NUM_MARK + str(obj)
    if isinstance(obj, dict):
        return {k: mark_decimals(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [mark_decimals(v) for v in obj]
    return obj


def to_bytes(text):
    # surrogatepass: a scenario may hold a lone surrogate on purpose; serve it rather than crash.
    return text.encode("utf-8", "surrogatepass")




def _json_other(v):
    return dumps(mark_decimals(v))


# Type -> encoder; a dict lookup beats a chain of isinstance tests on the hot path.
_JSON_BY_TYPE = {str: _json_str, type(None): lambda v: "null", bool: lambda v: "true" if v else "false",
                 int: int.__repr__, float: float.__repr__, Decimal: Decimal.__str__}


def json_value(v, as_string=False):
    """One stored value as JSON text.  Hand-rolled rather than json.dumps per row: it is about
    twice as fast, and it writes a Decimal as the exact number it is."""
    if as_string and type(v) in (int, Decimal):
        return '"%s"' % v
    return _JSON_BY_TYPE.get(type(v), _json_other)(v)


class RowEncoder:
    """Encodes an entity's rows as JSON objects.  With numbers_as_strings, Edm.Int64 and
    Edm.Decimal values become strings (OData's IEEE754Compatible=true form)."""

    def __init__(self, entity, as_strings):
        self.stringify = {n for n, t in entity.types.items()
                          if as_strings and t in ("Edm.Int64", "Edm.Decimal")}
        self.keys = {n: _json_str(n) + ":" for n in entity.types}
        self.fields = list(self.keys.items())
        self.names = list(entity.types)

    def takes_generated_json(self, gen):
        """Whether gen.json() writes exactly what encode(gen.row()) would for this entity."""
        return not self.stringify and self.names == gen.NAMES

    def encode(self, row, names=None, extra=()):
        """The entity's attributes in order (a row's other keys are not served; a missing one is
        null).  `names` picks and orders attributes ($select); `extra` adds (name, JSON) pairs."""
        by_type, other = _JSON_BY_TYPE, _json_other
        if names is None and not self.stringify:
            get = row.get
            parts = [k + by_type.get(type(v), other)(v) for n, k in self.fields for v in (get(n),)]
        else:
            keys, strs = self.keys, self.stringify
            parts = [(keys.get(n) or _json_str(n) + ":") + json_value(row.get(n), n in strs)
                     for n in (self.names if names is None else names)]
        if extra:
            parts.extend(_json_str(k) + ":" + v for k, v in extra)
        return "{" + ",".join(parts) + "}"



def csv_field(v):
    """RFC 4180 field: null -> empty, "" -> "", quoted only when needed."""
    if v is None:
        return ""
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, (dict, list)):
        v = dumps(mark_decimals(v))
    elif not isinstance(v, str):
        return str(v)
    if v == "" or any(c in v for c in ',"\r\n'):
        return '"' + v.replace('"', '""') + '"'
    return v


def csv_line(row, names):
    return ",".join(csv_field(row.get(n)) for n in names) + "\r\n"


# --------------------------------------------------------------------------------------------
# $filter: a tokenizer and recursive-descent parser for the documented subset
#   expr := and ("or" and)* ; and := unary ("and" unary)* ; unary := "not" unary | primary
#   primary := "(" expr ")" | operand [cmpop operand | "in" "(" literal ("," literal)* ")"]
#   operand := attribute | literal | IsMemberOfSegment('name')
# Everything else is a 400, like an OData service that does not support it.
# --------------------------------------------------------------------------------------------

_FILTER_TOKEN = re.compile(r"""
   (?P<ws>\s+)
 | (?P<str>'(?:[^']|'')*')
 | (?P<dt>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?(?:Z|[+-]\d{2}:\d{2}))
 | (?P<guid>[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}(?![\w-]))
 | (?P<date>\d{4}-\d{2}-\d{2}(?![\w:]))
 | (?P<num>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?![\w.]))
 | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
 | (?P<punct>[(),])
""", re.X)
_CMP_OPS = {"eq", "ne", "gt", "ge", "lt", "le"}
_OP_KIND = {"eq": "Equal", "ne": "NotEqual", "gt": "GreaterThan", "ge": "GreaterThanOrEqual",
            "lt": "LessThan", "le": "LessThanOrEqual"}


def odata_bad_request(message):
    return ApiError(400, "BadRequest", message, "odata")


def tokenize_filter(text):
    pos, out = 0, []
    while pos < len(text):
        m = _FILTER_TOKEN.match(text, pos)
        if not m:
            raise odata_bad_request("Syntax error at position %d in '%s'." % (pos, text))
        kind = m.lastgroup
        if kind != "ws":
            out.append((kind, m.group(), pos))
        pos = m.end()
    out.append(("end", "", pos))
    return out


class FilterParser:
    """Builds an AST of tuples: ("or"|"and", a, b), ("not", a), ("cmp", op, l, r),
    ("in", operand, [literal...]), ("bool", operand); operands ("attr", name),
    ("lit", kind, value), ("member", segment)."""

    def __init__(self, text):
        self.text = text
        self.toks = tokenize_filter(text)
        self.i = 0

    def peek(self):
        return self.toks[self.i]

    def take(self):
        t = self.toks[self.i]
        self.i += 1
        return t

    def error(self, tok, what="Syntax error"):
        return odata_bad_request("%s at position %d in '%s'." % (what, tok[2], self.text))

    def is_word(self, tok, word):
        return tok[0] == "name" and tok[1] == word

    def expect_punct(self, p):
        t = self.take()
        if t != ("punct", p, t[2]):
            raise self.error(t, "')' or ',' expected" if p != "(" else "'(' expected")

    def parse(self):
        if self.peek()[0] == "end":
            raise odata_bad_request("The $filter expression is empty.")
        node = self.expr()
        if self.peek()[0] != "end":
            raise self.error(self.peek())
        return node

    def expr(self):
        node = self.conj()
        while self.is_word(self.peek(), "or"):
            self.take()
            node = ("or", node, self.conj())
        return node

    def conj(self):
        node = self.unary()
        while self.is_word(self.peek(), "and"):
            self.take()
            node = ("and", node, self.unary())
        return node

    def unary(self):
        if self.is_word(self.peek(), "not"):
            self.take()
            return ("not", self.unary())
        return self.primary()

    def primary(self):
        t = self.peek()
        if t[0] == "punct" and t[1] == "(":
            self.take()
            node = self.expr()
            self.expect_punct(")")
            return node
        left = self.operand()
        t = self.peek()
        if t[0] == "name" and t[1] in _CMP_OPS:
            self.take()
            return ("cmp", t[1], left, self.operand())
        if self.is_word(t, "in"):
            self.take()
            self.expect_punct("(")
            items = [self.literal()]
            while self.peek()[:2] == ("punct", ","):
                self.take()
                items.append(self.literal())
            self.expect_punct(")")
            return ("in", left, items)
        return ("bool", left)

    def literal(self):
        t = self.peek()
        node = self.operand()
        if node[0] != "lit":
            raise self.error(t, "Literal expected")
        return node

    def operand(self):
        t = self.take()
        kind, text = t[0], t[1]
        if kind == "str":
            return ("lit", "string", text[1:-1].replace("''", "'"))
        if kind == "num":
            try:
                v = int(text) if re.fullmatch(r"-?\d+", text) else Decimal(text)
            except InvalidOperation:
                raise self.error(t) from None
            return ("lit", "number", v)
        if kind == "dt":
            try:
                return ("lit", "datetime", parse_ticks(text))
            except ValueError:
                raise self.error(t, "Invalid date-time literal") from None
        if kind == "date":
            return ("lit", "date", text)
        if kind == "guid":
            return ("lit", "guid", text.lower())
        if kind == "name":
            if text in ("true", "false"):
                return ("lit", "bool", text == "true")
            if text == "null":
                return ("lit", "null", None)
            if text in _CMP_OPS or text in ("and", "or", "not", "in"):
                raise self.error(t)
            if self.peek()[:2] == ("punct", "("):
                if text.lower() != "ismemberofsegment":
                    raise odata_bad_request("Unknown function '%s' in $filter; only "
                                            "IsMemberOfSegment is supported." % text)
                self.take()
                arg = self.literal()
                self.expect_punct(")")
                if arg[1] != "string":
                    raise odata_bad_request("IsMemberOfSegment takes a segment name in quotes.")
                return ("member", arg[2])
            return ("attr", text)
        raise self.error(t)


# Literal kind -> the attribute types it may be compared with.
_LIT_FAMILY = {"string": {"Edm.String", "Edm.Guid", "Edm.TimeOfDay", "Edm.Binary"},
               "guid": {"Edm.Guid"}, "number": NUMERIC_TYPES, "bool": {"Edm.Boolean"},
               "date": {"Edm.Date"}, "datetime": {"Edm.DateTimeOffset"}}
_FAMILY_OF = {}
for _fam, _types in (("string", {"Edm.String", "Edm.TimeOfDay", "Edm.Binary"}),
                     ("guid", {"Edm.Guid"}), ("number", NUMERIC_TYPES),
                     ("bool", {"Edm.Boolean"}), ("date", {"Edm.Date"}),
                     ("datetime", {"Edm.DateTimeOffset"})):
    for _t in _types:
        _FAMILY_OF[_t] = _fam


def _comparable(dtype):
    """A function mapping a stored value of `dtype` into a domain Python can compare exactly;
    values that do not fit the type become None (they then match nothing but `eq null`'s
    negation)."""
    if dtype == "Edm.DateTimeOffset":
        def conv(v):
            try:
                return parse_ticks(v) if isinstance(v, str) else None
            except ValueError:
                return None
        return conv
    if dtype == "Edm.Guid":
        return lambda v: v.lower() if isinstance(v, str) else None
    if dtype in NUMERIC_TYPES:
        return lambda v: v if isinstance(v, (int, float, Decimal)) and not isinstance(v, bool) else None
    if dtype == "Edm.Boolean":
        return lambda v: v if isinstance(v, bool) else None
    return lambda v: v if isinstance(v, str) else None


class CompiledFilter:
    """A $filter compiled against an entity: `match(row)` and, when the whole expression is
    `Key eq 'x'` or `Key in (...)`, `key_values` for an O(1) lookup."""

    def __init__(self, text, entity, segment_members):
        self.entity = entity
        self.segment_members = segment_members      # name -> set of profile keys, or KeyError
        ast = FilterParser(text).parse()
        self.key_values = self._key_lookup(ast)
        self.match = self._compile(ast)

    def _key_lookup(self, ast):
        key = self.entity.key_attr
        if key is None:
            return None
        if ast[0] == "cmp" and ast[1] == "eq":
            l, r = ast[2], ast[3]
            if r[0] == "attr":
                l, r = r, l
            if l == ("attr", key) and r[0] == "lit" and r[1] == "string":
                return [r[2]]
        if ast[0] == "in" and ast[1] == ("attr", key) and all(x[1] == "string" for x in ast[2]):
            return [x[2] for x in ast[2]]
        return None

    def _operand(self, node, other_type=None):
        """-> (getter(row), family, edm type or None); `other_type` is the type of the attribute
        on the other side of a comparison, if any."""
        if node[0] == "attr":
            name = node[1]
            dtype = self.entity.types.get(name)
            if dtype is None:
                raise odata_bad_request("Could not find a property named '%s' on type '%s'."
                                        % (name, self.entity.name))
            conv = _comparable(dtype)
            return (lambda row: conv(row.get(name))), _FAMILY_OF.get(dtype, "other"), dtype
        if node[0] == "lit":
            value = node[2]
            if node[1] == "string" and other_type == "Edm.Guid":
                value = value.lower()           # GUIDs compare case-insensitively
            return (lambda row: value), node[1], None
        raise odata_bad_request("IsMemberOfSegment cannot be compared; use it as a condition.")

    def _check_types(self, lf, lt, rf, rt, op):
        if "null" in (lf, rf):
            return
        ok = lf == rf or (lt is None and lf in ("string", "guid") and rf == "guid") \
            or (rt is None and rf in ("string", "guid") and lf == "guid")
        if not ok or "other" in (lf, rf):
            raise odata_bad_request(
                "A binary operator with incompatible types was detected. Found operand types "
                "'%s' and '%s' for operator kind '%s'." % (lt or lf, rt or rf, _OP_KIND.get(op, op)))

    def _compile(self, node):
        kind = node[0]
        if kind in ("or", "and"):
            a, b = self._compile(node[1]), self._compile(node[2])
            return (lambda r: a(r) or b(r)) if kind == "or" else (lambda r: a(r) and b(r))
        if kind == "not":
            a = self._compile(node[1])
            return lambda r: not a(r)
        if kind == "cmp":
            op = node[1]
            ltype = self.entity.types.get(node[2][1]) if node[2][0] == "attr" else None
            rtype = self.entity.types.get(node[3][1]) if node[3][0] == "attr" else None
            lg, lf, lt = self._operand(node[2], rtype)
            rg, rf, rt = self._operand(node[3], ltype)
            self._check_types(lf, lt, rf, rt, op)
            return self._comparison(op, lg, rg)
        if kind == "in":
            g, fam, dtype = self._operand(node[1])
            values = set()
            for lit in node[2]:
                self._check_types(fam, dtype, lit[1], None, "In")
                values.add(lit[2].lower() if dtype == "Edm.Guid" and lit[1] == "string" else lit[2])
            return lambda r: g(r) in values
        operand = node[1]                               # "bool"
        if operand[0] == "member":
            return self._membership(operand[1])
        g, fam, dtype = self._operand(operand)
        if fam != "bool":
            raise odata_bad_request("The $filter expression must evaluate to a boolean.")
        return lambda r: g(r) is True

    @staticmethod
    def _comparison(op, lg, rg):
        if op == "eq":
            return lambda r: lg(r) == rg(r)
        if op == "ne":
            return lambda r: lg(r) != rg(r)
        cmp = {"gt": lambda a, b: a > b, "ge": lambda a, b: a >= b,
               "lt": lambda a, b: a < b, "le": lambda a, b: a <= b}[op]

        def ordered(r):
            a, b = lg(r), rg(r)
            if a is None or b is None:
                return False
            try:
                return cmp(a, b)
            except TypeError:
                return False
        return ordered

    def _membership(self, segment):
        key = self.entity.key_attr
        if key is None or self.entity.entity_type != "profile":
            raise odata_bad_request("IsMemberOfSegment is only supported on profile entities.")
        try:
            members = self.segment_members(segment)
        except KeyError:
            raise odata_bad_request("Segment '%s' was not found." % segment) from None
        return lambda r: r.get(key) in members


# --------------------------------------------------------------------------------------------
# Enums.  Stored in the contract's spelling ("spec"); the enum_case setting changes only how
# they are written.  Inputs are matched case-insensitively; unknown values are kept verbatim so
# a test can make the emulator report a status ciflow has never seen.
# --------------------------------------------------------------------------------------------

JOB_STATUSES = ["queued", "needsUpdate", "running", "successful", "failed", "timedOut", "aborted",
                "skipped", "deleted"]
TERMINAL = {"successful", "failed", "timedOut", "aborted", "skipped", "deleted"}
REFRESH_STATES = ["notUpdated", "updated", "updating", "updateFailed", "updateCancelled"]
SEGMENT_STATES = ["inactive", "active", "validating", "validated", "invalid", "validationError"]
SEGMENT_JOB = ["None", "Queued", "Running", "CompletedSuccess", "CompletedFailure", "Cancelled",
               "Interrupted", "NotQualified"]
MEASURE_STATES = ["none", "running", "failed", "completed"]
OPERATIONS = ["all", "ingestion", "map", "match", "merge", "segmentation", "measures",
              "enrichment", "export", "search", "intelligence", "activity"]
SUBMISSION_KINDS = ["onDemand", "scheduled"]
JOB_TYPES = ["full", "incremental"]
UNIFICATION = ["map", "match", "merge"]


def canon(value, choices):
    if not isinstance(value, str):
        return value
    low = value.lower()
    for c in choices:
        if c.lower() == low:
            return c
    return value


def guid_from(*parts):
    """A stable GUID-shaped id from its parts (jobs, tasks, data sources made at run time)."""
    h = hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()
    return "%s-%s-4%s-8%s-%s" % (h[:8], h[8:12], h[13:16], h[17:20], h[20:32])


class Job:
    """A workflow job and its tasks; see Instance.step_job for the state machine."""

    def __init__(self, job_id, operation, kind, job_type, submitted, tasks, plan=None,
                 status="queued", end=None, identifiers=None):
        self.id = job_id
        self.operation = operation
        self.kind = kind
        self.job_type = job_type
        self.submitted = submitted
        self.tasks = tasks              # dicts: taskId, operationType, identifier, taskStatus, end, ciErrors
        self.plan = plan or {}
        self.status = status
        self.end = end
        self.identifiers = identifiers
        self.next_step_at = None
        self.seq = 0

    @property
    def active(self):
        return self.status not in TERMINAL

    def planned_status(self, task):
        """The status a task will end with: plan keys "op:identifier", identifier or op."""
        for k in ("%s:%s" % (task["operationType"], task["identifier"]), task["identifier"],
                  task["operationType"]):
            if k in self.plan:
                return canon(self.plan[k], JOB_STATUSES)
        return "successful"


class Instance:
    """One Customer Insights instance: entities, data sources, segments, measures and jobs."""

    def __init__(self, state, instance_id, name="Contoso", instance_type="production"):
        self.state = state
        self.id = instance_id
        self.name = name
        self.instance_type = instance_type
        self.entities = collections.OrderedDict()
        self.datasources = collections.OrderedDict()
        self.segments = collections.OrderedDict()
        self.measures = collections.OrderedDict()
        self.jobs = []
        self.nodes = collections.OrderedDict()
        self.job_counter = 0
        self.seg_version = 0
        self._derived = {}

    # -- entities ----------------------------------------------------------------------------

    def entity(self, name):
        ent = self.entities.get(name)
        if ent is None:
            raise ApiError(404, "EntityNotFound", "Entity '%s' was not found." % name)
        return ent

    def rows_of(self, ent):
        """The entity's RowSet; a segment's is derived from its members (cached)."""
        if ent.segment is None:
            return ent.rows
        seg = self.segments.get(ent.segment)
        profile = self.entities.get(seg["profileEntity"]) if seg else None
        if profile is None:
            return RowSet()
        ckey = (ent.name, profile.rows.version, self.seg_version)
        cached = self._derived.get(ent.name)
        if cached and cached[0] == ckey:
            return cached[1]
        members = self.members(ent.segment)
        key = profile.key_attr
        if seg.get("members") is not None:
            rows = [{key: m} for m in seg["members"]]
        else:
            rows = [{key: r.get(key)} for r in profile.rows.rows(0, len(profile.rows))
                    if r.get(key) in members]
        rs = RowSet([ListPart(rows)])
        self._derived[ent.name] = (ckey, rs)
        return rs

    def members(self, segment):
        """Set of profile keys in a segment (KeyError if there is no such segment)."""
        seg = self.segments[segment]
        if seg.get("members") is not None:
            return set(seg["members"])
        profile = self.entities.get(seg["profileEntity"])
        if profile is None or not seg.get("filter"):
            return set()
        ckey = ("members", profile.rows.version, self.seg_version)
        cached = seg.get("_members")
        if cached and cached[0] == ckey:
            return cached[1]
        guard = seg.setdefault("_evaluating", [False])
        if guard[0]:
            raise odata_bad_request("Segment '%s' refers to itself." % segment)
        guard[0] = True
        try:
            cf = CompiledFilter(seg["filter"], profile, self.members)
            key = profile.key_attr
            found = {r.get(key) for r in profile.rows.rows(0, len(profile.rows)) if cf.match(r)}
        finally:
            guard[0] = False
        seg["_members"] = (ckey, found)
        return found

    def add_entity(self, ent):
        self.entities[ent.name] = ent
        self.seg_version += 1

    def ensure_segment_entity(self, seg):
        if seg["name"] not in self.entities:
            key = "CustomerId"
            profile = self.entities.get(seg["profileEntity"])
            if profile is not None and profile.key_attr:
                key = profile.key_attr
            self.add_entity(Entity(seg["name"], [{"name": key, "dataType": "Edm.String",
                                                  "searchProperties": None}], [[key]], "segment",
                                   refresh_time=seg["evaluationStatus"].get("evaluationDate")
                                   or self.state.clock.now(), segment=seg["name"]))

    # -- data sources, segments, measures ------------------------------------------------------

    def datasource(self, ident):
        """A data source by id or by name (names are what tasks and entities use)."""
        ds = self.datasources.get(ident)
        if ds is None:
            for d in self.datasources.values():
                if isinstance(ident, str) and d["name"].lower() == ident.lower():
                    return d
        return ds

    def update_datasource(self, ident, spec, clock):
        ds = self.datasource(ident)
        if ds is None:
            name = spec.get("name", ident)
            ds_id = spec.get("dataSourceId") or (ident if ident != name else guid_from(self.id, "ds", name))
            ds = {"dataSourceId": ds_id, "name": name, "friendlyName": name, "kind": "powerQuery",
                  "isActive": True, "refreshState": "notUpdated", "lastRefresh": None}
            self.datasources[ds_id] = ds
        for k, v in spec.items():
            if k == "refreshState":
                ds[k] = canon(v, REFRESH_STATES)
            elif k == "lastRefresh":
                ds[k] = None if v is None else parse_ticks(v, clock)
            elif k != "dataSourceId":
                ds[k] = v
        return ds

    def update_segment(self, name, spec, clock):
        seg = self.segments.get(name)
        if seg is None:
            seg = {"name": name, "friendlyName": name, "state": "active", "profileEntity": "Customer",
                   "filter": None, "members": None, "plannedCount": None,
                   "evaluationStatus": {"jobStatus": "None", "evaluationDate": None,
                                        "entityCount": None, "error": None}}
            self.segments[name] = seg
        ev = seg["evaluationStatus"]
        for k, v in spec.items():
            if k == "state":
                seg[k] = canon(v, SEGMENT_STATES)
            elif k in ("jobStatus", "entityCount", "evaluationDate", "error"):
                if k == "jobStatus":
                    v = canon(v, SEGMENT_JOB)
                elif k == "evaluationDate":
                    v = None if v is None else parse_ticks(v, clock)
                ev[k] = v
            elif k == "evaluationStatus" and isinstance(v, dict):
                self.update_segment(name, v, clock)
            else:                       # filter, members, plannedCount, profileEntity, friendlyName...
                seg[k] = v
        self.seg_version += 1
        self.ensure_segment_entity(seg)
        return seg

    def update_measure(self, name, spec, clock):
        m = self.measures.get(name)
        if m is None:
            m = {"name": name, "friendlyName": name,
                 "definition": {"isScalar": True, "dimensions": [], "aggregates": []},
                 "latestEvaluation": {"state": "none", "endTime": None},
                 "output": {"values": {}, "evaluationTime": None}, "plannedValues": None}
            self.measures[name] = m
        for k, v in spec.items():
            if k == "values":
                m["output"]["values"] = {str(a): str(b) for a, b in v.items()}
                if "evaluationTime" not in spec:        # new values are a new evaluation
                    m["output"]["evaluationTime"] = clock.now()
            elif k == "evaluationTime":
                m["output"]["evaluationTime"] = None if v is None else parse_ticks(v, clock)
            elif k == "state":
                m["latestEvaluation"]["state"] = canon(v, MEASURE_STATES)
            elif k == "endTime":
                m["latestEvaluation"]["endTime"] = None if v is None else parse_ticks(v, clock)
            elif k == "latestEvaluation" and isinstance(v, dict):
                self.update_measure(name, v, clock)
            elif k == "output" and isinstance(v, dict):
                self.update_measure(name, v, clock)
            elif k == "definition":
                m["definition"] = v
            else:
                m[k] = v
        return m

    # -- workflow simulation (C.4) ---------------------------------------------------------------

    def _task(self, job_id, n, op, identifier):
        return {"taskId": guid_from(self.id, job_id, "task", n), "operationType": op,
                "identifier": identifier, "taskStatus": "queued", "end": None, "ciErrors": []}

    def plan_tasks(self, job_id, op, identifiers, downstream):
        """The task list of a new job (C.4): ingestion -> map -> match -> merge -> segments, measures."""
        steps = []
        all_ds = [d["name"] for d in self.datasources.values() if d.get("isActive", True)]
        tail = [("segmentation", s) for s in self.segments] + [("measures", m) for m in self.measures]
        unify = [(u, u.capitalize()) for u in UNIFICATION]
        if op == "all":
            steps = [("ingestion", d) for d in all_ds] + unify + tail
        elif op == "ingestion":
            names = []
            for ident in identifiers or all_ds:
                ds = self.datasource(ident)
                if ds is None:
                    raise ApiError(400, "DataSourceNotFound", "Data source '%s' was not found." % ident)
                names.append(ds["name"])
            steps = [("ingestion", d) for d in names] + ((unify + tail) if downstream else [])
        elif op in UNIFICATION:
            steps = unify[UNIFICATION.index(op):] + (tail if downstream else [])
        elif op in ("segmentation", "measures"):
            pool = self.segments if op == "segmentation" else self.measures
            for ident in identifiers or list(pool):
                if ident not in pool:
                    raise ApiError(400, "NotFound", "%s '%s' was not found." % (op, ident))
                steps.append((op, ident))
        else:
            steps = [(op, (identifiers or [op])[0])]
        return [self._task(job_id, n, o, i) for n, (o, i) in enumerate(steps)]

    def submit_job(self, op, kind="onDemand", identifiers=None, plan=None, job_type=None,
                   downstream=False, at=None):
        at = self.state.clock.now() if at is None else at
        op = canon(op, OPERATIONS)
        self.job_counter += 1
        job_id = guid_from(self.id, "job", self.job_counter)
        tasks = self.plan_tasks(job_id, op, identifiers, downstream)
        job = Job(job_id, op, canon(kind, SUBMISSION_KINDS),
                  canon(job_type or ("full" if op == "all" else "incremental"), JOB_TYPES),
                  at, tasks, plan, identifiers=identifiers)
        job.seq = self.job_counter
        aa = self.state.settings["auto_advance"]
        if aa:
            job.next_step_at = at + int(aa * TICKS)
        self.jobs.append(job)
        return job

    def jobs_newest_first(self):
        """The order of GET .../jobs: by submittedTimestamp, then creation, newest first."""
        return sorted(self.jobs, key=lambda j: (j.submitted, j.seq), reverse=True)

    def job(self, job_id):
        for j in self.jobs:
            if j.id == job_id:
                return j
        raise ApiError(404, "JobNotFound", "Job '%s' was not found." % job_id)

    def _start_task(self, task, at):
        task["taskStatus"] = "running"
        if task["operationType"] == "ingestion":
            ds = self.datasource(task["identifier"])
            if ds is not None:
                ds["refreshState"] = "updating"
        elif task["operationType"] == "segmentation" and task["identifier"] in self.segments:
            self.segments[task["identifier"]]["evaluationStatus"]["jobStatus"] = "Running"
        elif task["operationType"] == "measures" and task["identifier"] in self.measures:
            self.measures[task["identifier"]]["latestEvaluation"]["state"] = "running"

    def _end_task(self, job, task, status, at):
        """A task reaches `status`; apply its effects on the instance (C.4)."""
        task["taskStatus"] = status
        task["end"] = at
        ok = status == "successful"
        if not ok and status != "skipped":
            task["ciErrors"] = [api_error_body(500, "TaskFailed", "Task %s %s ended with status %s."
                                               % (task["operationType"], task["identifier"], status),
                                               culprit="system")]
        op, ident = task["operationType"], task["identifier"]
        if status != "skipped":
            node = self.nodes.setdefault((op, ident), {"operationType": op, "identifier": ident,
                                                       "taskStatus": None, "endTimestamp": None,
                                                       "lastSuccessfulTimestamp": None})
            node["taskStatus"] = status
            node["endTimestamp"] = at
            if ok:
                node["lastSuccessfulTimestamp"] = at
        if op == "ingestion":
            ds = self.datasource(ident)
            if ds is not None and status != "skipped":
                ds["refreshState"] = {"successful": "updated", "aborted": "updateCancelled"}.get(
                    status, "updateFailed")
                ds["lastRefresh"] = at          # always advances, also on failure (C.4)
                if ok:
                    for ent in self.entities.values():
                        if ent.data_source and ent.data_source.lower() == ds["name"].lower():
                            ent.refresh_time = at
        elif op == "merge" and ok:
            for ent in self.entities.values():
                if ent.entity_type in ("profile", "unifiedActivity"):
                    ent.refresh_time = at
        elif op == "segmentation" and ident in self.segments and status != "skipped":
            seg = self.segments[ident]
            ev = seg["evaluationStatus"]
            ev["evaluationDate"] = at
            if ok:
                planned = seg.get("plannedCount")
                ev["entityCount"] = planned if planned is not None else len(self.members(ident))
                ev["jobStatus"], ev["error"] = "CompletedSuccess", None
            else:
                ev["jobStatus"] = "Cancelled" if status == "aborted" else "CompletedFailure"
                ev["error"] = "Segment evaluation ended with status %s." % status
            if ident in self.entities:
                self.entities[ident].refresh_time = at
        elif op == "measures" and ident in self.measures and status != "skipped":
            m = self.measures[ident]
            m["latestEvaluation"] = {"state": "completed" if ok else "failed", "endTime": at}
            if ok:
                if m.get("plannedValues") is not None:
                    m["output"]["values"] = {str(k): str(v) for k, v in m["plannedValues"].items()}
                m["output"]["evaluationTime"] = at
            if ident in self.entities and ok:
                self.entities[ident].refresh_time = at

    def _running_task(self, job):
        return next((t for t in job.tasks if t["taskStatus"] == "running"), None)

    def _close_job(self, job, status, at):
        """Skip every task not yet ended and give the job its final status."""
        for t in job.tasks:
            if t["taskStatus"] in ("queued", "running"):
                self._end_task(job, t, "skipped", at)
        job.status, job.end, job.next_step_at = status, at, None

    def step_job(self, job, at):
        """One step: queued -> running (first task starts), else the running task ends with its
        planned status and the next one starts; a failure skips the rest and fails the job."""
        if not job.active:
            return
        if job.status != "running":
            job.status = "running"
            if job.tasks:
                self._start_task(job.tasks[0], at)
            else:
                job.status, job.end = "successful", at
            return
        task = self._running_task(job)
        if task is None:
            self._close_job(job, "successful", at)
            return
        status = job.planned_status(task)
        self._end_task(job, task, status, at)
        if status != "successful":
            self._close_job(job, status if status in ("failed", "timedOut", "aborted") else "failed", at)
            return
        nxt = next((t for t in job.tasks if t["taskStatus"] == "queued"), None)
        if nxt is None:
            job.status, job.end, job.next_step_at = "successful", at, None
        else:
            self._start_task(nxt, at)

    def finish_job(self, job, status, at):
        """Run a job to its end.  Without `status` (or "successful") the plan decides; any other
        status ends the current (or next) task with it and stops the job there."""
        status = canon(status, JOB_STATUSES) if status else None
        if status in (None, "successful"):
            while job.active:
                self.step_job(job, at)
            return
        if job.status != "running":
            self.step_job(job, at)
        task = self._running_task(job)
        if task is not None:
            self._end_task(job, task, status, at)
        self._close_job(job, status, at)

    def cancel_job(self, job, at):
        if not job.active:
            raise ApiError(400, "JobNotCancellable", "Job '%s' has already ended (%s)." % (job.id, job.status))
        task = self._running_task(job)
        if task is not None:
            self._end_task(job, task, "aborted", at)
        self._close_job(job, "aborted", at)

    def tick(self, now):
        """auto_advance: perform every step that fell due, at the time it fell due."""
        aa = self.state.settings["auto_advance"]
        if not aa:
            return
        step = int(aa * TICKS)
        for job in self.jobs:
            if job.active and job.next_step_at is None:
                job.next_step_at = now + step
            while job.active and job.next_step_at is not None and job.next_step_at <= now:
                at = job.next_step_at
                self.step_job(job, at)
                job.next_step_at = at + step if job.active else None


def api_error_body(status, code, message, culprit="user"):
    """The ApiErrorResult shape (/manage, /workflows, /instances and task ciErrors)."""
    names = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
             409: "Conflict", 429: "TooManyRequests", 500: "InternalServerError",
             502: "BadGateway", 503: "ServiceUnavailable", 504: "GatewayTimeout"}
    return {"httpStatusCode": names.get(status, str(status)), "exceptionCulprit": culprit,
            "errorCode": code, "resultSeverity": "error", "message": message, "params": {},
            "ciResults": []}


# --------------------------------------------------------------------------------------------
# Settings (C.1).  One table drives the CLI flags, POST /_control/settings and --help.
# Precedence: built-in default < scenario "settings" < command line; reset returns to that.
# --------------------------------------------------------------------------------------------

def _choice(*choices):
    def parse(v):
        v = str(v).lower() if not isinstance(v, str) else v
        for c in choices:
            if str(c).lower() == v.lower():
                return c
        raise ValueError("must be one of %s" % "|".join(map(str, choices)))
    return parse


def _int(lo, hi=None):
    def parse(v):
        if isinstance(v, bool):
            raise ValueError("must be an integer")
        n = int(v) if not isinstance(v, str) else int(v.strip())
        if n < lo or (hi is not None and n > hi):
            raise ValueError("must be between %s and %s" % (lo, hi if hi is not None else "inf"))
        return n
    return parse


def _bool(v):
    if isinstance(v, bool):
        return v
    s = str(v).lower()
    if s in ("1", "true", "on", "yes"):
        return True
    if s in ("0", "false", "off", "no"):
        return False
    raise ValueError("must be true or false")


def _rate(v):
    """"off" or "N/W": N accepted calls per sliding window of W seconds."""
    if v is None or str(v).lower() in ("off", "none", ""):
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)\s*s?\s*", str(v))
    if not m or int(m.group(1)) < 1 or float(m.group(2)) <= 0:
        raise ValueError("must be off or N/W (calls per seconds), e.g. 100/60")
    return (int(m.group(1)), Decimal(m.group(2)))


def _seconds_or_off(v):
    if v is None or str(v).lower() in ("off", "none", "0", "false"):
        return None
    s = Decimal(str(v))
    if s <= 0:
        raise ValueError("must be off or a positive number of seconds")
    return s


def _root_or_off(v):
    if v is None or str(v).lower() in ("off", "none", ""):
        return None
    if not re.fullmatch(r"https?://[^/?#\s]+", str(v)):
        raise ValueError("must be off or scheme://host[:port]")
    return str(v)


SETTINGS = [
    # name, default, parser, help
    ("flavor", "customer_insights", _choice("customer_insights", "dataverse"),
     "API flavour: customer_insights (/v1) or dataverse (/api/data/v9.2)"),
    ("default_page", 100, _int(0), "rows per /data page when no $top is given"),
    ("max_top", 100, _int(1), "silent $top cap: a larger $top yields this many rows"),
    ("nextlink", "off", _choice("off", "absolute", "relative", "rooted"),
     "@odata.nextLink form on /data pages with more rows (off = skip paging only)"),
    ("count", "off", _choice("off", "always", "request"),
     "@odata.count: never, always, or when $count=true"),
    ("enum_case", "spec", _choice("spec", "pascal", "camel"),
     "enum spelling: spec (lowerCamel; PascalCase segment jobStatus), PascalCase or lowerCamel"),
    ("odata_error", "wrapped", _choice("wrapped", "flat"),
     "/data error body: {\"error\":{code,message}} or {errorCode,message,target,details}"),
    ("numbers_as_strings", False, _bool, "serve Edm.Int64 and Edm.Decimal values as JSON strings"),
    ("token_ttl", 3599, _int(1), "access token lifetime in seconds (emulator clock)"),
    ("rate", None, _rate, "gateway rate limit: off or N/W calls per sliding W seconds per key"),
    ("clock", "real", _choice("real", "manual"), "emulator clock: real time, or manual (POST clock)"),
    ("auto_advance", None, _seconds_or_off, "off, or seconds per job step (queued->running, each task)"),
    ("partition_rows", 100000, _int(1), "rows per CSV partition (E5, proxy=true)"),
    ("csv_header", False, _bool, "CSV partitions start with a header line (hasHeader)"),
    ("write_status", 201, _int(201, 202), "status of a successful E10 POST: 201 or 202"),
    ("sas_ttl", 3600, _int(1), "lifetime in seconds of signed /_files/ URLs"),
    ("token_expires_as_string", False, _bool, "send expires_in/ext_expires_in as strings"),
    ("dataverse_max_page", 5000, _int(1), "dataverse: page size when Prefer asks none or more"),
    ("link_root", None, _root_or_off,
     "off, or scheme://host:port that absolute nextLinks/deltaLinks use instead of the request's"),
    ("files_root", None, _root_or_off,
     "off, or scheme://host:port of the partition URLs (E5) instead of the request's"),
]
SETTING_DEFAULTS = {name: default for name, default, _, _ in SETTINGS}
SETTING_PARSERS = {name: parser for name, _, parser, _ in SETTINGS}


def parse_settings(raw, where):
    out = {}
    for k, v in raw.items():
        k2 = k.replace("-", "_")
        if k2 not in SETTING_PARSERS:
            raise BadRequest("%s: unknown setting %r (known: %s)" % (where, k, ", ".join(SETTING_PARSERS)))
        try:
            out[k2] = SETTING_PARSERS[k2](v)
        except (ValueError, TypeError, InvalidOperation) as e:
            raise BadRequest("%s: setting %s %s" % (where, k2, e)) from None
    return out


def settings_json(settings):
    out = dict(settings)
    out["rate"] = "off" if settings["rate"] is None else "%d/%s" % settings["rate"]
    out["auto_advance"] = "off" if settings["auto_advance"] is None else settings["auto_advance"]
    for k in ("link_root", "files_root"):
        out[k] = settings[k] or "off"
    return out


# --------------------------------------------------------------------------------------------
# Scenarios (C.4): instances with entities (inline rows, NDJSON file or generated), data
# sources, segments, measures and past jobs.  The default instance is itself a scenario.
# --------------------------------------------------------------------------------------------

def load_json_text(text):
    # Decimals keep the exact digits of decimal values written in scenarios and control calls.
    return json.loads(text, parse_float=Decimal)


def build_entity(spec, clock, base_dir=None, existing=None):
    """An Entity from a scenario/control spec; `existing` keeps what the spec does not set."""
    if not isinstance(spec, dict):
        raise BadRequest("an entity must be an object")
    name = spec.get("name") or spec.get("qualifiedEntityName") or (existing and existing.name)
    if not isinstance(name, str) or not name:
        raise BadRequest("an entity needs a name")
    gen = make_generator(spec["generate"]) if "generate" in spec else None
    if "attributes" in spec:
        attributes = normalize_attributes(spec["attributes"])
    elif existing is not None:
        attributes = existing.attributes
    elif gen is not None:
        attributes = [{"name": n, "dataType": t,
                       "searchProperties": {"isSearchable": True} if n in gen[0].SEARCHABLE else None}
                      for n, t in gen[0].ATTRIBUTES]
    else:
        attributes = []
    if "keys" in spec:
        keys = normalize_keys(spec["keys"])
    elif existing is not None:
        keys = existing.keys
    elif gen is not None:
        keys = [[gen[0].KEY]]
    else:
        keys = []
    for k in keys:
        for a in k:
            if a not in {x["name"] for x in attributes}:
                raise BadRequest("entity %s: key attribute %r is not an attribute" % (name, a))
    source = spec.get("dataSourceName", existing.data_source if existing else None)
    etype = spec.get("entityType") or (existing.entity_type if existing else None) or \
        ("profile" if gen is not None and source is None else "activity")
    refresh = spec.get("refreshTime", "keep")
    if refresh == "keep":
        refresh = existing.refresh_time if existing else clock.now()
    elif refresh is not None:
        refresh = parse_ticks(refresh, clock)
    ent = Entity(name, attributes, keys, etype, source,
                 spec.get("incrementalAttribute", existing.incremental if existing else None),
                 refresh, spec.get("entitySet", existing.entity_set if existing else None),
                 existing.rows if existing else None)
    ent.change_tracking = bool(spec.get("changeTracking", existing.change_tracking if existing else True))
    ent.base_entity = spec.get("baseEntity", existing.base_entity if existing else None)
    if "rows" in spec or "ndjson" in spec or gen is not None:
        ent.rows = RowSet([p for p in [rows_part(ent, spec, base_dir)] if p is not None])
    elif existing is not None:
        ent.changes, ent.tracking_floor = existing.changes, existing.tracking_floor
    return ent


def rows_part(ent, spec, base_dir=None):
    """The rows a spec brings: "rows" (inline), "ndjson" (a file) or "generate"."""
    if "generate" in spec:
        gen, start, n = make_generator(spec["generate"])
        return GenPart(gen, start, n)
    rows = spec.get("rows")
    if "ndjson" in spec:
        path = spec["ndjson"]
        if base_dir and not os.path.isabs(path):
            path = os.path.join(base_dir, path)
        try:
            with open(path, encoding="utf-8") as f:
                rows = [load_json_text(line) for line in f if line.strip()]
        except (OSError, ValueError) as e:
            raise BadRequest("entity %s: cannot read %s: %s" % (ent.name, path, e)) from None
    if rows is None:
        return None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise BadRequest("entity %s: rows must be a list of objects" % ent.name)
    names = [a["name"] for a in ent.attributes]
    out = []
    for r in rows:
        unknown = set(r) - set(names)
        if unknown:
            raise BadRequest("entity %s: row has unknown attributes %s" % (ent.name, sorted(unknown)))
        out.append({n: coerce_value(r.get(n), ent.types[n]) for n in names})
    return ListPart(out)


def load_instance(state, spec, base_dir=None):
    clock = state.clock
    inst = Instance(state, spec.get("instanceId", INSTANCE_ID), spec.get("name", "Contoso"),
                    spec.get("instanceType", "production"))
    for e in spec.get("entities", []):
        inst.add_entity(build_entity(dict({"refreshTime": None}, **e), clock, base_dir))
    for d in spec.get("datasources", []):
        d = dict(d)
        inst.update_datasource(d.get("dataSourceId") or d.get("name"), d, clock)
    for s in spec.get("segments", []):
        inst.update_segment(s["name"], {k: v for k, v in s.items() if k != "name"}, clock)
    for m in spec.get("measures", []):
        inst.update_measure(m["name"], {k: v for k, v in m.items() if k != "name"}, clock)
    for j in spec.get("jobs", []):
        inst.jobs.append(load_job(inst, j, clock))
    # Status nodes follow from past tasks, replayed in time order.
    ended = [(t["end"], t) for job in sorted(inst.jobs, key=lambda x: x.submitted)
             for t in job.tasks if t["end"] is not None and t["taskStatus"] != "skipped"]
    for end, t in sorted(ended, key=lambda x: x[0]):
        node = inst.nodes.setdefault((t["operationType"], t["identifier"]), {
            "operationType": t["operationType"], "identifier": t["identifier"], "taskStatus": None,
            "endTimestamp": None, "lastSuccessfulTimestamp": None})
        node["taskStatus"], node["endTimestamp"] = t["taskStatus"], end
        if t["taskStatus"] == "successful":
            node["lastSuccessfulTimestamp"] = end
    derive_refresh_times(inst, clock)
    return inst


def derive_refresh_times(inst, clock):
    """An entity whose scenario gives no refreshTime gets the one its history implies: a source
    entity its data source's last successful ingestion (else lastRefresh), a profile or unified
    activity the last successful merge, a segment or measure output its last evaluation (another
    measure entity the latest one); the load time if there is no history."""
    def node_time(op, ident):
        n = inst.nodes.get((op, ident))
        return n["lastSuccessfulTimestamp"] if n else None
    for ent in inst.entities.values():
        if ent.refresh_time is not None:
            continue
        t = None
        if ent.data_source:
            ds = inst.datasource(ent.data_source)
            t = node_time("ingestion", ds["name"] if ds else ent.data_source) or (ds or {}).get("lastRefresh")
        elif ent.entity_type in ("profile", "unifiedActivity"):
            t = node_time("merge", "Merge")
        elif ent.name in inst.segments:
            t = inst.segments[ent.name]["evaluationStatus"]["evaluationDate"]
        elif ent.name in inst.measures:
            t = inst.measures[ent.name]["output"]["evaluationTime"]
        elif ent.entity_type == "measure":         # e.g. Customer_Measure: the latest evaluation
            t = max((m["output"]["evaluationTime"] for m in inst.measures.values()
                     if m["output"]["evaluationTime"] is not None), default=None)
        ent.refresh_time = t if t is not None else clock.now()


def load_job(inst, spec, clock):
    inst.job_counter += 1
    job_id = spec.get("jobId") or guid_from(inst.id, "job", inst.job_counter)
    tasks = []
    for n, t in enumerate(spec.get("tasks", [])):
        op = canon(t.get("operationType", "all"), OPERATIONS)
        tasks.append({"taskId": t.get("taskId") or guid_from(inst.id, job_id, "task", n),
                      "operationType": op, "identifier": t.get("identifier", op),
                      "taskStatus": canon(t.get("taskStatus", "successful"), JOB_STATUSES),
                      "end": parse_ticks(t["endTimestamp"], clock) if t.get("endTimestamp") else None,
                      "ciErrors": t.get("ciErrors", [])})
    job = Job(job_id, canon(spec.get("operationType", "all"), OPERATIONS),
              canon(spec.get("jobSubmissionKind", "scheduled"), SUBMISSION_KINDS),
              canon(spec.get("jobType", "full"), JOB_TYPES),
              parse_ticks(spec.get("submittedTimestamp", "now"), clock), tasks,
              spec.get("plan"), canon(spec.get("jobStatus", "successful"), JOB_STATUSES),
              parse_ticks(spec["endTimestamp"], clock) if spec.get("endTimestamp") else None,
              spec.get("identifiers"))
    job.seq = inst.job_counter
    return job


def default_scenario():
    """The default instance (used without --scenario; tests/scenarios/demo.json is this, dumped).

    Small but realistic: a generated Customer (250 rows, seed 1), a POS source entity with Int64
    keys beyond 2^53, decimals and 7-digit timestamps, web page views, UnifiedActivity,
    Customer_Measure, two data sources, two segments, a scalar measure and one with a
    dimension, and two past jobs (a full refresh and a failed WebEvents ingestion)."""
    gen = CustomerGenerator(1)
    customers = [gen.row(i) for i in range(250)]
    rng = [mix64(0xC1F10 + k) for k in range(400)]     # fixed pseudo-random numbers

    def ts(day, secs, ticks):
        return "2025-02-%02dT%s.%07dZ" % (day, _TIME_OF_DAY[secs % 86400], ticks)

    transactions = []
    for k in range(36):
        r = rng[k]
        is_return = k % 9 == 4
        cents = 199 + r % 49_800
        transactions.append({
            "TransactionId": 9007199254740993 if k == 35 else 1_000_001 + k,   # 2^53 + 1
            "StoreId": 101 + (r >> 20) % 5,
            "CustomerRef": "POS-C%05d" % ((r >> 30) % 40),
            "Amount": Decimal(-cents if is_return else cents).scaleb(-2),
            "Quantity": 1 + (r >> 40) % 6,
            "Currency": "EUR" if (r >> 50) % 4 == 0 else "USD",
            "TransactionTime": ts(1 + k % 27, 8 * 3600 + (r >> 8) % 36000, (r >> 24) % TICKS),
            "BusinessDate": "2025-02-%02d" % (1 + k % 27),
            "IsReturn": is_return,
            "Discount": None if k % 5 == 0 else ((r >> 12) % 3000) / 10000,
        })
    page_views = []
    for k in range(12):
        r = rng[100 + k]
        page_views.append({
            "EventId": guid_from("WebEvents", k),
            "VisitorId": "v-%04d" % ((r >> 7) % 20),
            "Url": ["/", "/products", "/products/42", "/cart", "/checkout", "/help?q=returns"][r % 6],
            "ViewedAt": ts(20 + k % 8, (r >> 16) % 86400, (r >> 40) % TICKS),
            "DurationSeconds": (r >> 33) % 600,
        })
    activities = []
    for k in range(40):
        r = rng[200 + k]
        cust = customers[(r >> 5) % 60]["CustomerId"]
        if k % 3 == 2:
            pv = page_views[k % len(page_views)]
            activities.append({"ActivityId": "ua-%04d" % (k + 1), "CustomerId": cust,
                               "ActivityType": "PageView", "ActivityTime": pv["ViewedAt"],
                               "SourceEntityName": "WebEvents_PageViews",
                               "SourceRecordId": pv["EventId"], "Amount": None,
                               "Subject": "Viewed " + pv["Url"]})
        else:
            tx = transactions[k % len(transactions)]
            activities.append({"ActivityId": "ua-%04d" % (k + 1), "CustomerId": cust,
                               "ActivityType": "Return" if tx["IsReturn"] else "Purchase",
                               "ActivityTime": tx["TransactionTime"],
                               "SourceEntityName": "RetailPos_Transactions",
                               "SourceRecordId": str(tx["TransactionId"]), "Amount": tx["Amount"],
                               "Subject": "Store %d, %d item(s)" % (tx["StoreId"], tx["Quantity"])})
    per_customer = collections.OrderedDict()
    for a in activities:
        if a["Amount"] is not None:
            per_customer[a["CustomerId"]] = per_customer.get(a["CustomerId"], Decimal("0.00")) + a["Amount"]
    by_country = collections.OrderedDict()
    for c in customers:
        by_country[c["Country"]] = by_country.get(c["Country"], Decimal("0.00")) + c["LifetimeValue"]
    total_revenue = sum((t["Amount"] for t in transactions), Decimal("0.00"))

    merge_end = "2025-03-01T02:19:40.0000000Z"
    return {
        "auth": {"tenant": TENANT, "clients": {CLIENT_ID: CLIENT_SECRET}, "scope": SCOPE,
                 "subscription_keys": {SUB_KEY: "primary", SUB_KEY2: "secondary"}},
        "instances": [{
            "instanceId": INSTANCE_ID, "name": "Contoso", "instanceType": "production",
            "entities": [
                {"name": "Customer", "entityType": "profile", "dataSourceName": None,
                 "refreshTime": merge_end, "entitySet": "msdynci_customerprofiles",
                 "generate": {"schema": "customer", "rows": 250, "seed": 1}},
                {"name": "RetailPos_Transactions", "entityType": "activity",
                 "dataSourceName": "RetailPos", "refreshTime": "2025-03-01T02:05:11.1234567Z",
                 "attributes": [["TransactionId", "Edm.Int64"], ["StoreId", "Edm.Int32"],
                                ["CustomerRef", "Edm.String"], ["Amount", "Edm.Decimal"],
                                ["Quantity", "Edm.Int16"], ["Currency", "Edm.String"],
                                ["TransactionTime", "Edm.DateTimeOffset"], ["BusinessDate", "Edm.Date"],
                                ["IsReturn", "Edm.Boolean"], ["Discount", "Edm.Double"]],
                 "keys": [["TransactionId"]], "rows": transactions},
                {"name": "WebEvents_PageViews", "entityType": "activity", "dataSourceName": "WebEvents",
                 "refreshTime": "2025-03-01T02:06:02.5000000Z",
                 "attributes": [["EventId", "Edm.Guid"], ["VisitorId", "Edm.String"],
                                ["Url", "Edm.String"], ["ViewedAt", "Edm.DateTimeOffset"],
                                ["DurationSeconds", "Edm.Int32"]],
                 "keys": [["EventId"]], "rows": page_views},
                {"name": "UnifiedActivity", "entityType": "unifiedActivity", "dataSourceName": None,
                 "refreshTime": merge_end, "incrementalAttribute": "ActivityTime",
                 "entitySet": "msdynci_unifiedactivities",
                 "attributes": [["ActivityId", "Edm.String"], ["CustomerId", "Edm.String"],
                                ["ActivityType", "Edm.String"], ["ActivityTime", "Edm.DateTimeOffset"],
                                ["SourceEntityName", "Edm.String"], ["SourceRecordId", "Edm.String"],
                                ["Amount", "Edm.Decimal"], ["Subject", "Edm.String"]],
                 "keys": [["ActivityId"]], "rows": activities},
                {"name": "Customer_Measure", "entityType": "measure", "dataSourceName": None,
                 "refreshTime": "2025-03-01T02:33:00.0000000Z",
                 "attributes": [["CustomerId", "Edm.String"], ["TotalRevenue", "Edm.Decimal"]],
                 "keys": [["CustomerId"]],
                 "rows": [{"CustomerId": c, "TotalRevenue": v} for c, v in per_customer.items()]},
                {"name": "RevenueByCountry", "entityType": "measure", "dataSourceName": None,
                 "refreshTime": "2025-03-01T02:34:10.0000000Z",
                 "attributes": [["Country", "Edm.String"], ["RevenueByCountry", "Edm.Decimal"]],
                 "keys": [["Country"]],
                 "rows": [{"Country": c, "RevenueByCountry": v} for c, v in by_country.items()]},
            ],
            "datasources": [
                {"dataSourceId": "d8d3b26a-0000-4000-8000-000000000001", "name": "RetailPos",
                 "friendlyName": "Retail POS", "kind": "powerQuery", "isActive": True,
                 "refreshState": "updated", "lastRefresh": "2025-03-01T02:05:11.1234567Z"},
                {"dataSourceId": "d8d3b26a-0000-4000-8000-000000000002", "name": "WebEvents",
                 "friendlyName": "Web events", "kind": "attachCdm", "isActive": True,
                 "refreshState": "updateFailed", "lastRefresh": "2025-03-01T03:12:30.0000000Z"},
            ],
            "segments": [
                {"name": "HighValue", "friendlyName": "High value customers", "state": "active",
                 "filter": "LifetimeValue gt 50000",
                 "evaluationStatus": {"jobStatus": "CompletedSuccess",
                                      "evaluationDate": "2025-03-01T02:30:00.0000000Z",
                                      "entityCount": sum(1 for c in customers
                                                         if c["LifetimeValue"] > 50000)}},
                {"name": "Churners", "friendlyName": "Likely to churn", "state": "active",
                 "filter": "ChurnScore gt 0.85 and IsActive",
                 "evaluationStatus": {"jobStatus": "CompletedSuccess",
                                      "evaluationDate": "2025-03-01T02:31:15.0000000Z",
                                      "entityCount": sum(1 for c in customers
                                                         if c["ChurnScore"] > 0.85 and c["IsActive"])}},
            ],
            "measures": [
                {"name": "TotalRevenue", "friendlyName": "Total revenue",
                 "definition": {"isScalar": True, "dimensions": [],
                                "aggregates": [{"name": "TotalRevenue", "function": "sum",
                                                "attribute": "RetailPos_Transactions.Amount"}]},
                 "latestEvaluation": {"state": "completed", "endTime": "2025-03-01T02:33:00.0000000Z"},
                 "output": {"values": {"TotalRevenue": str(total_revenue)},
                            "evaluationTime": "2025-03-01T02:33:00.0000000Z"}},
                {"name": "RevenueByCountry", "friendlyName": "Revenue by country",
                 "definition": {"isScalar": False,
                                "dimensions": [{"name": "Country", "entity": "Customer",
                                                "attribute": "Country"}],
                                "aggregates": [{"name": "RevenueByCountry", "function": "sum",
                                                "attribute": "Customer.LifetimeValue"}]},
                 "latestEvaluation": {"state": "completed", "endTime": "2025-03-01T02:34:10.0000000Z"},
                 "output": {"values": {}, "evaluationTime": "2025-03-01T02:34:10.0000000Z"}},
            ],
            "jobs": [
                {"jobId": "0f6c1d2e-0000-4000-8000-000000000001", "jobType": "full",
                 "jobSubmissionKind": "scheduled", "jobStatus": "successful", "operationType": "all",
                 "submittedTimestamp": "2025-03-01T02:00:00.0000000Z",
                 "endTimestamp": "2025-03-01T02:41:09.0000000Z",
                 "tasks": [
                     {"operationType": "ingestion", "identifier": "RetailPos", "taskStatus": "successful",
                      "endTimestamp": "2025-03-01T02:05:11.1234567Z"},
                     {"operationType": "ingestion", "identifier": "WebEvents", "taskStatus": "successful",
                      "endTimestamp": "2025-03-01T02:06:02.5000000Z"},
                     {"operationType": "map", "identifier": "Map", "taskStatus": "successful",
                      "endTimestamp": "2025-03-01T02:09:30.0000000Z"},
                     {"operationType": "match", "identifier": "Match", "taskStatus": "successful",
                      "endTimestamp": "2025-03-01T02:14:05.0000000Z"},
                     {"operationType": "merge", "identifier": "Merge", "taskStatus": "successful",
                      "endTimestamp": merge_end},
                     {"operationType": "segmentation", "identifier": "HighValue",
                      "taskStatus": "successful", "endTimestamp": "2025-03-01T02:30:00.0000000Z"},
                     {"operationType": "segmentation", "identifier": "Churners",
                      "taskStatus": "successful", "endTimestamp": "2025-03-01T02:31:15.0000000Z"},
                     {"operationType": "measures", "identifier": "TotalRevenue",
                      "taskStatus": "successful", "endTimestamp": "2025-03-01T02:33:00.0000000Z"},
                     {"operationType": "measures", "identifier": "RevenueByCountry",
                      "taskStatus": "successful", "endTimestamp": "2025-03-01T02:34:10.0000000Z"}]},
                {"jobId": "0f6c1d2e-0000-4000-8000-000000000002", "jobType": "incremental",
                 "jobSubmissionKind": "onDemand", "jobStatus": "failed", "operationType": "ingestion",
                 "identifiers": ["WebEvents"],
                 "submittedTimestamp": "2025-03-01T03:10:00.0000000Z",
                 "endTimestamp": "2025-03-01T03:12:30.0000000Z",
                 "tasks": [
                     {"operationType": "ingestion", "identifier": "WebEvents", "taskStatus": "failed",
                      "endTimestamp": "2025-03-01T03:12:30.0000000Z",
                      "ciErrors": [api_error_body(500, "IngestionFailed",
                                                  "Source 'WebEvents' could not be read: the "
                                                  "storage account denied access.", "system")]}]},
            ],
        }],
    }


class Token:
    def __init__(self, tid, client, expires):
        self.id, self.client, self.expires, self.revoked = tid, client, expires, False


class FaultRule:
    """{"match": {method, path, query, nth | every, times}, "action": {...}} (C.6).

    A rule counts the requests its method/path/query match.  nth=k fires on matches k ..
    k+times-1 (times defaults to 1); every=k fires on every k-th match; with neither it fires on
    every match.  times bounds the firings (unlimited unless nth is given).  An exhausted rule
    stays listed but never fires again."""

    ACTIONS = {"status", "body", "headers", "message", "raw", "expire_token", "delay_ms",
               "trickle_bps", "stall", "truncate_at", "chunked", "malformed", "wrong_type", "reset"}
    BODIES = {"gateway", "odata", "apierror", "empty", "html", "raw", "entra", "storage"}

    def __init__(self, rid, spec):
        if not isinstance(spec, dict) or not isinstance(spec.get("action"), dict):
            raise BadRequest("a fault rule needs {\"match\": {...}, \"action\": {...}}")
        match = spec.get("match") or {}
        action = spec["action"]
        unknown = set(match) - {"method", "path", "query", "nth", "every", "times"}
        if unknown:
            raise BadRequest("unknown fault match keys %s" % sorted(unknown))
        unknown = set(action) - self.ACTIONS
        if unknown:
            raise BadRequest("unknown fault actions %s" % sorted(unknown))
        if not action:
            raise BadRequest("a fault rule needs at least one action")
        if "body" in action and action["body"] not in self.BODIES:
            raise BadRequest("fault body must be one of %s" % sorted(self.BODIES))
        if "stall" in action and not isinstance(action["stall"], dict):
            raise BadRequest("stall takes {\"after_bytes\": N, \"ms\": M}")
        if "nth" in match and "every" in match:
            raise BadRequest("a fault rule takes nth or every, not both")
        try:
            self.path = re.compile(match["path"]) if match.get("path") else None
            self.query = re.compile(match["query"]) if match.get("query") else None
        except re.error as e:
            raise BadRequest("bad fault regex: %s" % e) from None
        self.id = rid
        self.spec = {"match": match, "action": action}
        self.method = match.get("method")
        self.nth = int(match["nth"]) if match.get("nth") is not None else None
        self.every = int(match["every"]) if match.get("every") is not None else None
        times = match.get("times")
        self.times = int(times) if times is not None else (1 if self.nth is not None else None)
        self.action = action
        self.seen = 0
        self.fired = 0

    def exhausted(self):
        if self.nth is not None:
            return self.seen >= self.nth + self.times - 1
        return self.times is not None and self.fired >= self.times

    def applies(self, method, path, query):
        """Counts a matching request and says whether the rule fires for it."""
        if self.exhausted():
            return False
        if self.method and self.method.upper() != method:
            return False
        if self.path and not self.path.search(path):
            return False
        if self.query and not self.query.search(query):
            return False
        self.seen += 1
        if self.nth is not None:
            fire = self.nth <= self.seen < self.nth + self.times
        elif self.every is not None:
            fire = self.seen % self.every == 0
        else:
            fire = True
        if fire:
            self.fired += 1
        return fire

    def to_json(self):
        return {"id": self.id, "match": self.spec["match"], "action": self.spec["action"],
                "seen": self.seen, "fired": self.fired, "exhausted": self.exhausted()}


class State:
    """Everything the emulator knows, guarded by one re-entrant lock."""

    def __init__(self, cli_settings, scenario=None, scenario_dir=None, log_file=None,
                 control=True, page_cache_mb=PAGE_CACHE_MB):
        self.lock = threading.RLock()
        self.cli_settings = cli_settings
        self.scenario = scenario
        self.scenario_dir = scenario_dir
        self.control_enabled = control
        self.clock = Clock()
        self.tokens = {}
        self.token_counter = itertools.count(1)
        self.seq = 0
        self.log = collections.deque(maxlen=LOG_CAP)
        self.log_file = open(log_file, "a", encoding="utf-8") if log_file else None
        self.fault_ids = itertools.count(1)
        self.cache = collections.OrderedDict()
        self.cache_lock = threading.Lock()
        self.pages = collections.OrderedDict()      # see rendered_page()
        self.pages_bytes = 0
        self.pages_cap = max(0, int(page_cache_mb)) << 20
        self.reset()

    def reset(self):
        """Back to the startup state: scenario, settings, clock; no faults, no log, no rate
        windows.  Issued tokens stay valid: they are the client's credentials, not instance
        state, and ciflow backends cache them across tests."""
        with self.lock:
            scen = self.scenario if self.scenario is not None else default_scenario()
            settings = dict(SETTING_DEFAULTS)
            settings.update(parse_settings(scen.get("settings", {}), "scenario"))
            settings.update(self.cli_settings)
            self.settings = settings
            self.clock = Clock(settings["clock"])
            self.load(scen)
            self.faults = []
            self.windows = {}
            self.log.clear()
            with self.cache_lock:
                self.cache.clear()
            self.drop_pages()

    def load(self, scen, base_dir=None):
        if not isinstance(scen, dict):
            raise BadRequest("a scenario must be a JSON object")
        auth = scen.get("auth", {})
        clients = auth.get("clients", {CLIENT_ID: CLIENT_SECRET})
        if isinstance(clients, list):
            clients = {c["client_id"]: c["client_secret"] for c in clients}
        keys = auth.get("subscription_keys", {SUB_KEY: "primary", SUB_KEY2: "secondary"})
        if isinstance(keys, list):
            keys = {k: ("primary", "secondary")[n] if n < 2 else "key%d" % (n + 1)
                    for n, k in enumerate(keys)}
        specs = scen.get("instances")
        if specs is None:
            specs = [scen]                       # shorthand: the scenario is one instance
        instances = collections.OrderedDict()
        for spec in specs:
            inst = load_instance(self, spec, base_dir or self.scenario_dir)
            instances[inst.id] = inst
        self.tenant = auth.get("tenant", TENANT)
        self.clients = clients
        self.scope = auth.get("scope", SCOPE)
        self.keys = keys
        self.instances = instances

    def instance(self, instance_id=None):
        if instance_id is None:
            return next(iter(self.instances.values()))
        inst = self.instances.get(instance_id)
        if inst is None:
            raise ApiError(404, "InstanceNotFound", "Instance '%s' was not found." % instance_id)
        return inst

    def next_seq(self):
        with self.lock:
            self.seq += 1
            return self.seq

    def tick(self):
        now = self.clock.now()
        for inst in self.instances.values():
            inst.tick(now)

    def record(self, entry):
        with self.lock:
            self.log.append(entry)
        return entry

    def write_log_file(self, entry):
        if self.log_file:
            with self.lock:
                self.log_file.write(dumps(mark_decimals(entry)) + "\n")
                self.log_file.flush()

    def cached(self, key, compute):
        """A small LRU for derived results (filtered/sorted index lists, stats).  Keys always hold
        RowSet versions, so a stale entry can never be returned."""
        with self.cache_lock:
            if key in self.cache:
                self.cache.move_to_end(key)
                return self.cache[key]
        value = compute()
        with self.cache_lock:
            self.cache[key] = value
            while len(self.cache) > 16:
                self.cache.popitem(last=False)
        return value

    def rendered_page(self, key, compute):
        """The bytes of a page's "value" array and its row count, rendered once per key.

        A page of a big entity costs Python far more to generate and encode than to send, so a
        client paging through it would measure the emulator, not the transfer.  Rendered arrays
        are kept (least recently used first out) up to --page-cache-mb.  Keys hold the RowSet's
        version, and every change of rows makes a new RowSet, so a stale page can never be
        served; control calls that change anything also drop them all (drop_pages), which
        frees the memory at once.  The bytes are exactly what rendering them again would give."""
        if not self.pages_cap:
            return compute()
        with self.cache_lock:
            hit = self.pages.get(key)
            if hit is not None:
                self.pages.move_to_end(key)
                return hit
        value = compute()
        size = len(value[0])
        if size > self.pages_cap:
            return value
        with self.cache_lock:
            if key not in self.pages:
                self.pages[key] = value
                self.pages_bytes += size
                while self.pages_bytes > self.pages_cap:
                    _, (old, _) = self.pages.popitem(last=False)
                    self.pages_bytes -= len(old)
        return value

    def drop_pages(self):
        with self.cache_lock:
            self.pages.clear()
            self.pages_bytes = 0


# --------------------------------------------------------------------------------------------
# Request context and replies
# --------------------------------------------------------------------------------------------

class Reply:
    def __init__(self, status, body=b"", ctype="application/json; charset=utf-8", headers=None,
                 rows=None):
        self.status, self.body, self.ctype = status, body, ctype
        self.headers = list(headers or [])
        self.rows = rows


def json_reply(status, obj, headers=None, rows=None):
    return Reply(status, to_bytes(dumps(mark_decimals(obj))), headers=headers, rows=rows)


class Ctx:
    """One API request as the handlers see it."""

    def __init__(self, state, method, raw_path, raw_query, headers, body, seq, scheme, port):
        self.state = state
        self.method = method
        self.raw_path = raw_path
        self.raw_query = raw_query
        self.path = urllib.parse.unquote(raw_path)
        self.pairs, self.params, self.dup = parse_query(raw_query)
        self.headers = headers
        self.body = body
        self.seq = seq
        self.scheme = scheme
        # Absolute links use the client's Host, as a real server behind a name would.
        self.host = headers.get("Host") or "127.0.0.1:%d" % port
        self.root = "%s://%s" % (scheme, self.host)
        self.link_root = state.settings["link_root"] or self.root
        self.files_root = state.settings["files_root"] or self.root
        self.key = self.token = self.fault = self.route = self.client = None
        self.error_kind = "apierror"

    def enum(self, value, pascal_in_spec=False):
        mode = self.state.settings["enum_case"]
        if not isinstance(value, str) or not value or mode == "spec":
            return value
        return (value[0].upper() if mode == "pascal" else value[0].lower()) + value[1:]


def parse_query(raw):
    """-> (pairs, dict, duplicated names).  parse_qsl decodes %XX and '+' as a space, so
    %24top is $top and a '+' that was meant literally must arrive as %2B (A.1)."""
    pairs = urllib.parse.parse_qsl(raw, keep_blank_values=True)
    params, dup = {}, []
    for k, v in pairs:
        if k in params:
            dup.append(k)
        params[k] = v
    return pairs, params, dup


def error_body(ctx, err):
    """The body of an ApiError, shaped by its kind (and, for OData, the flavour/setting)."""
    kind = err.kind
    if kind == "odata":
        if ctx.state.settings["flavor"] == "dataverse" or ctx.state.settings["odata_error"] == "wrapped":
            return {"error": {"code": err.code, "message": err.message}}
        return {"errorCode": err.code, "message": err.message, "target": None, "details": []}
    if kind == "gateway":
        return {"statusCode": err.status, "message": err.message}
    if kind == "entra":
        m = re.match(r"AADSTS(\d+)", err.message)
        code_num = int(m.group(1)) if m else 0
        now = fmt_ticks(ctx.state.clock.now())
        trace = guid_from("trace", ctx.seq)
        return {"error": err.code,
                "error_description": "%s\r\nTrace ID: %s\r\nCorrelation ID: %s\r\nTimestamp: %s"
                                     % (err.message, trace, guid_from("corr", ctx.seq), now[:19] + "Z"),
                "error_codes": [code_num], "timestamp": now[:19] + "Z", "trace_id": trace,
                "correlation_id": guid_from("corr", ctx.seq),
                "error_uri": "https://login.microsoftonline.com/error?code=%d" % code_num}
    return api_error_body(err.status, err.code, err.message)


def error_reply(ctx, err):
    headers = list(err.headers)
    if err.kind == "empty":
        return Reply(err.status, b"", None, headers)
    if err.kind == "html":
        return Reply(err.status, html_page(err.status, err.message), "text/html; charset=utf-8", headers)
    if err.kind == "raw":
        return Reply(err.status, to_bytes(err.message), "text/plain; charset=utf-8", headers)
    if err.kind == "storage":
        xml = ('<?xml version="1.0" encoding="utf-8"?><Error><Code>%s</Code><Message>%s\nRequestId:%s'
               '\nTime:%s</Message></Error>' % (err.code, err.message, guid_from("req", ctx.seq),
                                               fmt_ticks(ctx.state.clock.now())))
        return Reply(err.status, to_bytes(xml), "application/xml", headers + [("x-ms-error-code", err.code)])
    return Reply(err.status, to_bytes(dumps(error_body(ctx, err))), headers=headers)


_PHRASES = {200: "OK", 201: "Created", 202: "Accepted", 204: "No Content", 400: "Bad Request",
            401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            406: "Not Acceptable", 409: "Conflict", 429: "Too Many Requests",
            500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
            504: "Gateway Timeout"}


def html_page(status, message=""):
    title = "%d %s" % (status, _PHRASES.get(status, "Error"))
    return to_bytes("<!DOCTYPE html>\n<html><head><title>%s</title></head><body><center><h1>%s</h1>"
                    "</center><hr><center>%s</center></body></html>\n"
                    % (title, title, message or "Microsoft-Azure-Application-Gateway/v2"))


# --------------------------------------------------------------------------------------------
# The data endpoint (E4, C.3) and its Dataverse twin (C.7)
# --------------------------------------------------------------------------------------------

_DATA_OPTIONS = {"$select", "$filter", "$orderby", "$top", "$skip", "$skiptoken", "$search",
                 "$expand", "$count", "$format", "$deltatoken"}
_ORDER_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)(?:\s+(asc|desc))?\s*$")


def _nonneg(params, name):
    v = params.get(name)
    if v is None:
        return None
    if not re.fullmatch(r"\d{1,12}", v):
        raise odata_bad_request("Invalid value '%s' for %s query option found. The %s query option "
                                "requires a non-negative integer value." % (v, name, name))
    return int(v)


def parse_select(ent, text):
    if text is None or text.strip() == "*":
        return None
    names = [s.strip() for s in text.split(",")]
    for n in names:
        if n not in ent.types:
            raise odata_bad_request("Could not find a property named '%s' on type '%s'." % (n, ent.name))
    return names


def parse_orderby(ent, text):
    if text is None:
        return []
    out = []
    for item in text.split(","):
        m = _ORDER_RE.match(item)
        if not m:
            raise odata_bad_request("Syntax error in $orderby '%s'." % text)
        if m.group(1) not in ent.types:
            raise odata_bad_request("Could not find a property named '%s' on type '%s'."
                                    % (m.group(1), ent.name))
        out.append((m.group(1), m.group(2) == "desc"))
    return out


def parse_search(text):
    if text is None:
        return None
    t = text.strip()
    if len(t) >= 2 and t[0] == t[-1] == '"':
        t = t[1:-1]
    if not t:
        raise odata_bad_request("The $search query option must not be empty.")
    return t.casefold()


def parse_expand(inst, ent, text, search, select):
    """$expand names related entities that carry the profile's key (UnifiedActivity,
    Customer_Measure, ...).  Only on profiles, and not with $search or a partial $select."""
    if text is None:
        return []
    if ent.entity_type != "profile" or ent.key_attr is None:
        raise odata_bad_request("$expand is only supported on the Customer (profile) entity.")
    if search is not None:
        raise odata_bad_request("$expand cannot be combined with $search.")
    if select is not None:
        raise odata_bad_request("$expand cannot be combined with a partial $select.")
    out = []
    for name in (s.strip() for s in text.split(",")):
        rel = inst.entities.get(name)
        if rel is None or rel is ent or ent.key_attr not in rel.types:
            raise odata_bad_request("Could not find a navigation property named '%s' on type '%s'."
                                    % (name, ent.name))
        out.append(rel)
    return out


def _sort_value(dtype):
    conv = _comparable(dtype)

    def key(v):
        c = conv(v)
        if c is not None:
            return (1, c)
        return (0,) if v is None else (2, str(v))      # nulls first, misfits last
    return key


def result_indices(state, inst, ent, rowset, cf, filt_text, term, order):
    """Row indices after $filter and $search, in $orderby order (ties: insertion order).

    Cached per RowSet version: a client paging through a sorted 1,000,000-row entity pays for
    the sort once, not once per page."""
    def compute():
        n = len(rowset)
        if cf is None and term is None:
            idx = range(n)
        else:
            search_attrs = [a for a, t in ent.types.items() if t == "Edm.String"]
            if cf is not None and cf.key_values is not None:
                found = {rowset.index_of(ent.key_attr, v) for v in cf.key_values}
                candidates = ((i, rowset.row(i)) for i in sorted(found - {None}))
            else:
                candidates = enumerate(rowset.rows(0, n))
            idx = array("q")
            for i, row in candidates:
                if cf is not None and not cf.match(row):
                    continue
                if term is not None and not any(isinstance(row.get(a), str) and term in row[a].casefold()
                                                 for a in search_attrs):
                    continue
                idx.append(i)
        if not order:
            return idx
        positions = list(range(len(idx)))
        gen_key = (len(order) == 1 and rowset.all_generated() and rowset.parts
                   and order[0][0] == rowset.parts[0].gen.KEY)
        if gen_key:
            def value(i):
                part, j = rowset._locate(i)
                return part.gen.key_sort_value(part.start + j)
            vals = [[value(i) for i in idx]]
        else:
            rows = [rowset.row(i) for i in idx] if not isinstance(idx, range) else list(rowset.rows(0, n))
            vals = []
            for attr, _ in order:
                sk = _sort_value(ent.types[attr])
                vals.append([sk(r.get(attr)) for r in rows])
        for k in range(len(order) - 1, -1, -1):      # stable sorts, last key first
            col = vals[k]
            positions.sort(key=col.__getitem__, reverse=order[k][1])
        return array("q", (idx[p] for p in positions))

    key = ("idx", ent.name, rowset.version, inst.seg_version, filt_text, term, tuple(order))
    return state.cached(key, compute)


def related_index(state, rel, rowset, attr):
    def compute():
        index = {}
        for i, r in enumerate(rowset.rows(0, len(rowset))):
            try:
                index.setdefault(r.get(attr), []).append(i)
            except TypeError:
                pass
        return index
    return state.cached(("rel", rel.name, rowset.version, attr), compute)


def _mac(payload):
    return hmac.new(SIGNING_KEY, payload.encode(), hashlib.sha256).hexdigest()[:16]


def query_hash(ent, params):
    items = sorted((k, v) for k, v in params.items() if k.startswith("$") and k not in ("$skip", "$skiptoken"))
    return hashlib.sha256(dumps([ent.name, items]).encode()).hexdigest()[:12]


def make_ci_token(offset, size, qhash):
    payload = "o=%d;n=%d;q=%s" % (offset, size, qhash)
    return payload + ";m=" + _mac(payload)


def read_ci_token(token, qhash):
    m = re.fullmatch(r"o=(\d+);n=(\d+);q=([0-9a-f]{12});m=([0-9a-f]{16})", token)
    if not m or not hmac.compare_digest(m.group(4), _mac(token.rsplit(";m=", 1)[0])):
        raise ApiError(400, "InvalidSkipToken", "The $skiptoken value is invalid.", "odata")
    if m.group(3) != qhash:
        raise ApiError(400, "InvalidSkipToken", "The $skiptoken does not belong to this query.", "odata")
    return int(m.group(1)), int(m.group(2))


def make_dv_token(offset, size, qhash, page):
    """A Dataverse-like paging cookie; its pagingcookie attribute is percent-encoded inside the
    token, and the whole token again in the link: doubly encoded, like the real service's."""
    inner = '<cookie page="%d"><pos offset="%d" size="%d" q="%s" /></cookie>' % (page, offset, size, qhash)
    inner = inner[:-len(" /></cookie>")] + ' m="%s" /></cookie>' % _mac(inner)
    return '<cookie pagenumber="%d" pagingcookie="%s" istracking="False" />' % (
        page + 1, urllib.parse.quote(inner, safe=""))


def read_dv_token(token, qhash):
    bad = ApiError(400, "0x80040203", "Invalid $skiptoken paging cookie.", "odata")
    m = re.fullmatch(r'<cookie pagenumber="(\d+)" pagingcookie="([^"]*)" istracking="False" />', token)
    if not m:
        raise bad
    inner = urllib.parse.unquote(m.group(2))
    p = re.fullmatch(r'<cookie page="(\d+)"><pos offset="(\d+)" size="(\d+)" q="([0-9a-f]{12})" '
                     r'm="([0-9a-f]{16})" /></cookie>', inner)
    if not p:
        raise bad
    unsigned = inner.replace(' m="%s"' % p.group(5), "")
    if not hmac.compare_digest(p.group(5), _mac(unsigned)) or p.group(4) != qhash:
        raise bad
    return int(p.group(2)), int(p.group(3)), int(p.group(1))


def kept_query(raw_query, from_path_pairs=None):
    """The request's query without $skip/$skiptoken, verbatim (a nextLink "keeps the options")."""
    if from_path_pairs is not None:
        parts = ["%s=%s" % (urllib.parse.quote(k, safe="$"), urllib.parse.quote(v, safe="$,'()*:@/"))
                 for k, v in from_path_pairs]
    else:
        parts = [p for p in raw_query.split("&") if p]
    return [p for p in parts
            if urllib.parse.unquote_plus(p.split("=", 1)[0]) not in ("$skip", "$skiptoken")]


class DataQuery:
    """One GET of /data/{entity} (or a Dataverse entity set): parse, evaluate, page, encode."""

    def __init__(self, ctx, inst, ent, raw_query, from_path):
        self.ctx, self.inst, self.ent = ctx, inst, ent
        self.state = ctx.state
        self.settings = ctx.state.settings
        self.raw_query = raw_query
        self.pairs, self.params, dup = parse_query(raw_query)
        self.from_path_pairs = self.pairs if from_path else None
        if dup:
            raise odata_bad_request("Query option '%s' was specified more than once." % dup[0])
        for k in self.params:
            if k.startswith("$") and k not in _DATA_OPTIONS:
                raise odata_bad_request("The query parameter '%s' is not supported." % k)
        self.dataverse = self.settings["flavor"] == "dataverse"

    def evaluate(self):
        p, ent = self.params, self.ent
        filt, search = p.get("$filter"), p.get("$search")
        if ent.is_source and not self.dataverse:
            if filt is not None:
                raise odata_bad_request("$filter is not supported on the source entity '%s'; it "
                                        "works only on system entities." % ent.name)
            if search is not None:
                raise odata_bad_request("$search is not supported on the source entity '%s'." % ent.name)
        if self.dataverse and search is not None:
            raise odata_bad_request("The query parameter $search is not supported.")
        self.select = parse_select(ent, p.get("$select"))
        self.expand = parse_expand(self.inst, ent, p.get("$expand"), search, self.select)
        self.order = parse_orderby(ent, p.get("$orderby"))
        self.term = parse_search(search)
        count = p.get("$count")
        if count is not None and count.lower() not in ("true", "false"):
            raise odata_bad_request("Invalid value '%s' for $count query option found." % count)
        self.want_count = count is not None and count.lower() == "true"
        cf = CompiledFilter(filt, ent, self.inst.members) if filt is not None else None
        self.plain = cf is None and self.term is None     # no row is picked by a condition
        self.rowset = self.inst.rows_of(ent)
        self.idx = result_indices(self.state, self.inst, ent, self.rowset, cf, filt, self.term, self.order)
        self.qhash = query_hash(ent, p)

    def page_rows(self, offset, size):
        """The page's rows as JSON object texts."""
        sl = self.idx[offset:offset + size]
        as_strings = self.settings["numbers_as_strings"]
        enc = RowEncoder(self.ent, as_strings)
        if self.select is None and not self.expand and not as_strings:
            if isinstance(sl, range):
                return self.rowset.rows_json(sl.start, sl.stop, enc)
            return [self.rowset.row_json(i, enc) for i in sl]
        if isinstance(sl, range):
            rows = self.rowset.rows(sl.start, sl.stop)
        else:
            rows = (self.rowset.row(i) for i in sl)
        rels = [(rel, RowEncoder(rel, as_strings), self.inst.rows_of(rel)) for rel in self.expand]
        key = self.ent.key_attr
        out = []
        for r in rows:
            extra = []
            for rel, renc, rrs in rels:
                index = related_index(self.state, rel, rrs, key)
                extra.append((rel.name, "[" + ",".join(renc.encode(rrs.row(i))
                                                       for i in index.get(r.get(key), [])) + "]"))
            out.append(enc.encode(r, self.select, extra))
        return out

    def page_value(self, offset, size):
        """The page's "value" array as (UTF-8 bytes, row count).  Whole rows of an unfiltered
        query (ciflow's pull, a paging client) are rendered once (State.rendered_page); the
        key holds everything the bytes depend on: the rows (RowSet version), the attributes
        and their types (encoding and sort order), $orderby and the slice."""
        def compute():
            rows = self.page_rows(offset, size)
            return to_bytes("[" + ",".join(rows) + "]"), len(rows)
        if not (self.plain and self.select is None and not self.expand
                and not self.settings["numbers_as_strings"]):
            return compute()
        key = (self.rowset.version, tuple(self.ent.types.items()), tuple(self.order), offset, size)
        return self.state.rendered_page(key, compute)

    def context_url(self):
        if self.dataverse:
            return "%s%s/$metadata#%s" % (self.ctx.root, DV_PREFIX, self.ent.entity_set)
        sel = "(%s)" % ",".join(self.select) if self.select else ""
        return "%s%s/instances/%s/data/$metadata#%s%s" % (self.ctx.root, CI_PREFIX, self.inst.id,
                                                         self.ent.name, sel)

    def respond(self, body, rows, headers=None):
        """body: the annotations in order, with "value" standing where the rows go; rows: the
        rows' JSON texts, or (bytes of the whole array, row count) from page_value."""
        if isinstance(rows, list):
            rows = to_bytes("[" + ",".join(rows) + "]"), len(rows)
        value, count = rows
        # Encoded piece by piece: UTF-8 of a concatenation is the concatenation of the pieces'.
        parts = [to_bytes(_json_str(k) + ":") + value if k == "value"
                 else to_bytes(_json_str(k) + ":" + json_value(v)) for k, v in body.items()]
        return Reply(200, b"{" + b",".join(parts) + b"}",
                     "application/json; odata.metadata=minimal; odata.streaming=true; "
                     "IEEE754Compatible=%s; charset=utf-8"
                     % ("true" if self.settings["numbers_as_strings"] else "false"),
                     [("OData-Version", "4.0")] + (headers or []), rows=count)

    def ci_page(self):
        if "$deltatoken" in self.params:
            raise odata_bad_request("The query parameter '$deltatoken' is not supported.")
        self.evaluate()
        p = self.params
        token = p.get("$skiptoken")
        if token is not None:
            offset, size = read_ci_token(token, self.qhash)
        else:
            offset = _nonneg(p, "$skip") or 0
            top = _nonneg(p, "$top")
            size = min(self.settings["default_page"] if top is None else top, self.settings["max_top"])
        total = len(self.idx)
        rows = self.page_value(offset, size)
        body = {"@odata.context": self.context_url()}
        mode = self.settings["count"]
        if mode == "always" or (mode == "request" and self.want_count):
            body["@odata.count"] = total
        body["value"] = None
        nl = self.settings["nextlink"]
        if nl != "off" and size > 0 and offset + rows[1] < total:
            q = kept_query(self.raw_query, self.from_path_pairs)
            token = make_ci_token(offset + rows[1], size, self.qhash)
            q.append("$skiptoken=" + urllib.parse.quote(token, safe=""))
            name = urllib.parse.quote(self.ent.name, safe="")
            rooted = "%s/instances/%s/data/%s" % (CI_PREFIX, self.inst.id, name)
            link = {"absolute": self.ctx.link_root + rooted, "rooted": rooted, "relative": name}[nl]
            body["@odata.nextLink"] = link + "?" + "&".join(q)
        return self.respond(body, rows)

    def dv_page(self):
        p = self.params
        if "$skip" in p:
            raise ApiError(400, "0x80060888", "The query parameter $skip is not supported.", "odata")
        prefer = self.ctx.headers.get("Prefer", "")
        track = "odata.track-changes" in prefer and self.ent.change_tracking and self.ent.key_attr
        if track or "$deltatoken" in p:
            extra = [k for k in p if k.startswith("$") and k not in ("$select", "$skiptoken", "$deltatoken")]
            if extra:
                raise ApiError(400, "0x80040203", "Change tracking supports only $select (found %s)."
                               % ", ".join(extra), "odata")
        if "$deltatoken" in p:
            return self.dv_delta(p["$deltatoken"])
        self.evaluate()
        m = re.search(r"odata\.maxpagesize\s*=\s*(\d+)", prefer)
        limit = self.settings["dataverse_max_page"]
        size = min(int(m.group(1)), limit) if m and int(m.group(1)) > 0 else limit
        applied = (["odata.maxpagesize=%d" % size] if m else []) + (["odata.track-changes"] if track else [])
        headers = [("Preference-Applied", ", ".join(applied))] if applied else []
        top = _nonneg(p, "$top")
        total = len(self.idx)
        page = 1
        if top is not None:                 # $top caps the total: one page, never a link
            offset, size = 0, min(top, limit)
        elif p.get("$skiptoken") is not None:
            offset, size, page = read_dv_token(p["$skiptoken"], self.qhash)
            page += 1
        else:
            offset = 0
        rows = self.page_rows(offset, size)
        body = {"@odata.context": self.context_url()}
        if self.want_count:
            body["@odata.count"] = total
        body["value"] = None
        if top is None and offset + len(rows) < total and size > 0:
            q = kept_query(self.raw_query)
            q.append("$skiptoken=" + urllib.parse.quote(
                make_dv_token(offset + len(rows), size, self.qhash, page), safe="="))
            body["@odata.nextLink"] = "%s%s/%s?%s" % (self.ctx.link_root, DV_PREFIX,
                                                      urllib.parse.quote(self.ent.entity_set, safe=""),
                                                      "&".join(q))
        elif track:
            body["@odata.deltaLink"] = self.delta_link()
        return self.respond(body, rows, headers)

    def delta_link(self):
        """A link to the changes made from now on: $deltatoken = change number!time!MAC."""
        cv = next(_change_numbers)
        stamp = time.strftime("%m/%d/%Y %H:%M:%S", time.gmtime(self.state.clock.now() // TICKS))
        payload = "%d!%s" % (cv, stamp)
        token = "%s!%s" % (payload, _mac(payload + "!" + self.delta_hash()))
        q = [x for x in kept_query(self.raw_query)
             if urllib.parse.unquote_plus(x.split("=", 1)[0]) not in ("$deltatoken",)]
        q.append("$deltatoken=" + urllib.parse.quote(token, safe=""))
        return "%s%s/%s?%s" % (self.ctx.link_root, DV_PREFIX,
                               urllib.parse.quote(self.ent.entity_set, safe=""), "&".join(q))

    def delta_hash(self):
        return hashlib.sha256(dumps([self.ent.name, self.params.get("$select")]).encode()).hexdigest()[:12]

    def dv_delta(self, token):
        """The rows changed since the token (current values) and the deleted keys, in change
        order, then a new delta link.  All in one page."""
        m = re.fullmatch(r"(\d+)!(\d\d/\d\d/\d{4} \d\d:\d\d:\d\d)!([0-9a-f]{16})", token)
        if not m or not hmac.compare_digest(m.group(3), _mac("%s!%s!%s" % (m.group(1), m.group(2),
                                                                             self.delta_hash()))):
            raise ApiError(400, "0x80040203", "Invalid $deltatoken.", "odata")
        since = int(m.group(1))
        ent = self.ent
        if since < ent.tracking_floor or not ent.key_attr:
            raise ApiError(400, "0x80044352", "The $deltatoken has expired; retrieve all records again.",
                           "odata")
        self.select = parse_select(ent, self.params.get("$select"))
        latest = collections.OrderedDict()
        for cv, op, key in ent.changes:
            if cv > since:
                latest.pop(key, None)
                latest[key] = op
        rowset = ent.rows
        enc = RowEncoder(ent, self.settings["numbers_as_strings"])
        gone = "%s%s/$metadata#%s/$deletedEntity" % (self.ctx.root, DV_PREFIX, ent.entity_set)
        out = []
        for key, op in latest.items():
            idx = rowset.index_of(ent.key_attr, key) if op == "upsert" else None
            if idx is None:
                out.append(dumps({"@odata.context": gone, "id": key, "reason": "deleted"}))
            else:
                out.append(enc.encode(rowset.row(idx), self.select))
        body = {"@odata.context": "%s%s/$metadata#%s/$delta" % (self.ctx.root, DV_PREFIX, ent.entity_set),
                "value": None, "@odata.deltaLink": self.delta_link()}
        return self.respond(body, out, [("Preference-Applied", "odata.track-changes")])


# --------------------------------------------------------------------------------------------
# Partitions (E5): CSV files behind HMAC-signed /_files/ URLs, no CI credentials needed
# --------------------------------------------------------------------------------------------

def partition_ranges(state, rowset):
    n, per = len(rowset), state.settings["partition_rows"]
    return [(k, k * per, min(n, (k + 1) * per)) for k in range((n + per - 1) // per)]


def _file_sig(inst_id, name, part, se):
    msg = "%s\n%s\n%d\n%s" % (inst_id, name, part, se)
    return base64.b64encode(hmac.new(SIGNING_KEY, msg.encode(), hashlib.sha256).digest()).decode()


def signed_file_url(ctx, inst, ent, part):
    se = fmt_sas_time(ctx.state.clock.now() + ctx.state.settings["sas_ttl"] * TICKS)
    return "%s/_files/%s/%s/part-%d.csv?sv=2020-04-08&sr=b&sp=r&se=%s&sig=%s" % (
        ctx.files_root, urllib.parse.quote(inst.id, safe=""), urllib.parse.quote(ent.name, safe=""), part,
        urllib.parse.quote(se, safe=""), urllib.parse.quote(_file_sig(inst.id, ent.name, part, se), safe=""))


def partition_csv(state, ent, rowset, start, stop):
    names = [a["name"] for a in ent.attributes]
    head = csv_line({n: n for n in names}, names) if state.settings["csv_header"] else ""
    return head + "".join(csv_line(r, names) for r in rowset.rows(start, stop))


def entity_size(state, ent, rowset):
    """CSV byte size: exact for literal rows, estimated from the first 100 for generated ones."""
    def compute():
        names = [a["name"] for a in ent.attributes]
        n = len(rowset)
        if rowset.all_generated() and n > 100:
            sample = sum(len(to_bytes(csv_line(r, names))) for r in rowset.rows(0, 100))
            return sample * n // 100
        return sum(len(to_bytes(csv_line(r, names))) for r in rowset.rows(0, n))
    return state.cached(("size", ent.name, rowset.version, tuple(ent.types)), compute)


# --------------------------------------------------------------------------------------------
# API handlers.  Each takes the Ctx and the route's captures and returns a Reply or raises
# ApiError.  JSON shapes follow part A of the contract.
# --------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------
# CSDL $metadata (A.7, C.7): built from the instance's entities.  customer_insights names its
# types by namespace, dataverse by its alias (mscrm), so that readers must resolve both.  An
# attribute's dataType that is neither Edm.* nor Collection(...) is a complex type of the
# schema (declared open, with no properties of its own).  "baseEntity" in an entity's spec
# makes its type derive from that entity's type: the attributes the base has are declared
# there only, and so is the key.  Dataverse types all derive, at the root, from the abstract
# mscrm.crmbaseentity, and each lookup _x_value has a navigation property x.
# --------------------------------------------------------------------------------------------

CSDL_NS = {"customer_insights": ("Microsoft.Dynamics.CI", "ci"),
           "dataverse": ("Microsoft.Dynamics.CRM", "mscrm")}


def csdl_type_name(ent, flavor):
    return ent.name.lower() if flavor == "dataverse" else ent.name


def csdl_document(inst, flavor):
    from xml.sax.saxutils import quoteattr as q
    namespace, alias = CSDL_NS[flavor]
    ref = alias if flavor == "dataverse" else namespace     # how types are named in the document
    ents = list(inst.entities.values())
    by_name = {e.name: e for e in ents}
    complex_types, out = [], []

    def type_ref(dtype):
        inner = dtype[11:-1] if dtype.startswith("Collection(") and dtype.endswith(")") else dtype
        if inner.startswith("Edm.") or "." in inner:
            return dtype
        if inner not in complex_types:
            complex_types.append(inner)
        return dtype.replace(inner, "%s.%s" % (ref, inner))

    for ent in ents:
        base = by_name.get(getattr(ent, "base_entity", None) or "")
        base_attrs = set(base.types) if base is not None else set()
        head = "<EntityType Name=%s" % q(csdl_type_name(ent, flavor))
        if base is not None:
            head += " BaseType=%s" % q("%s.%s" % (ref, csdl_type_name(base, flavor)))
        elif flavor == "dataverse":
            head += " BaseType=%s" % q(ref + ".crmbaseentity")
        out.append(head + ">")
        if base is None and ent.keys:
            out.append("<Key>%s</Key>" % "".join("<PropertyRef Name=%s/>" % q(k) for k in ent.keys[0]))
        keyset = set(ent.keys[0]) if ent.keys else set()
        for a in ent.attributes:
            if a["name"] in base_attrs:
                continue
            prop = "<Property Name=%s Type=%s" % (q(a["name"]), q(type_ref(a["dataType"])))
            if a["name"] in keyset or a.get("nullable") is False:
                prop += ' Nullable="false"'
            out.append(prop + "/>")
        for a in ent.attributes:
            m = re.fullmatch(r"_(\w+)_value", a["name"])
            if flavor == "dataverse" and m and a["name"] not in base_attrs:
                out.append("<NavigationProperty Name=%s Type=%s/>" % (q(m.group(1)),
                                                                      q(ref + ".crmbaseentity")))
        if flavor == "customer_insights" and ent.entity_type == "profile" and ent.key_attr:
            for rel in ents:
                if rel is not ent and ent.key_attr in rel.types:
                    out.append("<NavigationProperty Name=%s Type=%s/>"
                               % (q(rel.name), q("Collection(%s.%s)" % (ref, rel.name))))
        out.append("</EntityType>")
    if flavor == "dataverse":
        out.insert(0, '<EntityType Name="crmbaseentity" Abstract="true"/>')
    for c in complex_types:
        out.append('<ComplexType Name=%s OpenType="true"/>' % q(c))
    container = ["<EntityContainer Name=%s>" % q("System" if flavor == "dataverse" else "Data")]
    for ent in ents:
        container.append("<EntitySet Name=%s EntityType=%s/>"
                         % (q(ent.entity_set if flavor == "dataverse" else ent.name),
                            q("%s.%s" % (ref, csdl_type_name(ent, flavor)))))
    container.append("</EntityContainer>")
    return ('<?xml version="1.0" encoding="utf-8"?>\n'
            '<edmx:Edmx Version="4.0" xmlns:edmx="http://docs.oasis-open.org/odata/ns/edmx">'
            '<edmx:DataServices>'
            '<Schema Namespace=%s Alias=%s xmlns="http://docs.oasis-open.org/odata/ns/edm">%s%s'
            '</Schema></edmx:DataServices></edmx:Edmx>\n'
            % (q(namespace), q(alias), "\n".join(out), "\n".join(container)))


def csdl_reply(inst, flavor):
    return Reply(200, to_bytes(csdl_document(inst, flavor)), "application/xml; charset=utf-8",
                 [("OData-Version", "4.0")])


class Api:
    def __init__(self, ctx):
        self.ctx = ctx
        self.state = ctx.state

    def ts(self, ticks):
        return fmt_ticks(ticks)

    # E1, E2, E3 --------------------------------------------------------------------------------

    def instances(self):
        return json_reply(200, [{"instanceId": i.id, "name": i.name, "instanceType": i.instance_type}
                                for i in self.state.instances.values()])

    def entity_json(self, inst, ent):
        rowset = inst.rows_of(ent)
        return {
            "qualifiedEntityName": ent.name,
            "dataSourceName": ent.data_source,
            "entityType": ent.entity_type,
            "refreshTime": self.ts(ent.refresh_time),
            "attributes": [{"name": a["name"], "dataType": a["dataType"],
                            "searchProperties": a.get("searchProperties")} for a in ent.attributes],
            "keys": [[{"name": a} for a in k] for k in ent.keys],
            "incrementalAttribute": ent.incremental,
            "partitions": [{"name": "part-%d" % k, "location": signed_file_url(self.ctx, inst, ent, k),
                            "refreshTime": self.ts(ent.refresh_time), "forceSasAuth": False,
                            "hasHeader": self.state.settings["csv_header"]}
                           for k, _, _ in partition_ranges(self.state, rowset)],
        }

    def entities(self, i):
        inst = self.state.instance(i)
        return json_reply(200, {"instanceId": inst.id,
                                "entities": [self.entity_json(inst, e) for e in inst.entities.values()]})

    def entity(self, i, name):
        inst = self.state.instance(i)
        return json_reply(200, self.entity_json(inst, inst.entity(name)))

    def entitysize(self, i, name):
        inst = self.state.instance(i)
        ent = inst.entity(name)
        rowset = inst.rows_of(ent)
        return json_reply(200, {"qualifiedEntityName": ent.name,
                                "size": entity_size(self.state, ent, rowset), "rowCount": len(rowset)})

    # E4, E5, E10 -------------------------------------------------------------------------------

    def data(self, i, seg):
        self.ctx.error_kind = "odata"
        inst = self.state.instance(i)
        raw_query, from_path = self.ctx.raw_query, False
        if "?" in seg:                  # the query was encoded into the path: Customer%3F%24filter...
            seg, _, inner = seg.partition("?")
            raw_query = inner + ("&" + raw_query if raw_query else "")
            from_path = True
        ent = self.data_entity(inst, seg)
        q = DataQuery(self.ctx, inst, ent, raw_query, from_path)
        if q.params.get("proxy", "").lower() == "true":
            return self.proxy(inst, ent, q.params)
        return q.ci_page()

    def data_entity(self, inst, name):
        ent = inst.entities.get(name)
        if ent is None:
            raise ApiError(404, "EntityNotFound", "Entity '%s' was not found." % name, "odata")
        return ent

    def proxy(self, inst, ent, params):
        extra = [k for k in params if k.startswith("$") and k != "$select"]
        if extra or params.get("$select", "*").strip() != "*":
            raise odata_bad_request("proxy=true returns whole partitions; only $select=* may be given "
                                    "(found %s)." % ", ".join(extra or ["$select"]))
        rowset = inst.rows_of(ent)
        reqs = [{"uri": signed_file_url(self.ctx, inst, ent, k), "headers": {"x-ms-version": "2020-04-08"}}
                for k, _, _ in partition_ranges(self.state, rowset)]
        return json_reply(200, {"httpRequests": reqs})

    def _write_body(self, ent):
        try:
            doc = load_json_text(self.ctx.body.decode("utf-8") or "null")
        except (UnicodeDecodeError, ValueError):
            raise odata_bad_request("The request body is not valid JSON.") from None
        if not isinstance(doc, dict):
            raise odata_bad_request("The request body must be a JSON object.")
        unknown = sorted(set(doc) - set(ent.types))
        if unknown:
            raise odata_bad_request("Could not find a property named '%s' on type '%s'."
                                    % (unknown[0], ent.name))
        return {k: coerce_value(v, ent.types[k]) for k, v in doc.items()}

    def write(self, i, name):
        """E10 POST: a profile is updated (never created); other entities get a new row."""
        self.ctx.error_kind = "odata"
        inst = self.state.instance(i)
        ent = self.data_entity(inst, name)
        valid = self.ctx.params.get("validUntil")
        if valid is not None:
            try:
                until = parse_ticks(valid)
            except ValueError:
                raise odata_bad_request("validUntil must be an RFC 3339 timestamp.") from None
            if until > self.state.clock.now() + 30 * 86400 * TICKS:
                raise odata_bad_request("validUntil must be at most 30 days in the future.")
        if ent.segment is not None or ent.key_attr is None:
            raise odata_bad_request("Entity '%s' does not accept real-time writes." % name)
        doc = self._write_body(ent)
        key = doc.get(ent.key_attr)
        if key is None:
            raise odata_bad_request("The document must contain the key '%s'." % ent.key_attr)
        with self.state.lock:
            rowset = ent.rows
            idx = rowset.index_of(ent.key_attr, key)
            if ent.entity_type == "profile":
                if idx is None:
                    raise ApiError(404, "NotFound", "Profile '%s' was not found; real-time writes can "
                                   "update profiles, not create them." % key, "odata")
                row = rowset.row(idx)
                row.update(doc)
                ent.rows = rowset.with_override(idx, row)
            else:
                if idx is not None:
                    raise ApiError(409, "Conflict", "A row with key '%s' already exists." % key, "odata")
                ent.rows = rowset.appended(ListPart([{a: doc.get(a) for a in ent.types}]))
            ent.track("upsert", key)
        status = self.state.settings["write_status"]
        loc = "%s%s/instances/%s/data/%s/%s" % (self.ctx.root, CI_PREFIX, inst.id,
                                                urllib.parse.quote(ent.name, safe=""),
                                                urllib.parse.quote(str(key), safe=""))
        return json_reply(status, {"location": loc, "statusCode": status}, headers=[("Location", loc)])

    def patch(self, i, name, key):
        self.ctx.error_kind = "odata"
        inst = self.state.instance(i)
        ent = self.data_entity(inst, name)
        if ent.segment is not None or ent.key_attr is None:
            raise odata_bad_request("Entity '%s' does not accept real-time writes." % name)
        doc = self._write_body(ent)
        with self.state.lock:
            rowset = ent.rows
            idx = rowset.index_of(ent.key_attr, key)
            if idx is None and ent.types[ent.key_attr] in INT_TYPES and re.fullmatch(r"-?\d+", key):
                idx = rowset.index_of(ent.key_attr, int(key))
            if idx is None:
                raise ApiError(404, "NotFound", "No row with key '%s' in '%s'." % (key, name), "odata")
            row = rowset.row(idx)
            if ent.key_attr in doc and doc[ent.key_attr] != row[ent.key_attr]:
                raise odata_bad_request("The key '%s' cannot be changed." % ent.key_attr)
            row.update(doc)
            ent.rows = rowset.with_override(idx, row)
            ent.track("upsert", row[ent.key_attr])
        return Reply(204, b"", None)

    # E6 ---------------------------------------------------------------------------------------

    def ds_json(self, inst, ds, include_model):
        meta = {k: v for k, v in ds.items() if not k.startswith("_")}
        meta["refreshState"] = self.ctx.enum(ds["refreshState"])
        meta["lastRefresh"] = self.ts(ds["lastRefresh"])
        model = None
        if include_model:
            model = {"name": ds["name"], "entities": [
                {"name": e.name, "attributes": [{"name": a["name"], "dataType": a["dataType"]}
                                                for a in e.attributes]}
                for e in inst.entities.values() if e.data_source == ds["name"]]}
        return {"dataSourceMetadata": meta, "model": model}

    def _include_model(self):
        return self.ctx.params.get("includeModel", "true").lower() != "false"

    def datasources(self, i):
        inst = self.state.instance(i)
        model = self._include_model()
        return json_reply(200, [self.ds_json(inst, d, model) for d in inst.datasources.values()])

    def datasource(self, i, ds_id):
        inst = self.state.instance(i)
        ds = inst.datasources.get(ds_id)
        if ds is None:
            raise ApiError(404, "DataSourceNotFound", "Data source '%s' was not found." % ds_id)
        return json_reply(200, self.ds_json(inst, ds, self._include_model()))

    # E7 ---------------------------------------------------------------------------------------

    def _workflow(self, i, w):
        inst = self.state.instance(i)
        if w != "main":
            raise ApiError(404, "WorkflowNotFound", "Workflow '%s' was not found; only 'main' exists." % w)
        return inst

    def job_json(self, job, tasks=True):
        e = self.ctx.enum
        out = {"jobId": job.id, "jobType": e(job.job_type), "jobSubmissionKind": e(job.kind),
               "jobStatus": e(job.status), "operationType": e(job.operation),
               "submittedTimestamp": self.ts(job.submitted), "endTimestamp": self.ts(job.end)}
        if job.identifiers:
            out["identifiers"] = job.identifiers
        if tasks:
            out["tasks"] = [{"taskId": t["taskId"], "taskStatus": e(t["taskStatus"]),
                             "operationType": e(t["operationType"]), "identifier": t["identifier"],
                             "endTimestamp": self.ts(t["end"]), "ciErrors": t["ciErrors"]}
                            for t in job.tasks]
        return out

    def jobs(self, i, w):
        inst = self._workflow(i, w)
        top = self.ctx.params.get("top", self.ctx.params.get("$top", "10"))
        if not re.fullmatch(r"\d{1,9}", top) or int(top) < 1:
            raise ApiError(400, "InvalidParameter", "top must be a positive integer.")
        tasks = self.ctx.params.get("includeTasks", "false").lower() == "true"
        jobs = inst.jobs_newest_first()[:int(top)]
        return json_reply(200, [self.job_json(j, tasks) for j in jobs])

    def job(self, i, w, job_id):
        inst = self._workflow(i, w)
        return json_reply(200, self.job_json(inst.job(job_id)))

    def submit(self, i, w):
        inst = self._workflow(i, w)
        p = self.ctx.params
        op = p.get("operationType")
        if not op:
            raise ApiError(400, "InvalidParameter", "operationType is required.")
        op = canon(op, OPERATIONS)
        if op not in OPERATIONS:
            raise ApiError(400, "InvalidParameter", "Unknown operationType '%s'." % p["operationType"])
        ids = None
        if p.get("identifiers"):
            ids = [x.strip().strip("'\"") for x in p["identifiers"].split(",") if x.strip()]
        force = p.get("forceRunRequested", "false").lower() == "true"
        with self.state.lock:
            job = inst.submit_job(op, "onDemand", ids,
                                  job_type="full" if (force or op == "all") else "incremental")
        return json_reply(200, self.job_json(job))

    def cancel(self, i, w, job_id):
        inst = self._workflow(i, w)
        with self.state.lock:
            job = inst.job(job_id)
            inst.cancel_job(job, self.state.clock.now())
        return json_reply(200, self.job_json(job))

    def status(self, i, w):
        inst = self._workflow(i, w)
        e = self.ctx.enum
        return json_reply(200, [{"operationType": e(n["operationType"]), "identifier": n["identifier"],
                                 "taskStatus": e(n["taskStatus"]), "endTimestamp": self.ts(n["endTimestamp"]),
                                 "lastSuccessfulTimestamp": self.ts(n["lastSuccessfulTimestamp"])}
                                for n in inst.nodes.values()])

    # E8, E9 -----------------------------------------------------------------------------------

    def segments(self, i):
        inst = self.state.instance(i)
        e = self.ctx.enum
        out = []
        for s in inst.segments.values():
            ev = s["evaluationStatus"]
            out.append({"name": s["name"], "friendlyName": s.get("friendlyName"), "state": e(s["state"]),
                        "evaluationStatus": {"jobStatus": e(ev["jobStatus"]),
                                             "evaluationDate": self.ts(ev["evaluationDate"]),
                                             "entityCount": ev["entityCount"], "error": ev["error"]}})
        return json_reply(200, out)

    def measure_json(self, m):
        le, out = m["latestEvaluation"], m["output"]
        return {"name": m["name"], "friendlyName": m.get("friendlyName"), "definition": m["definition"],
                "latestEvaluation": {"state": self.ctx.enum(le["state"]), "endTime": self.ts(le["endTime"])},
                "output": {"values": out["values"], "evaluationTime": self.ts(out["evaluationTime"])}}

    def measures(self, i):
        inst = self.state.instance(i)
        return json_reply(200, [self.measure_json(m) for m in inst.measures.values()])

    def measure(self, i, name):
        inst = self.state.instance(i)
        m = inst.measures.get(name)
        if m is None:
            raise ApiError(404, "MeasureNotFound", "Measure '%s' was not found." % name)
        return json_reply(200, self.measure_json(m))

    # Token endpoint (A.2) --------------------------------------------------------------------

    def token(self, tenant):
        self.ctx.error_kind = "entra"
        st = self.state

        def entra(status, code, aadsts, text):
            return ApiError(status, code, "AADSTS%d: %s" % (aadsts, text), "entra")
        if tenant.lower() != st.tenant.lower():
            raise entra(400, "invalid_request", 90002, "Tenant '%s' not found. Check to make sure you "
                        "have the correct tenant ID and are signing into the correct cloud." % tenant)
        form = dict(urllib.parse.parse_qsl(self.ctx.body.decode("utf-8", "replace"), keep_blank_values=True))
        auth = self.ctx.headers.get("Authorization", "")
        if auth.lower().startswith("basic "):       # RFC 6749 client_secret_basic
            try:
                cid, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
                form.setdefault("client_id", urllib.parse.unquote_plus(cid))
                form.setdefault("client_secret", urllib.parse.unquote_plus(secret))
            except (ValueError, UnicodeDecodeError):
                pass
        if form.get("grant_type") != "client_credentials":
            raise entra(400, "unsupported_grant_type", 70003, "The app requested an unsupported grant "
                        "type '%s'." % form.get("grant_type", ""))
        cid = form.get("client_id")
        self.ctx.client = cid
        if not cid:
            raise entra(400, "invalid_request", 900144, "The request body must contain the following "
                        "parameter: 'client_id'.")
        if cid not in st.clients:
            raise entra(401, "invalid_client", 700016, "Application with identifier '%s' was not found "
                        "in the directory '%s'." % (cid, tenant))
        if form.get("client_secret") != st.clients[cid]:
            raise entra(401, "invalid_client", 7000215, "Invalid client secret provided. Ensure the "
                        "secret being sent in the request is the client secret value, not the client "
                        "secret ID, for a secret added to app '%s'." % cid)
        scope = form.get("scope", "")
        if scope not in self.valid_scopes():
            raise entra(400, "invalid_scope", 70011, "The provided request must include a 'scope' input "
                        "parameter. The provided value for the input parameter 'scope' is not valid: "
                        "'%s'." % scope)
        ttl = st.settings["token_ttl"]
        with st.lock:
            n = next(st.token_counter)
            claims = base64.urlsafe_b64encode(dumps({"tid": st.tenant, "appid": cid, "n": n, "scp": scope})
                                              .encode()).rstrip(b"=").decode()
            signature = _mac("token%d" % n) + _mac("sig%d" % n)
            tok = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.%s.%s" % (claims, signature)
            st.tokens[tok] = Token("tok-%d" % n, cid, st.clock.now() + ttl * TICKS)
        exp = str(ttl) if st.settings["token_expires_as_string"] else ttl
        return json_reply(200, {"token_type": "Bearer", "expires_in": exp, "ext_expires_in": exp,
                                "access_token": tok}, headers=[("Cache-Control", "no-store, no-cache"),
                                                               ("Pragma", "no-cache")])

    def valid_scopes(self):
        if self.state.settings["flavor"] == "dataverse":
            host_port = self.ctx.host.rsplit(":", 1)
            port = host_port[1] if len(host_port) == 2 else ""
            return {"%s://%s:%s/.default" % (self.ctx.scheme, h, port) for h in ("127.0.0.1", "localhost")} \
                | {self.ctx.root + "/.default"}
        return {self.state.scope}

    # /_files/ (E5) ----------------------------------------------------------------------------

    def file(self, inst_id, name, part):
        self.ctx.error_kind = "storage"
        p = self.ctx.params
        m = re.fullmatch(r"part-(\d+)\.csv", part)
        se, sig = p.get("se", ""), p.get("sig", "")
        if not m or not hmac.compare_digest(sig, _file_sig(inst_id, name, int(m.group(1)), se)):
            raise ApiError(403, "AuthenticationFailed", "Server failed to authenticate the request. Make "
                           "sure the value of Authorization header is formed correctly including the "
                           "signature.", "storage")
        try:
            expired = parse_ticks(se) <= self.state.clock.now()
        except ValueError:
            expired = True
        if expired:
            raise ApiError(403, "AuthenticationFailed", "Signed expiry time [%s] has to be after signed "
                           "start time." % se, "storage")
        inst = self.state.instances.get(inst_id)
        ent = inst.entities.get(name) if inst else None
        ranges = partition_ranges(self.state, inst.rows_of(ent)) if ent else []
        k = int(m.group(1))
        if k >= len(ranges):
            raise ApiError(404, "BlobNotFound", "The specified blob does not exist.", "storage")
        _, start, stop = ranges[k]
        body = to_bytes(partition_csv(self.state, ent, inst.rows_of(ent), start, stop))
        return Reply(200, body, "text/csv; charset=utf-8",
                     [("x-ms-version", "2020-04-08"), ("x-ms-blob-type", "BlockBlob"),
                      ("ETag", '"0x%s"' % hashlib.sha256(body).hexdigest()[:16].upper())],
                     rows=stop - start)

    # Dataverse (C.7) --------------------------------------------------------------------------

    def dv_service(self):
        inst = self.state.instance()
        return json_reply(200, {"@odata.context": "%s%s/$metadata" % (self.ctx.root, DV_PREFIX),
                                "value": [{"name": e.entity_set, "kind": "EntitySet", "url": e.entity_set}
                                          for e in inst.entities.values()]})

    def dv_metadata(self):
        return csdl_reply(self.state.instance(), "dataverse")

    def ci_service(self, i):
        inst = self.state.instance(i)
        return json_reply(200, {"@odata.context": "%s%s/instances/%s/data/$metadata"
                                % (self.ctx.root, CI_PREFIX, inst.id),
                                "value": [{"name": e.name, "kind": "EntitySet", "url": e.name}
                                          for e in inst.entities.values()]})

    def ci_metadata(self, i):
        return csdl_reply(self.state.instance(i), "customer_insights")

    def dv_data(self, entity_set):
        self.ctx.error_kind = "odata"
        inst = self.state.instance()
        ent = next((e for e in inst.entities.values() if e.entity_set == entity_set), None)
        if ent is None:
            raise ApiError(404, "0x80060888", "Resource not found for the segment '%s'." % entity_set, "odata")
        return DataQuery(self.ctx, inst, ent, self.ctx.raw_query, False).dv_page()


# --------------------------------------------------------------------------------------------
# Routes (C.2).  Captures are passed to the Api method in order.  "api" routes go through the
# gateway checks; the token endpoint and /_files/ are other hosts in reality and skip them.
# --------------------------------------------------------------------------------------------

_WF = ["workflows/{w}", "manage/workflows/{w}"]      # documented form and the docs' fallback
ROUTES = [("ci", "GET", "v1/instances", "instances", "api")]
for _t in ("entities", "tables"):                        # /manage/tables is an alias
    ROUTES += [("ci", "GET", "v1/instances/{i}/manage/%s" % _t, "entities", "api"),
               ("ci", "GET", "v1/instances/{i}/manage/%s/{n}" % _t, "entity", "api"),
               ("ci", "GET", "v1/instances/{i}/manage/%s/{n}/entitysize" % _t, "entitysize", "api")]
ROUTES += [("ci", "GET", "v1/instances/{i}/data", "ci_service", "api"),
           ("ci", "GET", "v1/instances/{i}/data/$metadata", "ci_metadata", "api"),
           ("ci", "GET", "v1/instances/{i}/data/{e}", "data", "api"),
           ("ci", "POST", "v1/instances/{i}/data/{e}", "write", "api"),
           ("ci", "PATCH", "v1/instances/{i}/data/{e}/{k}", "patch", "api"),
           ("ci", "GET", "v1/instances/{i}/manage/datasources", "datasources", "api"),
           ("ci", "GET", "v1/instances/{i}/manage/datasources/v2", "datasources", "api"),
           ("ci", "GET", "v1/instances/{i}/manage/datasources/v2/{d}", "datasource", "api"),
           ("ci", "GET", "v1/instances/{i}/manage/datasources/{d}", "datasource", "api"),
           ("ci", "GET", "v1/instances/{i}/manage/segments", "segments", "api"),
           ("ci", "GET", "v1/instances/{i}/manage/measures", "measures", "api"),
           ("ci", "GET", "v1/instances/{i}/manage/measures/{n}", "measure", "api")]
for _w in _WF:
    ROUTES += [("ci", "GET", "v1/instances/{i}/%s/jobs" % _w, "jobs", "api"),
               ("ci", "POST", "v1/instances/{i}/%s/jobs" % _w, "submit", "api"),
               ("ci", "GET", "v1/instances/{i}/%s/jobs/{j}" % _w, "job", "api"),
               ("ci", "POST", "v1/instances/{i}/%s/jobs/{j}/cancel" % _w, "cancel", "api"),
               ("ci", "GET", "v1/instances/{i}/%s/status" % _w, "status", "api")]
ROUTES += [("dv", "GET", "api/data/v9.2", "dv_service", "api"),
           ("dv", "GET", "api/data/v9.2/$metadata", "dv_metadata", "api"),
           ("dv", "GET", "api/data/v9.2/{s}", "dv_data", "api"),
           ("any", "POST", "{t}/oauth2/v2.0/token", "token", "token"),
           ("any", "GET", "_files/{i}/{e}/{p}", "file", "files")]
ROUTES = [(f, m, p.split("/"), h, k) for f, m, p, h, k in ROUTES]


def resolve(flavor, method, raw_path):
    """-> (handler name, captures, kind) or None (gateway 404)."""
    segs = raw_path.split("/")[1:]
    if segs and segs[-1] == "" and len(segs) > 1:
        segs = segs[:-1]
    segs = [urllib.parse.unquote(s) for s in segs]
    fl = "ci" if flavor == "customer_insights" else "dv"
    for f, m, pattern, handler, kind in ROUTES:
        if f not in (fl, "any") or m != method or len(pattern) != len(segs):
            continue
        caps = []
        for p, s in zip(pattern, segs):
            if p.startswith("{"):
                if s == "":
                    break
                caps.append(s)
            elif p.lower() != s.lower():
                break
        else:
            return handler, caps, kind
    return None


_FAULT_MESSAGES = {400: "The request is invalid.", 401: "Access denied due to invalid subscription "
                   "key. Make sure to provide a valid key for an active subscription.",
                   403: "Out of call volume quota. Quota will be replenished in 00:10:00.",
                   404: "Resource not found", 409: "The request conflicts with the current state.",
                   500: "An unexpected error occurred while processing the request.",
                   502: "The gateway received an invalid response from the backend.",
                   503: "The service is temporarily unavailable. Please retry later.",
                   504: "The gateway timed out waiting for the backend."}


def fault_reply(ctx, action, kind):
    """The reply a fault rule forces, or None if the request should run normally."""
    if action.get("expire_token"):
        tok = bearer_of(ctx)
        with ctx.state.lock:
            t = ctx.state.tokens.get(tok)
            if t is not None:
                t.revoked = True
                ctx.token = t.id
        return error_reply(ctx, invalid_token_error(ctx, "The token is expired"))
    if action.get("wrong_type"):
        return Reply(200, html_page(200, "Please sign in to continue."), "text/html; charset=utf-8")
    if "status" not in action:
        return None
    status = int(action["status"])
    headers = [(str(k), str(v)) for k, v in (action.get("headers") or {}).items()]
    body = action.get("body")
    if body is None:
        if kind == "files":
            body = "storage"
        elif kind == "token":
            body = "entra"
        elif status in (401, 403, 429):
            body = "gateway"
        else:
            body = ctx.error_kind
    message = action.get("message") or action.get("raw")
    if message is None:
        message = _FAULT_MESSAGES.get(status, "Injected fault (HTTP %d)." % status)
        if status == 429:
            ra = dict((k.lower(), v) for k, v in headers).get("retry-after", "1")
            message = "Rate limit is exceeded. Try again in %s seconds." % (ra if ra.isdigit() else 1)
    code = {"entra": "temporarily_unavailable", "storage": "ServerBusy"}.get(
        body, _PHRASES.get(status, "Error").replace(" ", ""))
    if body == "entra" and not message.startswith("AADSTS"):
        message = "AADSTS50000: " + message
    reply = error_reply(ctx, ApiError(status, code, message, body))
    for k, v in headers:
        if k.lower() == "content-type":
            reply.ctype = v
        else:
            reply.headers.append((k, v))
    return reply


def bearer_of(ctx):
    auth = ctx.headers.get("Authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else None


def invalid_token_error(ctx, description):
    return ApiError(401, "invalid_token", description, "empty", headers=[(
        "WWW-Authenticate", 'Bearer authorization_uri="https://login.microsoftonline.com/%s/oauth2/'
        'authorize", error="invalid_token", error_description="%s"' % (ctx.state.tenant, description))])


def check_key(ctx):
    if ctx.state.settings["flavor"] == "dataverse":
        return
    key = ctx.headers.get("Ocp-Apim-Subscription-Key") or ctx.params.get("subscription-key")
    if not key:
        raise ApiError(401, "Unauthorized", "Access denied due to missing subscription key. Make sure "
                       "to include subscription key when making requests to an API.", "gateway")
    ctx.key = ctx.state.keys.get(key, "invalid")
    if key not in ctx.state.keys:
        raise ApiError(401, "Unauthorized", "Access denied due to invalid subscription key. Make sure "
                       "to provide a valid key for an active subscription.", "gateway")


def check_rate(ctx):
    """Sliding window per subscription key (dataverse: per client) over accepted calls."""
    st = ctx.state
    rate = st.settings["rate"]
    if rate is None:
        return
    n, window = rate
    if st.settings["flavor"] == "dataverse":
        t = st.tokens.get(bearer_of(ctx))
        subject = "client:" + (t.client if t else "anonymous")
    else:
        subject = "key:" + ctx.key
    w = int(window * TICKS)
    with st.lock:
        now = st.clock.now()
        dq = st.windows.setdefault(subject, collections.deque())
        while dq and dq[0] <= now - w:
            dq.popleft()
        if len(dq) >= n:
            wait = max(1, -(-(dq[0] + w - now) // TICKS))
            if st.settings["flavor"] == "dataverse":
                raise ApiError(429, "0x80072322", "Number of requests exceeded the limit of %d over time "
                               "window of %s seconds." % (n, window), "odata", [("Retry-After", str(wait))])
            raise ApiError(429, "TooManyRequests", "Rate limit is exceeded. Try again in %d seconds." % wait,
                           "gateway", [("Retry-After", str(wait))])
        dq.append(now)


def check_bearer(ctx):
    tok = bearer_of(ctx)
    if not tok:
        raise invalid_token_error(ctx, "The access token is missing")
    st = ctx.state
    with st.lock:
        t = st.tokens.get(tok)
        if t is None:
            ctx.token = "unknown"
            raise invalid_token_error(ctx, "The access token is invalid")
        ctx.token = t.id
        if t.revoked or t.expires <= st.clock.now():
            raise invalid_token_error(ctx, "The token is expired")


# --------------------------------------------------------------------------------------------
# The control interface (C.5): JSON under /_control/, no credentials, faults or rate limit
# --------------------------------------------------------------------------------------------

# Control routes that never change an entity's rows (a bench clears the log between pulls
# of pages it rendered beforehand).
_ROWLESS_CONTROL = {"log", "faults", "tokens", "clock"}


class Control:
    def __init__(self, ctx):
        self.ctx = ctx
        self.state = ctx.state
        self.api = Api(ctx)

    def body(self):
        if not self.ctx.body:
            return {}
        try:
            doc = load_json_text(self.ctx.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise BadRequest("control body is not JSON: %s" % e) from None
        return doc

    def obj(self):
        doc = self.body()
        if not isinstance(doc, dict):
            raise BadRequest("control body must be a JSON object")
        return doc

    def inst(self):
        return self.state.instance(self.ctx.params.get("instance"))

    def dispatch(self, method, segs):
        """segs: the decoded path after /_control/."""
        st = self.state
        head = segs[0] if segs else ""
        rest = segs[1:]
        fn = getattr(self, "c_%s_%s" % (method.lower(), head.replace("-", "_")), None)
        try:
            if fn is None:
                raise TypeError
            inspect.signature(fn).bind(*rest)
        except TypeError:
            raise ApiError(404, "NotFound", "unknown control route %s /_control/%s"
                           % (method, "/".join(segs))) from None
        with st.lock:
            st.tick()
            if method != "GET" and head not in _ROWLESS_CONTROL:
                st.drop_pages()         # rows may change: no page rendered before is kept
            result = fn(*rest)
        # Slow reads (stats, rows of a big entity) come back as a function: run it unlocked.
        return result() if callable(result) else result

    # reset, load, state, settings, clock, tokens ------------------------------------------------

    def c_post_reset(self):
        self.state.reset()
        return {"reset": True, "seq": self.state.seq}

    def c_post_load(self):
        doc = self.obj()
        base = None
        if "path" in doc and len(doc) == 1:
            base = os.path.dirname(os.path.abspath(doc["path"]))
            try:
                with open(doc["path"], encoding="utf-8") as f:
                    doc = load_json_text(f.read())
            except (OSError, ValueError) as e:
                raise BadRequest("cannot load %s: %s" % (doc["path"], e)) from None
        st = self.state
        settings = dict(st.settings)
        settings.update(parse_settings(doc.get("settings", {}), "scenario"))
        settings.update(st.cli_settings)
        st.load(doc, base)
        self.apply_settings(settings)
        return {"loaded": [i.id for i in st.instances.values()]}

    def c_get_state(self):
        st = self.state
        out = {"settings": settings_json(st.settings), "clock": self.clock_json(), "seq": st.seq,
               "tenant": st.tenant, "clients": sorted(st.clients), "scope": st.scope,
               "faults": [r.to_json() for r in st.faults], "tokens": len(st.tokens), "instances": []}
        for inst in st.instances.values():
            out["instances"].append({
                "instanceId": inst.id, "name": inst.name, "instanceType": inst.instance_type,
                "entities": [dict(self.api.entity_json(inst, e), rowCount=len(inst.rows_of(e)),
                                  partitions=None, entitySet=e.entity_set) for e in inst.entities.values()],
                "datasources": [self.api.ds_json(inst, d, False)["dataSourceMetadata"]
                                for d in inst.datasources.values()],
                "segments": json.loads(self.api.segments(inst.id).body),
                "measures": [dict(self.api.measure_json(m), plannedValues=m.get("plannedValues"))
                             for m in inst.measures.values()],
                "jobs": [self.api.job_json(j) for j in inst.jobs_newest_first()],
                "status": json.loads(self.api.status(inst.id, "main").body)})
        return out

    def c_get_settings(self):
        return settings_json(self.state.settings)

    def c_post_settings(self):
        new = dict(self.state.settings)
        new.update(parse_settings(self.obj(), "settings"))
        self.apply_settings(new)
        return settings_json(self.state.settings)

    def apply_settings(self, new):
        st = self.state
        old = st.settings
        st.settings = new
        if new["clock"] != st.clock.mode:
            st.clock.set_mode(new["clock"])
        if new["auto_advance"] != old["auto_advance"]:
            for inst in st.instances.values():
                for job in inst.jobs:
                    job.next_step_at = None     # re-armed from now by the next tick
        if new["rate"] != old["rate"]:
            st.windows = {}

    def clock_json(self):
        c = self.state.clock
        return {"mode": c.mode, "now": fmt_ticks(c.now())}

    def c_get_clock(self):
        return self.clock_json()

    def c_post_clock(self):
        doc = self.obj()
        st = self.state
        if "mode" in doc:
            st.settings["clock"] = SETTING_PARSERS["clock"](doc["mode"])
            st.clock.set_mode(st.settings["clock"])
        if "set" in doc:
            st.clock.set(parse_ticks(doc["set"], st.clock))
        if "advance_s" in doc:
            st.clock.advance(doc["advance_s"])
        st.tick()
        return self.clock_json()

    def c_post_tokens(self, what=None):
        if what != "expire":
            raise ApiError(404, "NotFound", "use POST /_control/tokens/expire")
        doc = self.obj()
        n = 0
        for t in self.state.tokens.values():
            if doc.get("token_id", t.id) == t.id and doc.get("client_id", t.client) == t.client:
                t.revoked = True
                n += 1
        return {"expired": n}

    def c_get_tokens(self):
        now = self.state.clock.now()
        return [{"id": t.id, "client": t.client, "expires": fmt_ticks(t.expires),
                 "valid": not t.revoked and t.expires > now} for t in self.state.tokens.values()]

    # faults and log --------------------------------------------------------------------------

    def c_post_faults(self):
        doc = self.body()
        rules = doc if isinstance(doc, list) else [doc]
        made = [FaultRule(next(self.state.fault_ids), r) for r in rules]
        self.state.faults.extend(made)
        return {"id": made[0].id, "ids": [r.id for r in made]} if made else {"ids": []}

    def c_get_faults(self):
        return [r.to_json() for r in self.state.faults]

    def c_delete_faults(self, rid=None):
        st = self.state
        before = len(st.faults)
        st.faults = [r for r in st.faults if rid is not None and str(r.id) != rid]
        if rid is not None and len(st.faults) == before:
            raise ApiError(404, "NotFound", "no fault rule %s" % rid)
        return {"deleted": before - len(st.faults)}

    def c_get_log(self):
        try:
            since = int(self.ctx.params.get("since", "0"))
        except ValueError:
            raise BadRequest("since must be an integer") from None
        return {"seq": self.state.seq, "entries": [e for e in self.state.log if e["seq"] > since]}

    def c_delete_log(self):
        n = len(self.state.log)
        self.state.log.clear()
        return {"deleted": n}

    # entities ------------------------------------------------------------------------------------

    def c_get_entities(self, name=None, what=None, index=None):
        inst = self.inst()
        if name is None:
            return [{"name": e.name, "rows": len(inst.rows_of(e)), "entityType": e.entity_type,
                     "dataSourceName": e.data_source} for e in inst.entities.values()]
        ent = inst.entity(name)
        rowset = inst.rows_of(ent)
        if what is None:
            return dict(self.api.entity_json(inst, ent), rowCount=len(rowset))
        if what == "stats" and index is None:
            return lambda: entity_stats(self.state, ent, rowset)
        if what != "rows":
            raise ApiError(404, "NotFound", "unknown entity control route %s" % what)
        enc = RowEncoder(ent, False)
        if index is not None:
            try:
                rowset.row(int(index))          # validates the index
            except (ValueError, IndexError):
                raise ApiError(404, "NotFound", "no row %s in %s (%d rows)"
                               % (index, name, len(rowset))) from None
            return RawJson(rowset.row_json(int(index), enc))
        try:
            offset = int(self.ctx.params.get("offset", "0"))
            limit = int(self.ctx.params.get("limit", "1000"))
        except ValueError:
            raise BadRequest("offset and limit must be integers") from None
        def page():
            rows = rowset.rows_json(max(0, offset), min(len(rowset), offset + max(0, limit)), enc)
            return RawJson('{"total":%d,"offset":%d,"rows":[%s]}' % (len(rowset), offset, ",".join(rows)))
        return page

    def c_post_entities(self, name, what=None):
        inst = self.inst()
        doc = self.obj()
        clock = self.state.clock
        existing = inst.entities.get(name)
        if what is None:
            spec = dict(doc, name=name)
            if existing is not None and existing.segment is not None:
                raise BadRequest("%s is a segment's output; change the segment instead" % name)
            ent = build_entity(spec, clock, existing=existing)
            inst.add_entity(ent)
            return dict(self.api.entity_json(inst, ent), rowCount=len(ent.rows))
        if what != "rows":
            raise ApiError(404, "NotFound", "unknown entity control route %s" % what)
        if existing is None:
            raise ApiError(404, "EntityNotFound", "Entity '%s' was not found." % name)
        if existing.segment is not None:
            raise BadRequest("%s is a segment's output; change the segment instead" % name)
        mode = doc.get("mode", "append")
        if mode not in ("append", "replace", "upsert"):
            raise BadRequest("mode must be append, replace or upsert")
        part = rows_part(existing, doc)
        if part is None:
            raise BadRequest("give rows or generate")
        key = existing.key_attr
        if mode == "replace":
            existing.rows = RowSet([part])
            existing.reset_tracking()
        elif mode == "upsert":
            if key is None or not isinstance(part, ListPart):
                raise BadRequest("upsert needs literal rows and an entity with a one-attribute key")
            for row in part.rows:
                idx = existing.rows.index_of(key, row[key])
                existing.rows = (existing.rows.appended(ListPart([row])) if idx is None
                                 else existing.rows.with_override(idx, row))
                existing.track("upsert", row[key])
        else:
            existing.rows = existing.rows.appended(part)
            if key is None or len(part) > 100000:
                existing.reset_tracking()        # too many to list: delta tokens expire instead
            else:
                for j in range(len(part)):
                    existing.track("upsert", part.row(j).get(key))
        refresh = doc.get("refreshTime", "now")
        if refresh != "keep":
            existing.refresh_time = None if refresh is None else parse_ticks(refresh, clock)
        inst.seg_version += 1
        return {"name": name, "rowCount": len(existing.rows), "refreshTime": fmt_ticks(existing.refresh_time)}

    def c_delete_entities(self, name, what=None, key=None):
        """DELETE entities/{name}, or entities/{name}/rows/{key}: one row by its primary key
        (the remaining rows become literal rows: a generated entity is materialised)."""
        inst = self.inst()
        ent = inst.entity(name)
        if what is None:
            del inst.entities[name]
            inst.seg_version += 1
            return {"deleted": name}
        if what != "rows" or key is None or ent.key_attr is None or ent.segment is not None:
            raise ApiError(404, "NotFound", "use DELETE entities/{name}/rows/{key} on an entity with a key")
        idx = ent.rows.index_of(ent.key_attr, key)
        if idx is None and ent.types[ent.key_attr] in INT_TYPES and re.fullmatch(r"-?\d+", key):
            key = int(key)
            idx = ent.rows.index_of(ent.key_attr, key)
        if idx is None:
            raise ApiError(404, "NotFound", "no row with key %r in %s" % (key, name))
        rows = list(ent.rows.rows(0, len(ent.rows)))
        del rows[idx]
        ent.rows = RowSet([ListPart(rows)])
        ent.track("delete", key)
        inst.seg_version += 1
        return {"name": name, "rowCount": len(ent.rows)}

    # data sources, jobs, segments, measures ---------------------------------------------------------

    def c_post_datasources(self, ident):
        inst = self.inst()
        ds = inst.update_datasource(ident, self.obj(), self.state.clock)
        return self.api.ds_json(inst, ds, False)["dataSourceMetadata"]

    def c_get_jobs(self, job_id=None):
        inst = self.inst()
        if job_id is not None:
            return self.api.job_json(inst.job(job_id))
        return [self.api.job_json(j) for j in inst.jobs_newest_first()]

    def c_post_jobs(self, job_id=None, what=None):
        inst = self.inst()
        doc = self.obj()
        now = self.state.clock.now()
        if job_id is None:
            ids = doc.get("identifiers")
            if isinstance(ids, str):
                ids = [ids]
            at = None
            if "submittedTimestamp" in doc:
                at = parse_ticks(doc["submittedTimestamp"], self.state.clock)
            job = inst.submit_job(doc.get("operationType", "all"), doc.get("submissionKind", "onDemand"),
                                  ids, doc.get("plan"), doc.get("jobType"), bool(doc.get("downstream")), at)
            return self.api.job_json(job)
        job = inst.job(job_id)
        if what == "advance":
            to = canon(doc.get("to"), JOB_STATUSES) if doc.get("to") else None
            if to in TERMINAL:
                inst.finish_job(job, to, now)
            elif to == "running":
                if job.status == "queued":
                    inst.step_job(job, now)
            else:
                for _ in range(int(doc.get("steps", 1))):
                    inst.step_job(job, now)
        elif what == "finish":
            inst.finish_job(job, doc.get("status"), now)
        elif what == "cancel":
            inst.cancel_job(job, now)
        else:
            raise ApiError(404, "NotFound", "jobs/{id}/advance|finish|cancel")
        return self.api.job_json(job)

    def c_post_segments(self, name):
        inst = self.inst()
        doc = self.obj()
        inst.update_segment(name, doc, self.state.clock)
        return [s for s in json.loads(self.api.segments(inst.id).body) if s["name"] == name][0]

    def c_post_measures(self, name):
        inst = self.inst()
        m = inst.update_measure(name, self.obj(), self.state.clock)
        return self.api.measure_json(m)


class RawJson(str):
    """Control results that are already JSON text (rows with exact numbers)."""


def entity_stats(state, ent, rowset):
    """Row count, null counts, exact sums of integer/decimal columns (as strings), min/max of
    date columns and the SHA-256 of the entity's NDJSON (as `generate --format ndjson` writes)."""
    def compute():
        names = [a["name"] for a in ent.attributes]
        types = ent.types
        nulls = {a: 0 for a in names}
        sums = {a: (Decimal(0) if types[a] == "Edm.Decimal" else 0) for a in names
                if types[a] in INT_TYPES or types[a] == "Edm.Decimal"}
        dates = [a for a in names if types[a] in ("Edm.Date", "Edm.DateTimeOffset")]
        lo, hi = {a: None for a in dates}, {a: None for a in dates}
        conv = {a: _comparable(types[a]) for a in dates}
        enc = RowEncoder(ent, False)
        h = hashlib.sha256()
        n = 0
        for i, r in enumerate(rowset.rows(0, len(rowset))):
            n += 1
            for a in names:
                if r.get(a) is None:
                    nulls[a] += 1
            for a in sums:
                v = r.get(a)
                if isinstance(v, (int, Decimal)) and not isinstance(v, bool):
                    sums[a] += v
            for a in dates:
                v = r.get(a)
                c = conv[a](v)
                if c is None:
                    continue
                if lo[a] is None or c < lo[a][0]:
                    lo[a] = (c, v)
                if hi[a] is None or c > hi[a][0]:
                    hi[a] = (c, v)
            h.update(to_bytes(rowset.row_json(i, enc) + "\n"))
        return {"name": ent.name, "row_count": n, "null_counts": nulls,
                "sums": {a: str(v) for a, v in sums.items()},
                "min": {a: (lo[a][1] if lo[a] else None) for a in dates},
                "max": {a: (hi[a][1] if hi[a] else None) for a in dates},
                "sha256": h.hexdigest()}
    return state.cached(("stats", ent.name, rowset.version, tuple(ent.types.items())), compute)


# --------------------------------------------------------------------------------------------
# HTTP: one ThreadingHTTPServer, HTTP/1.1 keep-alive, optional TLS
# --------------------------------------------------------------------------------------------

_ODATA_ROUTES = {"data", "write", "patch", "dv_data", "dv_service", "dv_metadata", "ci_service",
                 "ci_metadata"}
# Handlers that work on immutable RowSet snapshots and may take long (sorting, CSV): they run
# without the state lock so one big request does not stall every other client.
_SNAPSHOT_ROUTES = {"data", "dv_data", "file", "entitysize"}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ciemu/1.0"
    sys_version = ""
    timeout = 300                  # idle keep-alive connections are closed after 5 minutes

    def log_message(self, fmt, *args):
        pass                       # the request log is /_control/log, not stderr

    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def do_PATCH(self):
        self.dispatch("PATCH")

    def do_PUT(self):
        self.dispatch("PUT")

    def do_DELETE(self):
        self.dispatch("DELETE")

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass                   # the connection was reset or truncated on purpose

    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(out)
                out.append(self.rfile.read(size))
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    @property
    def scheme(self):
        return "https" if self.server.ssl_ctx is not None else "http"

    def dispatch(self, method):
        try:
            body = self.read_body()
        except (ValueError, OSError):
            self.close_connection = True
            return
        raw_path, _, raw_query = self.path.partition("?")
        st = self.server.state
        if (raw_path == "/_control" or raw_path.startswith("/_control/")) and st.control_enabled:
            self.control(method, raw_path, raw_query, body)
        else:
            self.api(method, raw_path, raw_query, body)

    def control(self, method, raw_path, raw_query, body):
        st = self.server.state
        ctx = Ctx(st, method, raw_path, raw_query, self.headers, body, 0, self.scheme, self.server.port)
        segs = [urllib.parse.unquote(s) for s in raw_path.split("/")[2:] if s]
        try:
            result, status = Control(ctx).dispatch(method, segs), 200
        except ApiError as e:
            result, status = {"error": e.message, "code": e.code}, e.status
        except Exception as e:                      # a bug: say so loudly, keep serving
            traceback.print_exc()
            result, status = {"error": "internal error: %r" % e, "code": "InternalError"}, 500
        text = result if isinstance(result, RawJson) else dumps(mark_decimals(result))
        self.send_reply(Reply(status, to_bytes(text)), None, None)

    def api(self, method, raw_path, raw_query, body):
        st = self.server.state
        t0 = time.monotonic()
        seq = st.next_seq()
        ctx = Ctx(st, method, raw_path, raw_query, self.headers, body, seq, self.scheme, self.server.port)
        with st.lock:
            st.tick()
        route = resolve(st.settings["flavor"], method, raw_path)
        action, reply = None, None
        if route is None:
            reply = error_reply(ctx, ApiError(404, "NotFound", "Resource not found", "gateway"))
        else:
            handler, caps, kind = route
            ctx.route = handler
            ctx.error_kind = "odata" if handler in _ODATA_ROUTES else "apierror"
            with st.lock:
                query = urllib.parse.unquote_plus(raw_query)
                rule = next((r for r in st.faults if r.applies(method, ctx.path, query)), None)
            if rule is not None:
                ctx.fault, action = rule.id, rule.action
                if action.get("delay_ms"):
                    time.sleep(float(action["delay_ms"]) / 1000)
                if action.get("reset"):
                    self.finish_record(self.record(ctx, None, 0, None, t0), t0)
                    self.hard_reset()
                    return
                reply = fault_reply(ctx, action, kind)
            if reply is None:
                reply = self.run(ctx, handler, caps, kind)
                if action and action.get("malformed"):
                    reply = Reply(200, reply.body[:max(1, len(reply.body) // 2)] or b'{"value":[',
                                  "application/json; charset=utf-8", rows=reply.rows)
        # The entry is logged before the reply goes out: a client that reads the log right
        # after its response must find the request there.  Timing is completed afterwards.
        size = len(reply.body)
        if action and action.get("truncate_at") is not None:
            size = min(size, int(action["truncate_at"]))
        entry = self.record(ctx, reply.status, size, reply.rows, t0)
        sent = self.send_reply(reply, action, seq)
        if sent != size:
            entry["bytes"] = sent
        self.finish_record(entry, t0)

    def run(self, ctx, handler, caps, kind):
        """Gateway checks in contract order (key -> rate limit -> bearer), then the handler."""
        try:
            if kind == "api":
                check_key(ctx)
                check_rate(ctx)
                check_bearer(ctx)
            if handler in _SNAPSHOT_ROUTES:
                return getattr(Api(ctx), handler)(*caps)
            with ctx.state.lock:
                return getattr(Api(ctx), handler)(*caps)
        except ApiError as e:
            return error_reply(ctx, e)
        except Exception as e:
            traceback.print_exc()
            return error_reply(ctx, ApiError(500, "InternalServerError", "emulator bug: %r" % e))

    def record(self, ctx, status, sent, rows, t0):
        params = dict(ctx.params)
        if "subscription-key" in params:
            params["subscription-key"] = "<redacted>"      # secrets never reach the log
        st = self.server.state
        # Credentials are logged (by id) wherever they were presented, also where no check
        # looks at them (token endpoint, /_files/): tests prove none went where none belong.
        if ctx.key is None:
            key = ctx.headers.get("Ocp-Apim-Subscription-Key") or ctx.params.get("subscription-key")
            if key:
                ctx.key = st.keys.get(key, "invalid")
        if ctx.token is None and bearer_of(ctx):
            t = st.tokens.get(bearer_of(ctx))
            ctx.token = t.id if t else "unknown"
        return st.record({
            "seq": ctx.seq, "time": fmt_ticks(self.server.state.clock.now()), "method": ctx.method,
            "path": ctx.path, "query": params, "route": ctx.route,
            "prefer": ctx.headers.get("Prefer"), "accept": ctx.headers.get("Accept"),
            "odata_version": ctx.headers.get("OData-Version"),
            "odata_maxversion": ctx.headers.get("OData-MaxVersion"),
            "key": ctx.key, "token": ctx.token, "client": ctx.client, "status": status,
            "bytes": sent, "rows": rows, "fault": ctx.fault,
            "duration_ms": round((time.monotonic() - t0) * 1000, 1)})

    def finish_record(self, entry, t0):
        entry["duration_ms"] = round((time.monotonic() - t0) * 1000, 1)
        self.server.state.write_log_file(entry)

    def hard_reset(self):
        """TCP RST: SO_LINGER with a zero timeout, then close the descriptor."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.rfile.close()
            self.connection.close()
        except OSError:
            pass

    def write(self, data):
        try:
            self.wfile.write(data)
            return True
        except OSError:
            self.close_connection = True
            return False

    def send_reply(self, reply, action, seq):
        """Status line, headers and body, shaped by a fault action's trickle_bps, stall,
        truncate_at and chunked.  Returns the number of body bytes sent."""
        a = action or {}
        body = reply.body
        chunked = bool(a.get("chunked"))
        truncate = a.get("truncate_at")
        hdrs = [("Date", time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())), ("Server", "ciemu")]
        if reply.ctype:
            hdrs.append(("Content-Type", reply.ctype))
        hdrs += reply.headers
        if seq is not None:
            hdrs.append(("X-Emulator-Seq", str(seq)))
        hdrs.append(("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(len(body))))
        if truncate is not None or self.headers.get("Connection", "").lower() == "close":
            self.close_connection = True
        hdrs.append(("Connection", "close" if self.close_connection else "keep-alive"))
        head = ("HTTP/1.1 %d %s\r\n" % (reply.status, _PHRASES.get(reply.status, "Status")) +
                "".join("%s: %s\r\n" % kv for kv in hdrs) + "\r\n").encode("latin-1")
        prefix = (b"%x\r\n" % len(body)) if chunked and body else b""
        if truncate is not None:
            # Full Content-Length (or an open chunk), fewer bytes, then the connection ends.
            cut = body[:int(truncate)]
            self.write(head + prefix + cut)
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return len(cut)
        payload = prefix + body + (b"\r\n0\r\n\r\n" if body else b"0\r\n\r\n") if chunked else body
        if a.get("stall"):
            after = len(prefix) + int(a["stall"].get("after_bytes", 0))
            if not self.write(head + payload[:after]):
                return 0
            time.sleep(float(a["stall"].get("ms", 1000)) / 1000)
            self.write(payload[after:])
        elif a.get("trickle_bps"):
            bps = max(1, int(a["trickle_bps"]))
            if not self.write(head):
                return 0
            step = max(1, bps // 20)
            start = time.monotonic()
            for off in range(0, len(payload), step):
                if not self.write(payload[off:off + step]):
                    return off
                delay = start + (off + step) / bps - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        else:
            self.write(head + payload)
        return len(body)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr, state, ssl_ctx):
        self.state = state
        self.ssl_ctx = ssl_ctx
        super().__init__(addr, Handler)
        self.port = self.server_address[1]

    def finish_request(self, request, client_address):
        # The TLS handshake happens here, in the connection's own thread, so a slow or failing
        # client (a wrong CA aborts the handshake) never blocks accept().
        if self.ssl_ctx is not None:
            request.settimeout(30)
            try:
                request = self.ssl_ctx.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                return
        try:
            self.RequestHandlerClass(request, client_address, self)
        finally:
            if self.ssl_ctx is not None:
                try:
                    request.close()
                except OSError:
                    pass

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (OSError, ssl.SSLError)):
            return                 # clients hang up, time out or reset: not our problem
        super().handle_error(request, client_address)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

HELP_DESCRIPTION = """\
Local emulator of the Dynamics 365 Customer Insights Data REST API (ciflow contract, part C).
Listens on 127.0.0.1 (port 0 = ephemeral), prints exactly one line `CIEMU READY <base-url>`
(base-url = http(s)://127.0.0.1:PORT/v1, or .../api/data/v9.2 for the dataverse flavour) and
serves until SIGTERM/SIGINT.  Standard library only.

subcommands (instead of serving):
  ciemu.py generate --schema customer --rows N --seed S --format ndjson|csv [--start K] [--header]
      print generated rows; the NDJSON is byte-identical to what stats hash
  ciemu.py default-scenario
      print the default instance as a scenario (tests/scenarios/demo.json is this output)
"""

HELP_EPILOG = """\
DEFAULT INSTANCE (no --scenario)
  tenant tenant-0001; client ciflow-client / ciflow-secret-value; scope
  https://api.ci.ai.microsoft.com/.default; subscription keys key-primary-0001 (primary) and
  key-secondary-0001 (secondary); instance 8b0c9c54-0000-0000-0000-000000000001 "Contoso".
  Entities: Customer (profile, generated customer schema, 250 rows, seed 1, entity set
  msdynci_customerprofiles); RetailPos_Transactions (source entity of RetailPos, 36 rows: Int64
  key TransactionId incl. 9007199254740993 = 2^53+1, Int16/Int32, Decimal with negative returns,
  DateTimeOffset with 7 significant fractional digits, Date, Boolean, Double with nulls);
  WebEvents_PageViews (source of WebEvents, 12 rows, Guid key); UnifiedActivity (40 rows,
  incrementalAttribute ActivityTime, entity set msdynci_unifiedactivities); Customer_Measure;
  RevenueByCountry (output of the dimensioned measure); HighValue and Churners (segment outputs).
  Data sources RetailPos (updated) and WebEvents (updateFailed).  Segments HighValue
  ("LifetimeValue gt 50000") and Churners ("ChurnScore gt 0.85 and IsActive").  Measures
  TotalRevenue (scalar, = sum of transaction amounts) and RevenueByCountry (dimension Country).
  Jobs: a scheduled full refresh (all tasks successful) and a failed on-demand WebEvents
  ingestion.  All timestamps of the instance are fixed (2025-03-01).

SCENARIO FORMAT (--scenario FILE, POST /_control/load; scenarios/demo.json is a full example)
  {"settings": {option: value},                       defaults < scenario < command line
   "auth": {"tenant", "clients": {id: secret} or [{"client_id","client_secret"}], "scope",
            "subscription_keys": {key: name} or [primary, secondary, ...]},
   "instances": [{"instanceId", "name", "instanceType",
     "entities": [{"name", "entityType", "dataSourceName", "attributes", "keys",
                   "incrementalAttribute", "refreshTime", "entitySet", "changeTracking",
                   "rows": [...] | "ndjson": "file relative to the scenario" |
                   "generate": {"schema": "customer", "rows": N, "seed": S, "start": 0}}],
     "datasources": [{"dataSourceId", "name", "friendlyName", "kind", "isActive",
                      "refreshState", "lastRefresh"}],
     "segments": [{"name", "state", "filter" ($filter text on the profile) | "members": [keys],
                   "plannedCount", "profileEntity": "Customer", "evaluationStatus": {...}}],
     "measures": [{"name", "definition", "latestEvaluation", "output", "plannedValues"}],
     "jobs": [{"jobId", "jobType", "jobSubmissionKind", "jobStatus", "operationType",
               "submittedTimestamp", "endTimestamp", "tasks": [{"operationType",
               "identifier", "taskStatus", "endTimestamp", "ciErrors"}]}]}]}
  Without "instances" the whole file is one instance.  Decimal values keep their digits.
  An entity's default type is profile for a generated one, else activity; a generated entity
  takes the schema's attributes and key unless given.  Every segment gets an output entity of
  the same name (its members' keys).  Status nodes (.../status) are replayed from past tasks.

GENERATOR (C.8)  row i = f(seed, i): base = mix64(seed ^ 0x6369656D75); h1 = mix64(base +
  (i+1)*GAMMA); then eight splitmix64 steps from state h1 give every field.  CustomerId is
  hex(h1)+hex(first step), so a key maps back to its row index (mix64 is invertible): key
  lookups on a generated entity of any size are O(1); pages are generated on demand.
  customer schema: CustomerId (32 hex), FirstName, LastName, FullName, Email (~5 % null), City,
  Country, PostalCode (5 digits, leading zeros), BirthDate Edm.Date (~3 % null), CreatedOn and
  LastPurchaseOn (~10 % null) Edm.DateTimeOffset, LoyaltyPoints Int32, PurchaseCount Int64
  (~2 % above 2^53), LifetimeValue Decimal (2 dp), ChurnScore Double (4 dp, [0,1)), IsActive
  (~80 % true), ExternalRef Guid (v4 form), Notes (~1 % with commas, quotes, newlines, CRLF,
  tabs, backslashes, non-ASCII, emoji; ~29 % null).  Names include non-ASCII letters.

ROUTES (customer_insights flavour, all under /v1; checks in order: route -> fault rules ->
subscription key -> rate limit -> bearer -> handler)
  GET  /instances                                  E1
  GET  /instances/{i}/manage/entities[/{name}[/entitysize]]   E2, E3  (alias /manage/tables/...)
  GET  /instances/{i}/data/{entity}                E4 ($select $filter $orderby $top $skip
       $skiptoken $search $expand $count, forceSearch, proxy=true -> E5); the query may be
       encoded into the path segment: /data/Customer%3F%24filter%3D...
  POST /instances/{i}/data/{entity}?validUntil=&caller=      E10 write (profiles: update only)
  PATCH /instances/{i}/data/{entity}/{key}         E10 partial update (204; unknown key 404)
  GET  /instances/{i}/manage/datasources[/{id}][?includeModel=false]   E6 (alias .../datasources/v2)
  GET|POST /instances/{i}/workflows/main/jobs, GET .../jobs/{id}, POST .../jobs/{id}/cancel,
  GET  .../workflows/main/status                   E7 (alias /manage/workflows/main/...)
  GET  /instances/{i}/manage/segments, /manage/measures[/{name}]   E8, E9
  POST /{tenant}/oauth2/v2.0/token                 Entra client credentials (not under /v1)
  GET  /_files/{instance}/{entity}/part-{n}.csv?sv=&sr=&sp=&se=&sig=   partitions, no CI credentials
  dataverse flavour: GET /api/data/v9.2 (service document), GET /api/data/v9.2/{entitySet}

CONTROL API (JSON under /_control/, no credentials, no faults, no rate limit, not logged;
?instance=ID picks an instance, default the first; --no-control turns it into gateway 404s)
  POST reset                      back to the startup state (scenario, settings, clock); clears
                                  faults, rate windows, request log; issued tokens stay valid
  POST load {scenario}|{"path":F} replace the instances with a scenario (reset still returns to
                                  the startup scenario)
  GET  state                      everything: settings, clock, instances, jobs, faults
  GET|POST settings {name: value} any option below (underscored names)
  GET|POST clock {"advance_s":N} {"mode":"manual"|"real"} {"set":"2025-03-01T00:00:00Z"}
  POST tokens/expire [{"token_id":"tok-3"}|{"client_id":"..."}]   GET tokens
  POST faults {"match":{...},"action":{...}} (or a list) -> {"id": N}; GET faults;
  DELETE faults (all) or faults/{id}
  GET  log?since=SEQ -> {"seq", "entries"}; DELETE log
  GET  entities                   names and row counts
  POST entities/{name} {metadata [, "rows": [...] | "generate": {...}]}  create or update:
       attributes ([{"name","dataType"}] or [["Name","Edm.Int32"]]), keys ([["A"]]), entityType,
       dataSourceName, incrementalAttribute, refreshTime, entitySet, changeTracking; omitted
       fields keep their value for an existing entity.  DELETE entities/{name}
  POST entities/{name}/rows {"mode":"append"|"replace"|"upsert", "rows":[...] | "generate":{...},
       "refreshTime":"now"(default)|"keep"|timestamp}   (upsert: by primary key, literal rows)
  DELETE entities/{name}/rows/{key}   delete one row (a generated entity becomes literal rows)
  GET  entities/{name}/rows?offset=0&limit=1000 -> {"total","offset","rows"} in served order
  GET  entities/{name}/rows/{index}    one row
  GET  entities/{name}/stats -> {"row_count", "null_counts", "sums" (integer and decimal columns,
       exact, as strings), "min"/"max" (Edm.Date/DateTimeOffset columns, as served), "sha256"
       (of the entity's NDJSON: one compact JSON object per row, attribute order, UTF-8, "\\n")}
  POST datasources/{id or name} {"refreshState":"updateFailed","lastRefresh":"now",...}
  GET  jobs[/{id}]; POST jobs {"operationType":"all","submissionKind":"scheduled",
       "identifiers":[...], "plan":{"merge":"failed"}, "downstream":false, "jobType":"full"}
  POST jobs/{id}/advance {} (one step) | {"steps":N} | {"to":"running"} | {"to":"failed"}
  POST jobs/{id}/finish {"status":"successful"}; POST jobs/{id}/cancel
  POST segments/{name} {"entityCount":1234,"jobStatus":"CompletedSuccess","evaluationDate":"now",
       "state", "filter", "members", "plannedCount"}
  POST measures/{name} {"values":{"TotalRevenue":"42.5"},"state":"completed","plannedValues",
       "definition","evaluationTime","endTime"}

FAULT RULES (C.6)  {"match": {"method", "path" (regex, searched in the decoded path), "query"
  (regex, searched in the decoded query), "nth" | "every", "times"}, "action": {...}}
  Rules are tried in order; each counts the requests its method/path/query match; the first rule
  that fires wins and later rules do not see the request.  nth=k fires on matches k..k+times-1
  (times defaults to 1); every=k fires on every k-th match; with neither it fires on every match.
  times limits the firings; without nth it defaults to unlimited, so a rule with neither nth nor
  times applies every time until DELETE /_control/faults[/{id}].  Faults apply to every known
  route (API, token endpoint, /_files/), never to /_control/ or unknown routes (gateway 404).
  Actions (combinable where it makes sense):
    status N [+ body gateway|odata|apierror|empty|html|raw|entra|storage, message or raw text,
             headers {"Retry-After": "12"} (a Content-Type header replaces the body's type)]:
             replaces the reply; default body: gateway for 401/403/429, odata on /data, entra on
             the token endpoint, storage XML on /_files/, apierror elsewhere.
    expire_token: the presented token is revoked; this and later calls get 401 invalid_token.
    delay_ms: sleep before the status line.      trickle_bps: body at N bytes/s.
    stall {"after_bytes":N,"ms":M}: N body bytes, a pause, the rest.
    truncate_at N: full Content-Length (or, with "chunked": true, an open chunk), N body bytes,
             then the connection closes.     chunked: send the body chunked.
    malformed: 200 with the normal body cut in half (complete, invalid JSON).
    wrong_type: 200 text/html sign-in page.   reset: TCP RST (SO_LINGER 0) instead of a reply.

RATE LIMIT  rate N/W: sliding window of W seconds per subscription key (dataverse: per client)
  over calls that passed the limiter (only accepted calls count: a 429 does not, a call the
  bearer check rejects afterwards does, as it reached the backend); the excess gets 429, a gateway
  body "Rate limit is exceeded. Try again in S seconds." and Retry-After: S, S = whole seconds
  (>= 1) until the oldest accepted call leaves the window.  Uses the emulator clock.

REQUEST LOG  every API request (not control): seq (also the X-Emulator-Seq reply header), time,
  method, path (decoded), query (decoded; subscription-key redacted), route, prefer, accept,
  odata_version and odata_maxversion (the OData-Version/OData-MaxVersion headers),
  key (primary|secondary|invalid; null if none was presented, on any route), token (tok-N|
  unknown|null, likewise), client (token endpoint), status (null for a reset), bytes (body
  bytes sent), rows, fault (rule id), duration_ms.  Kept in memory (last {cap}) and appended
  as NDJSON to --log-file.  An entry exists before its reply is sent; duration_ms is completed
  after.

CHOICES WHERE THE CONTRACT IS SILENT
  * The clock starts at real time; manual mode freezes the current time; switching keeps the
    time continuous.  reset returns to the startup clock mode, offset 0.
  * max_top caps the default page too (a page never exceeds it).
  * absolute nextLinks (and @odata.context, partition URLs) use the scheme and the request's
    Host header, as a server behind a name would; relative links are "Entity?...", rooted
    ones "/v1/instances/...".
  * $top is the page size in the customer_insights flavour (what skip-paging clients send);
    nextLinks keep the request's options verbatim minus $skip/$skiptoken and add
    $skiptoken=o=OFFSET;n=SIZE;q=QUERYHASH;m=HMAC, percent-encoded (so it holds %3D/%3B).  A
    token whose MAC or query hash does not match is a 400; a $skiptoken wins over $skip.  Tokens
    and /_files/ signatures use a fixed key: identical across runs.
  * $filter on source entities (dataSourceName set) and $search there: 400.  Comparisons between
    incompatible types (e.g. Int32 vs 'text', DateTimeOffset vs a date literal): 400 like OData.
    A Guid compares with a bare GUID or a quoted string.  Nulls sort first ascending; strings
    compare by code point.  $search is a case-insensitive substring of any Edm.String attribute;
    quotes around the term are removed.  Unknown $-options and repeated options: 400.
  * $expand works on profile entities, with entities that carry the profile's key attribute.
  * proxy=true accepts no other $-option but $select=*; an empty entity has no partitions.
    CSV: RFC 4180, CRLF, attribute order, no header (csv_header), null = empty field, "" = "".
    Signed URLs expire after sas_ttl (403 AuthenticationFailed, storage XML, like Azure).
  * entitysize.size is the CSV size: exact for literal rows, estimated from 100 rows for
    generated ones.
  * Unknown instance id: 404 ApiErrorResult InstanceNotFound (after the gateway checks).
  * Token endpoint: unknown tenant 400 invalid_request (AADSTS90002); grant type checked, then
    client (401 invalid_client AADSTS700016 unknown app / AADSTS7000215 bad secret), then scope
    (400 invalid_scope).  client_secret_basic is accepted too.  Tokens look like JWTs but are
    opaque.  A missing bearer gets the same 401 as an invalid one.
  * Dataverse: token scope is <root>/.default (127.0.0.1 or localhost); no subscription key;
    errors are wrapped; $search is 400; $top returns one page of min($top, 5000) rows.
  * Dataverse change tracking: with Prefer: odata.track-changes (only $select allowed, else
    400) the last page carries @odata.deltaLink (...&$deltatoken=N!MM/DD/YYYY hh:mm:ss!MAC) and
    Preference-Applied names it.  The delta GET returns, in one page and in change order, the
    current rows changed since the token (E10 writes, control upserts/appends) and
    {"@odata.context": ".../$metadata#set/$deletedEntity", "id": KEY, "reason": "deleted"} for
    control deletions, plus a new deltaLink.  A token older than a replace of the rows (or of
    an append of over 100,000 rows) has expired: 400 0x80044352, pull everything again.
    Entities are change-tracked unless "changeTracking": false.
  * E10: a POST to a profile with an unknown key is 404 (profiles are updated, not created); to
    another entity it appends a row (existing key: 409).  Writes do not expire.  Segment
    outputs and keyless entities refuse writes (400).
  * Jobs created through the API are onDemand, jobType full for operationType all or
    forceRunRequested=true, else incremental.  includeTasks defaults to false on the list,
    the single-job GET always has tasks.  includeModel defaults to true on data sources.
  * Jobs: ids are stable GUIDs; tasks start "queued"; operationType map|match|merge runs from
    that step through merge; ingestion/map/match/merge add segments and measures only with
    "downstream" (control); a job without identifiers covers every data source / segment /
    measure.  A step's timestamps are the time it fell due (auto_advance) or now (control).
    A failed/timedOut task fails the job with that status; later tasks become "skipped".
    Cancel: running task and job "aborted" (data source updateCancelled); an ended job: 400.
    Segment evaluation counts plannedCount if set, else the real members.  Merge success sets
    refreshTime of profile and unifiedActivity entities; measures take plannedValues if set.
  * Enum query values match case-insensitively; identifiers may be quoted; the jobs list takes
    `top` (also `$top`), default 10, newest first by submittedTimestamp.
  * Data values are served as stored: Int64 beyond 2^53 as exact JSON integers, Decimal with the
    digits given (generator: 2 dp), so tests can also store values that do not fit a type.
    The Accept header's IEEE754Compatible is ignored; numbers_as_strings decides.
  * Generated DateTimeOffset values have microsecond precision written with 7 digits.
  * Control-made row changes move refreshTime to now unless "refreshTime":"keep".
  * A scenario entity without refreshTime gets the time its history implies (last successful
    ingestion of its data source, last merge for profiles/unified activity, last evaluation
    for segment and measure outputs, latest measure evaluation for other measure entities), else
    the load time.
  * Control replies carry no X-Emulator-Seq and are not logged; only API requests get a seq.
"""


def cmd_generate(argv):
    p = argparse.ArgumentParser(prog="ciemu.py generate", description="Print generated rows.")
    p.add_argument("--schema", default="customer", choices=sorted(GENERATORS))
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--start", type=int, default=0, help="first row index (random access)")
    p.add_argument("--format", choices=["ndjson", "csv"], default="ndjson")
    p.add_argument("--header", action="store_true", help="CSV header line")
    args = p.parse_args(argv)
    gen = GENERATORS[args.schema](args.seed)
    names = [n for n, _ in gen.ATTRIBUTES]
    out = sys.stdout.buffer
    if args.format == "csv" and args.header:
        out.write(to_bytes(csv_line({n: n for n in names}, names)))
    end = args.start + args.rows
    for a in range(args.start, end, 10000):
        b = min(end, a + 10000)
        if args.format == "ndjson":
            text = "\n".join([gen.json(i) for i in range(a, b)]) + "\n"
        else:
            text = "".join([csv_line(gen.row(i), names) for i in range(a, b)])
        out.write(to_bytes(text))
    out.flush()
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog="ciemu.py", description=HELP_DESCRIPTION,
                                epilog=HELP_EPILOG.replace("{cap}", str(LOG_CAP)),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="listen port (default 0 = ephemeral)")
    p.add_argument("--scenario", help="scenario JSON file (default: the default instance below)")
    p.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM; see make_test_ca.sh)")
    p.add_argument("--tls-key", help="private key of --tls-cert")
    p.add_argument("--log-file", help="append the request log to this file as NDJSON")
    p.add_argument("--no-control", action="store_true", help="disable /_control/")
    p.add_argument("--page-cache-mb", type=int, default=PAGE_CACHE_MB, metavar="MB",
                   help="memory for rendered data pages, each rendered once and served again "
                        "while its rows are unchanged (default %d; 0 renders every request)"
                        % PAGE_CACHE_MB)
    for name, default, parser, text in SETTINGS:
        shown = {None: "off", False: "off", True: "on"}.get(default, default)
        kw = {"nargs": "?", "const": "true"} if parser is _bool else {}
        p.add_argument("--" + name.replace("_", "-"), dest="set_" + name, metavar="V",
                       help="%s (default %s)" % (text, shown), **kw)
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "generate":
        return cmd_generate(argv[1:])
    if argv and argv[0] == "default-scenario":
        text = json.dumps(mark_decimals(default_scenario()), ensure_ascii=False, indent=1)
        sys.stdout.write(_NUM_RE.sub(r"\1", text) + "\n")
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    raw = {name: getattr(args, "set_" + name) for name in SETTING_PARSERS
           if getattr(args, "set_" + name) is not None}
    try:
        cli_settings = parse_settings(raw, "command line")
        scenario, scen_dir = None, None
        if args.scenario:
            with open(args.scenario, encoding="utf-8") as f:
                scenario = load_json_text(f.read())
            scen_dir = os.path.dirname(os.path.abspath(args.scenario))
        state = State(cli_settings, scenario, scen_dir, args.log_file, not args.no_control,
                      args.page_cache_mb)
    except (BadRequest, OSError, ValueError) as e:
        parser.error(str(e))
    ssl_ctx = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            parser.error("--tls-cert and --tls-key go together")
        ssl_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ssl_ctx.load_cert_chain(args.tls_cert, args.tls_key)
    server = Server((args.host, args.port), state, ssl_ctx)
    host = args.host if args.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    prefix = DV_PREFIX if state.settings["flavor"] == "dataverse" else CI_PREFIX
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    print("CIEMU READY %s://%s:%d%s" % ("https" if ssl_ctx else "http", host, server.port, prefix), flush=True)
    while not stop.wait(0.5):
        pass
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
