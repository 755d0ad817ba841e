"""Settings: defaults, validation, one line per bad variable, exit 2 from the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.config import is_loopback_host, load_settings
from worker.errors import ConfigError

ALL_VARS = [
    line.split("=", 1)[0]
    for line in Path(".env.example").read_text().splitlines()
    if line and not line.startswith("#")
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ALL_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env


def test_defaults() -> None:
    s = load_settings()
    assert s.base_url == "https://api.sequin.io"
    assert (s.consumer, s.page_size, s.poll_interval) == ("default", 500, 1.0)
    assert (s.delete_mode, s.db_schema, s.log_format, s.log_level) == (
        "soft",
        "sequin",
        "auto",
        "info",
    )
    assert s.filters == {"sync_id": None, "provider": None, "collection": None}


def test_env_file_is_read_and_environment_wins(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / ".env").write_text(
        "SEQUIN_CONSUMER=from-file\nSEQUIN_PAGE_SIZE=100\nSEQUIN_PROVIDER=\n"
    )
    monkeypatch.setenv("SEQUIN_PAGE_SIZE", "200")
    s = load_settings()
    assert (s.consumer, s.page_size, s.provider) == ("from-file", 200, None)


def test_every_problem_is_named_by_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEQUIN_PAGE_SIZE", "501")
    monkeypatch.setenv("SEQUIN_POLL_INTERVAL", "soon")
    monkeypatch.setenv("SEQUIN_DELETE_MODE", "maybe")
    monkeypatch.setenv("SEQUIN_DB_SCHEMA", 'x"; drop')
    with pytest.raises(ConfigError) as err:
        load_settings()
    lines = err.value.problems
    assert len(lines) == 4
    assert {line.split(":")[0] for line in lines} == {
        "SEQUIN_PAGE_SIZE",
        "SEQUIN_POLL_INTERVAL",
        "SEQUIN_DELETE_MODE",
        "SEQUIN_DB_SCHEMA",
    }


def test_required_settings() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(require=("api_token", "database_url"))
    assert err.value.problems == [
        "SEQUIN_API_TOKEN: required but not set",
        "DATABASE_URL: required but not set",
    ]


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://api.example.com", True),
        ("http://127.0.0.1:8765", True),
        ("http://localhost:8765", True),
        ("http://[::1]:8765", True),
        ("http://api.example.com", False),
        ("http://10.0.0.5:8765", False),
        ("ftp://api.example.com", False),
    ],
)
def test_token_is_never_sent_over_plain_http_to_a_remote_host(
    monkeypatch: pytest.MonkeyPatch, url: str, ok: bool
) -> None:
    monkeypatch.setenv("SEQUIN_BASE_URL", url)
    if ok:
        load_settings()
    else:
        with pytest.raises(ConfigError, match="SEQUIN_BASE_URL"):
            load_settings()


def test_insecure_http_can_be_allowed_explicitly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEQUIN_BASE_URL", "http://simulator:8765")
    monkeypatch.setenv("SEQUIN_ALLOW_INSECURE_HTTP", "true")
    assert load_settings().base_url == "http://simulator:8765"


def test_loopback_detection() -> None:
    assert is_loopback_host("127.5.5.5") and is_loopback_host("::1")
    assert not is_loopback_host("localhost.evil.com") and not is_loopback_host(None)


def test_token_whitespace_is_stripped(monkeypatch: pytest.MonkeyPatch) -> None:
    # A Kubernetes secret made from a file keeps the file's final newline.
    monkeypatch.setenv("SEQUIN_API_TOKEN", "  sk-live-abc123\n")
    s = load_settings(require=("api_token",))
    assert s.api_token is not None and s.api_token.get_secret_value() == "sk-live-abc123"


@pytest.mark.parametrize("value", ["sk-live\nabc123", "sk-live\x01abc123", "sk-live\u2019abc123"])
def test_a_token_with_a_control_or_non_ascii_character_is_refused_unquoted(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("SEQUIN_API_TOKEN", value)
    with pytest.raises(ConfigError) as err:
        load_settings(require=("api_token",))
    assert [line.split(":")[0] for line in err.value.problems] == ["SEQUIN_API_TOKEN"]
    assert "abc123" not in str(err.value)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"SEQUIN_REQUEST_TIMEOUT": "30"}, "SEQUIN_READ_TIMEOUT"),  # read 60 > request 30
        ({"SEQUIN_REQUEST_TIMEOUT": "5", "SEQUIN_READ_TIMEOUT": "5"}, "SEQUIN_CONNECT_TIMEOUT"),
        ({"SEQUIN_HEARTBEAT_TIMEOUT": "60"}, "SEQUIN_HEARTBEAT_TIMEOUT"),  # = request 60
        (  # a lock wait may outlast the heartbeat: /healthz would flap during one stall
            {
                "SEQUIN_HEARTBEAT_TIMEOUT": "8",
                "SEQUIN_REQUEST_TIMEOUT": "5",
                "SEQUIN_READ_TIMEOUT": "5",
                "SEQUIN_CONNECT_TIMEOUT": "2",
                "SEQUIN_DB_TIMEOUT": "10",
            },
            "SEQUIN_HEARTBEAT_TIMEOUT (8) must be greater than SEQUIN_DB_TIMEOUT",
        ),
        ({"SEQUIN_REQUEST_TIMEOUT": "0"}, "SEQUIN_REQUEST_TIMEOUT"),
    ],
)
def test_http_timeouts_must_nest(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], named: str
) -> None:
    """Per-read timeouts fit in the request deadline, which fits in the heartbeat timeout, as
    does one wait on a database lock."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert len(err.value.problems) == 1 and err.value.problems[0].startswith(named)


def test_request_timeout_default() -> None:
    s = load_settings()
    assert (s.connect_timeout, s.read_timeout, s.request_timeout) == (10.0, 60.0, 60.0)
    assert s.heartbeat_timeout > s.request_timeout
