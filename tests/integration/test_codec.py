"""The codec's text as Postgres sees it: jsonb equality against a real server (property test)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings

from tests.unit.test_codec import PATHS, check, pages


@pytest.fixture(scope="module")
def pg(pg_server: str) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
    with psycopg.connect(pg_server, autocommit=True) as conn:
        yield conn


@pytest.mark.parametrize("path", list(PATHS))
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(page=pages)
def test_postgres_sees_the_data_sent_on_every_path(
    pg: psycopg.Connection[tuple[Any, ...]], path: str, page: list[tuple[str, Any]]
) -> None:
    """The text handed to COPY equals the text sent by Postgres' own jsonb equality."""
    check(pg, page, path)
