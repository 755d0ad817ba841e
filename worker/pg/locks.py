"""Advisory lock keys. Postgres advisory locks take a 64-bit key; ours are derived from a
stable hash of what they protect, so every process of every version computes the same key."""

from __future__ import annotations

import hashlib


def lock_key(*parts: str) -> int:
    """A signed 64-bit advisory lock key for ``parts`` (collisions: ~2^-64 per pair)."""
    digest = hashlib.blake2b("\x1f".join(("sequin-worker", *parts)).encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


def migration_lock_key(schema: str) -> int:
    return lock_key("migrate", schema)


def consumer_lock_key(schema: str, consumer: str) -> int:
    return lock_key("consumer", schema, consumer)
