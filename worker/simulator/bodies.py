"""The shape of the generated records: collections, providers and ``data`` bodies.

Pure tables and pure functions of a ``random.Random``: which collections exist (and what
share of keys each gets), and a realistic ``data`` object per collection, with non-ASCII
text, nested objects, nulls and floats.  :mod:`worker.simulator.dataset` decides which record
is which; this module only knows what a record of each collection looks like.
"""

from __future__ import annotations

import random
from typing import Any, NamedTuple

import orjson

from worker.simulator.timestamps import format_ts

__all__ = [
    "BODY_MAKERS",
    "COLLECTIONS",
    "COLL_BY_PERCENT",
    "DATA_HEADS",
    "PROVIDERS",
    "Collection",
    "b62",
    "body_bytes",
]

_US_PER_DAY = 86_400_000_000
_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

_B62_PAIRS = [a + b for a in _B62 for b in _B62]


def b62(n: int, width: int) -> str:
    """``n`` in base 62, ``width`` digits (an even number), most significant first."""
    pairs = []
    for _ in range(width // 2):
        n, r = divmod(n, 3844)  # two digits per step
        pairs.append(_B62_PAIRS[r])
    return "".join(reversed(pairs))


_minute_cache: dict[int, bytes] = {}


class Collection(NamedTuple):
    name: str
    provider: str
    weight: int  # percent of keys


COLLECTIONS: tuple[Collection, ...] = (
    Collection("stripe:subscription", "stripe", 25),
    Collection("stripe:customer", "stripe", 20),
    Collection("salesforce:task", "salesforce", 25),
    Collection("salesforce:contact", "salesforce", 15),
    Collection("hubspot:deal", "hubspot", 15),
)
PROVIDERS: tuple[str, ...] = ("stripe", "salesforce", "hubspot")
# COLL_BY_PERCENT[h % 100] is the collection index of a key with hash h.
COLL_BY_PERCENT: tuple[int, ...] = tuple(
    idx for idx, coll in enumerate(COLLECTIONS) for _ in range(coll.weight)
)
assert len(COLL_BY_PERCENT) == 100

_WORDS: tuple[str, ...] = (
    "account",
    "renewal",
    "follow",
    "up",
    "call",
    "with",
    "customer",
    "about",
    "the",
    "invoice",
    "schedule",
    "quarterly",
    "review",
    "pipeline",
    "migration",
    "onboarding",
    "contract",
    "signed",
    "pending",
    "approval",
    "budget",
    "forecast",
    "discount",
    "shipping",
    "warehouse",
    "priority",
    "escalation",
    "café",
    "Zürich",
    "naïve",
    "façade",
    "Øresund",
    "São",
    "Paulo",
    "東京",
    "Kraków",
    "résumé",
    "über",
    "👍",
    "✓",
)
_FIRST_NAMES = ("Ada", "Grace", "Linus", "Zoë", "José", "Mária", "Søren", "Ayşe", "Wei", "Olu")
_LAST_NAMES = ("Lovelace", "Hopper", "Müller", "O'Brien", "García", "Nguyễn", "Smith", "Kowalski")
_CITIES = ("Berlin", "Lisbon", "Austin", "Kyoto", "Montréal", "Lagos", "Zürich", "Reykjavík")


def _iso(rng: random.Random) -> str:
    # Some time in 2023, at microsecond precision like the API's own timestamps.
    return format_ts(1_672_531_200_000_000 + rng.randrange(365 * _US_PER_DAY))


def _date(rng: random.Random) -> str:
    return format_ts(1_672_531_200_000_000 + rng.randrange(365 * _US_PER_DAY))[:10]


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def _body_subscription(rng: random.Random) -> dict[str, Any]:
    amount = rng.choice((900, 1900, 4900, 9900, 24900))
    return {
        "object": "subscription",
        "status": rng.choice(("active", "trialing", "past_due", "canceled", "incomplete")),
        "customer": "cus_" + b62(rng.getrandbits(80), 14),
        "currency": rng.choice(("usd", "eur", "gbp")),
        "billing": "charge_automatically",
        "cancel_at_period_end": rng.random() < 0.1,
        "current_period_start": rng.randrange(1_672_531_200, 1_704_067_200),
        "current_period_end": rng.randrange(1_704_067_200, 1_735_689_600),
        "trial_end": None,
        "discount": None if rng.random() < 0.7 else {"coupon": "SAVE" + str(rng.randrange(99))},
        "items": {
            "object": "list",
            "data": [
                {
                    "id": "si_" + b62(rng.getrandbits(80), 14),
                    "price": {
                        "id": "price_" + b62(rng.getrandbits(60), 10),
                        "unit_amount": amount,
                    },
                    "quantity": rng.randrange(1, 20),
                }
                for _ in range(rng.randrange(1, 3))
            ],
            "has_more": False,
        },
        "metadata": {"plan": rng.choice(("starter", "growth", "enterprise"))},
        "tax_percent": rng.choice((None, 7.5, 19.0, 20.0)),
    }


def _body_customer(rng: random.Random) -> dict[str, Any]:
    first, last = rng.choice(_FIRST_NAMES), rng.choice(_LAST_NAMES)
    return {
        "object": "customer",
        "name": f"{first} {last}",
        "email": f"{first}.{last}@example.com".lower().replace("'", ""),
        "balance": rng.randrange(-5000, 5000),
        "delinquent": rng.random() < 0.05,
        "livemode": False,
        "address": {
            "line1": f"{rng.randrange(1, 999)} Main St",
            "city": rng.choice(_CITIES),
            "postal_code": str(rng.randrange(10000, 99999)),
            "country": rng.choice(("US", "DE", "PT", "JP", "CA")),
        },
        "preferred_locales": rng.sample(["en", "de", "pt", "ja", "fr"], rng.randrange(0, 3)),
        "invoice_prefix": b62(rng.getrandbits(40), 8).upper(),
        "metadata": {},
        "created_at_source": _iso(rng),
    }


def _body_task(rng: random.Random) -> dict[str, Any]:
    return {
        "attributes": {"type": "Task"},
        "subject": rng.choice(("Call", "Email", "Send Quote", "Follow up")),
        "status": rng.choice(("Not Started", "In Progress", "Completed")),
        "priority": rng.choice(("High", "Normal", "Low")),
        "activity_date": _date(rng),
        "is_closed": rng.random() < 0.4,
        "is_high_priority": rng.random() < 0.2,
        "owner_id": "0058b00000" + b62(rng.getrandbits(48), 8),
        "who_id": None if rng.random() < 0.3 else "0038b00000" + b62(rng.getrandbits(48), 8),
        "call_duration_in_seconds": rng.choice((None, rng.randrange(0, 3600))),
        "created_date": _iso(rng),
        "reminder_date_time": None,
    }


def _body_contact(rng: random.Random) -> dict[str, Any]:
    first, last = rng.choice(_FIRST_NAMES), rng.choice(_LAST_NAMES)
    return {
        "attributes": {"type": "Contact"},
        "first_name": first,
        "last_name": last,
        "email": f"{first}.{last}@example.org".lower().replace("'", ""),
        "phone": f"+1-555-{rng.randrange(1000, 9999)}",
        "mailing_address": {
            "street": f"{rng.randrange(1, 999)} Elm Road",
            "city": rng.choice(_CITIES),
            "country": rng.choice(("United States", "Deutschland", "日本")),
            "latitude": round(rng.uniform(-80, 80), 6),
            "longitude": round(rng.uniform(-180, 180), 6),
        },
        "has_opted_out_of_email": rng.random() < 0.1,
        "lead_source": rng.choice(("Web", "Partner", "Trade Show", None)),
        "birthdate": _date(rng) if rng.random() < 0.5 else None,
        "last_activity_date": _date(rng),
    }


def _body_deal(rng: random.Random) -> dict[str, Any]:
    return {
        "properties": {
            "amount": f"{rng.randrange(100, 100000)}.00",
            "dealname": _sentence(rng, 3).title(),
            "dealstage": rng.choice(("appointmentscheduled", "qualifiedtobuy", "closedwon")),
            "pipeline": "default",
            "closedate": _iso(rng),
            "hs_is_closed": rng.random() < 0.3,
        },
        "associations": {
            "companies": [str(rng.randrange(10**9, 10**10)) for _ in range(rng.randrange(0, 3))],
        },
        "archived": False,
        "probability": round(rng.random(), 2),
    }


BODY_MAKERS = (_body_subscription, _body_customer, _body_task, _body_contact, _body_deal)
# Per collection: the head of `data`, spliced per record around a pooled body.
# Arguments: upstream_id, created_at, upstream_updated_at.
DATA_HEADS: tuple[bytes, ...] = (
    b'{"id":"%s","created":"%s","updated":"%s",',
    b'{"id":"%s","created":"%s","updated":"%s",',
    b'{"id":"%s","created_date":"%s","system_modstamp":"%s",',
    b'{"id":"%s","created_date":"%s","system_modstamp":"%s",',
    b'{"hs_object_id":"%s","createdate":"%s","hs_lastmodifieddate":"%s",',
)


def body_bytes(coll: int, rng: random.Random, record_size: int) -> bytes:
    """A ``data`` body of collection ``coll`` as JSON text *without its opening brace*.

    The caller splices a per-record head (:data:`DATA_HEADS`) in front of it.  Padded with
    free text so that the whole record lands within about 20% of ``record_size`` bytes.
    """
    fields = BODY_MAKERS[coll](rng)
    # The spliced head and the record's other fields are ~100 bytes.
    target = int(record_size * rng.uniform(0.8, 1.2)) - 100
    text = ""
    size = len(orjson.dumps(fields))
    while size + len(text.encode()) + 20 < target:
        text += _sentence(rng, 8) + ". "
    fields["description" if coll != 4 else "notes"] = text.strip() or None
    return orjson.dumps(fields)[1:]
