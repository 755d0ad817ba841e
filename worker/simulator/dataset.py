"""The base dataset: record ``i`` of the stream as a pure function of ``(seed, i)``.

Nothing is stored per record, so a million records cost no memory: a record's timestamp,
key, collection, deletion and ``data`` body all derive from hashes of ``(seed, i)``, and
its bytes are formatted when a page asks for it.  Base record ``i`` has sequence number
``i`` and its timestamp is non-decreasing in ``i``, so a stream position is found by
bisection without a stored list.

What the data deliberately contain (what a sync worker must get right): equal timestamps
across page boundaries (including runs longer than the largest page), repeated updates of
a key (sometimes two versions with the same timestamp, so "newer wins" must mean "later
in the stream"), deletes with and without ``data``, updates after a delete, and
non-ASCII text.  Thread-safe: the caches only ever hold values any thread would compute
identically.
"""

from __future__ import annotations

import bisect
import random
import uuid
from collections.abc import Iterator

from worker.simulator.bodies import COLL_BY_PERCENT, COLLECTIONS, DATA_HEADS, PROVIDERS, b62
from worker.simulator.bodies import body_bytes as make_body
from worker.simulator.timestamps import format_ts_bytes, minute_prefix

__all__ = ["BASE_US", "Dataset", "Pos", "mix"]

Pos = tuple[int, int]  # a stream position: (upstream_updated_at in microseconds, sequence)

# Base timeline: record i is stamped about i seconds after 2024-01-01T00:00:00Z.
BASE_US = 1_704_067_200_000_000  # 2024-01-01T00:00:00Z in microseconds
_STEP_US = 1_000_000

# Timestamp clusters.  Besides ~10% of records sharing the timestamp of their
# predecessor, some chunks contain a "bulk" run of 300-799 records stamped with
# one timestamp (a mass update upstream), longer than the largest page, so that
# paging inside a single timestamp is exercised at limit=500 too.
_CHUNK_BITS = 10
_CHUNK_MASK = (1 << _CHUNK_BITS) - 1
_TIE_PERCENT = 10
_BULK_ONE_IN = 24
_DELETE_PERCENT = 6  # of updates; creations are never deletes -> ~5% overall
_POOL_SIZE = 64  # distinct data bodies per collection
_KEY_CACHE_MAX = 1 << 17

_M64 = (1 << 64) - 1
# Multipliers for the id permutations; coprime with 62 (odd, not divisible by 31)
# and with 10 and 3, so `(k * M + salt) % modulus` is a bijection on key numbers.
_ID_MULT = 0x9E3779B97F4A7C1594D049BB133111EB  # 128 bits: spreads small keys too
assert all(_ID_MULT % p for p in (2, 3, 5, 31))


def mix(x: int) -> int:
    """SplitMix64 finaliser: a fast, well-distributed 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class Dataset:
    """``records`` base records over ``keys`` distinct ``(collection_id, upstream_id)`` pairs.

    All a pure function of ``seed``.  ``keys`` defaults to ``records // 5`` (so each key is
    updated about five times) and is capped at ``records``.  Key ``k`` is created by
    record ``ceil(k * records / keys)`` and updated at random later; ~5% of the updates
    are deletes (``deleted: true``, ``data`` then either ``null`` or a full object), and
    a deleted key may be updated again later.  One ``sync_id`` per provider.  Timestamps
    start at 2024-01-01T00:00:00Z, about one second apart; ~10% of records share their
    predecessor's timestamp and a few runs of 300-799 records share one timestamp.
    ``data`` is an object of roughly ``record_size`` bytes.

    Indexes ``i >= records`` are valid too (:meth:`record_bytes`): they are how live mode
    makes new versions of existing keys.
    """

    def __init__(self, seed: int, records: int, keys: int | None, record_size: int) -> None:
        if records < 0:
            raise ValueError("records must be >= 0")
        if keys is not None and keys < 1:
            raise ValueError("keys must be >= 1")
        self.seed = seed
        self.n = records
        self.record_size = record_size
        # There cannot be more keys than records that create them.
        self.keys = min(keys if keys is not None else max(1, records // 5), max(1, records))

        s = mix(seed & _M64)
        self._s_ts = mix(s ^ 0x1)
        self._s_bulk = mix(s ^ 0x3)
        self._s_rec = mix(s ^ 0x4)
        self._s_key = mix(s ^ 0x5)
        self._s_id = (mix(s ^ 0x6) << 64) | mix(s ^ 0x7)
        self.sync_ids: dict[str, str] = {}
        for p_idx, provider in enumerate(PROVIDERS):
            hi, lo = mix(s ^ (0x100 + p_idx)), mix(s ^ (0x200 + p_idx))
            self.sync_ids[provider] = str(uuid.UUID(int=(hi << 64) | lo, version=4))
        # Per collection: the whole record as one bytes template.
        heads = [
            b'{"sync_id":"%s","collection_id":"%s","upstream_id":"'
            % (self.sync_ids[c.provider].encode(), c.name.encode())
            for c in COLLECTIONS
        ]
        self._tmpl_data: tuple[bytes, ...] = tuple(
            head
            + b'%s","upstream_updated_at":"%s","data":'
            + DATA_HEADS[idx]
            + b'%s,"deleted":%s,"created_at":"%s"}'
            for idx, head in enumerate(heads)
        )
        self._tmpl_null: tuple[bytes, ...] = tuple(
            head + b'%s","upstream_updated_at":"%s","data":null,"deleted":true,"created_at":"%s"}'
            for head in heads
        )
        self._key_cache: dict[int, tuple[int, bytes, bytes]] = {}
        self._bulk_cache: dict[int, tuple[int, int]] = {}
        self._count_cache: dict[frozenset[int], int] = {}
        # Data bodies per collection, filled lazily (b"" = not generated yet).
        self._pool: list[list[bytes]] = [[b""] * _POOL_SIZE for _ in COLLECTIONS]

    # ------------------------------------------------------------------ timestamps

    def _bulk_run(self, chunk: int) -> tuple[int, int]:
        """The bulk run ``[start, end)`` of a chunk; ``(0, 0)`` if it has none."""
        run = self._bulk_cache.get(chunk)
        if run is None:
            h = mix((self._s_bulk + chunk) & _M64)
            run = (0, 0)
            if h % _BULK_ONE_IN == 0:
                start = (chunk << _CHUNK_BITS) + (h >> 8) % 200
                run = (start, start + 300 + (h >> 20) % 500)
            self._bulk_cache[chunk] = run
        return run

    def _ts_normal(self, i: int) -> int:
        """The stamp of ``i`` ignoring bulk runs: the raw stamp of the last untied j <= i.

        One hash per record decides both whether it is tied (low bits) and the
        jitter of its raw stamp within its one-second slot (high bits).
        """
        s_ts = self._s_ts
        t = mix((s_ts + i) & _M64)
        while i & _CHUNK_MASK and t % 100 < _TIE_PERCENT:
            i -= 1
            t = mix((s_ts + i) & _M64)
        return BASE_US + i * _STEP_US + (t >> 16) % _STEP_US

    def base_ts(self, i: int) -> int:
        """Timestamp (micros) of base record ``i``; non-decreasing in ``i``.

        Each record has a raw stamp inside its own one-second slot, so raw stamps
        strictly increase.  A "tied" record (~10%) takes the stamp of the previous
        untied one (ties never cross a chunk start, which bounds the walk back),
        and records in a bulk run take the stamp of the run's first record.  Both
        keep the sequence non-decreasing.
        """
        start, end = self._bulk_run(i >> _CHUNK_BITS)
        return self._ts_normal(start if start <= i < end else i)

    def iter_base_ts(self, i: int) -> Iterator[int]:
        """``base_ts(i), base_ts(i + 1), ...`` computed incrementally (for paging)."""
        s_ts = self._s_ts
        while True:
            chunk_end = ((i >> _CHUNK_BITS) + 1) << _CHUNK_BITS
            start, end = self._bulk_run(i >> _CHUNK_BITS)
            run_ts = self._ts_normal(start) if end else 0
            ts_normal = self._ts_normal(i)
            while True:
                yield run_ts if start <= i < end else ts_normal
                i += 1
                if i == chunk_end:
                    break
                x = (s_ts + i + 0x9E3779B97F4A7C15) & _M64  # mix, inlined
                x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
                x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
                t = x ^ (x >> 31)
                if t % 100 >= _TIE_PERCENT:  # untied: its own raw stamp
                    ts_normal = BASE_US + i * _STEP_US + (t >> 16) % _STEP_US

    def max_ts(self) -> int:
        """The last base record's timestamp (the start of the timeline if there is none)."""
        return self.base_ts(self.n - 1) if self.n else BASE_US

    def position_exists(self, pos: Pos) -> bool:
        """Whether ``pos`` is a base record's position (False for sequences >= ``n``)."""
        return pos[1] < self.n and self.base_ts(pos[1]) == pos[0]

    def first_after(self, pos: Pos) -> int:
        """Index of the first base record strictly after ``pos`` (by bisection)."""
        return bisect.bisect_right(range(self.n), pos, key=lambda j: (self.base_ts(j), j))

    # ------------------------------------------------------------------ keys

    def _key_of(self, i: int) -> tuple[int, bool]:
        """(key number, is this the key's creation) of record ``i``."""
        h = mix((self._s_rec + i) & _M64)
        n, keys = self.n, self.keys
        if i < n:
            here = i * keys // n
            if i == 0 or here != (i - 1) * keys // n:
                return here, True
            return h % (here + 1), False
        return h % keys, False

    def _coll_of_key(self, k: int) -> int:
        return COLL_BY_PERCENT[mix((self._s_key + k) & _M64) % 100]

    def _upstream_id(self, k: int, coll: int) -> str:
        # An affine map modulo the id space is a bijection, so distinct keys get
        # distinct ids that still look random.
        m, salt = _ID_MULT, self._s_id
        if coll == 0:
            return "sub_" + b62((k * m + salt) % 62**14, 14)
        if coll == 1:
            return "cus_" + b62((k * m + salt) % 62**14, 14)
        if coll == 2:
            return "00T8b00000" + b62((k * m + salt) % 62**8, 8)
        if coll == 3:
            return "0038b00000" + b62((k * m + salt) % 62**8, 8)
        return str(10**9 + (k * m + salt) % (9 * 10**9))

    def _created_us(self, k: int) -> int:
        """When key ``k`` first appeared: the timestamp of the record creating it."""
        if self.n == 0:
            return BASE_US
        return self.base_ts(-(-k * self.n // self.keys))

    def _key_info(self, k: int) -> tuple[int, bytes, bytes]:
        """(collection index, upstream_id, created_at) of key ``k``, cached."""
        info = self._key_cache.get(k)
        if info is None:
            coll = self._coll_of_key(k)
            info = (
                coll,
                self._upstream_id(k, coll).encode(),
                format_ts_bytes(self._created_us(k)),
            )
            if len(self._key_cache) >= _KEY_CACHE_MAX:
                self._key_cache.clear()  # crude but bounded: memory over hit rate
            self._key_cache[k] = info
        return info

    def coll(self, i: int) -> int:
        """Collection index (into ``bodies.COLLECTIONS``) of record ``i``: what filters see."""
        k = self._key_of(i)[0]
        info = self._key_cache.get(k)
        return info[0] if info is not None else self._coll_of_key(k)

    def count(self, allowed: frozenset[int]) -> int:
        """How many base records are in the collections ``allowed`` (cached per set)."""
        cached = self._count_cache.get(allowed)
        if cached is None:
            cached = sum(1 for i in range(self.n) if self.coll(i) in allowed)
            self._count_cache[allowed] = cached
        return cached

    def last_of_each_key(
        self, allowed: frozenset[int] | None
    ) -> Iterator[tuple[tuple[str, str], Pos, bytes]]:
        """``((collection_id, upstream_id), position, bytes)`` of each key's last base record.

        Only keys of the collections ``allowed`` (all if None).  O(records): each key's
        last record is found from cheap metadata first and only the winners are serialised.
        """
        last_of_key: dict[int, int] = {}
        for i in range(self.n):
            k = self._key_of(i)[0]
            if allowed is None or self._coll_of_key(k) in allowed:
                last_of_key[k] = i
        for k, i in last_of_key.items():
            coll = self._coll_of_key(k)
            ts_us = self.base_ts(i)
            key = (COLLECTIONS[coll].name, self._upstream_id(k, coll))
            yield key, (ts_us, i), self.record_bytes(i, ts_us)

    # ------------------------------------------------------------------ records

    def _pool_body(self, coll: int, idx: int) -> bytes:
        """Pooled ``data`` body, generated on first use (a pure function of seed, coll, idx)."""
        body = self._pool[coll][idx]
        if not body:
            rng = random.Random(mix(self._s_rec ^ (coll << 32) ^ idx))
            body = make_body(coll, rng, self.record_size)
            self._pool[coll][idx] = body  # racing threads compute the same bytes
        return body

    def record_bytes(self, i: int, ts_us: int) -> bytes:
        """Serialised record ``i`` of the generator, stamped ``ts_us``.

        This is the hot path that lets a client drain the stream fast: one
        bytes-formatting per record around a pooled body, with the hash, the key
        choice and the timestamp formatting inlined (at a few microseconds per
        record, each function call avoided is a measurable share).
        """
        x = (self._s_rec + i + 0x9E3779B97F4A7C15) & _M64  # mix, inlined
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
        h = x ^ (x >> 31)
        n, keys = self.n, self.keys
        if i < n:  # _key_of, inlined
            k = i * keys // n
            created = i == 0 or k != (i - 1) * keys // n
            if not created:
                k = h % (k + 1)
        else:
            k, created = h % keys, False
        info = self._key_cache.get(k) or self._key_info(k)
        coll = info[0]
        minute, rest = divmod(ts_us, 60_000_000)  # format_ts_bytes, inlined
        prefix = minute_prefix.get(minute)
        if prefix is None:
            ts = format_ts_bytes(ts_us)
        else:
            secs, frac = divmod(rest, 1_000_000)
            ts = b"%s%02d.%06dZ" % (prefix, secs, frac)
        body = self._pool[coll][(h >> 48) % _POOL_SIZE] or self._pool_body(
            coll, (h >> 48) % _POOL_SIZE
        )
        if created:
            return self._tmpl_data[coll] % (info[1], ts, info[1], ts, ts, body, b"false", ts)
        if (h >> 24) % 100 < _DELETE_PERCENT:  # a delete, half of them without data
            if (h >> 40) & 1:
                return self._tmpl_null[coll] % (info[1], ts, info[2])
            deleted = b"true"
        else:
            deleted = b"false"
        return self._tmpl_data[coll] % (info[1], ts, info[1], info[2], ts, body, deleted, info[2])
