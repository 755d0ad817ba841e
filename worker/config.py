"""Settings: the single source of every knob the worker has.

Values come from the environment first, then from a ``.env`` file in the working directory.
:func:`load_settings` turns every validation failure into one :class:`ConfigError` whose
lines each name the variable and what is wrong, so the CLI can print them and exit 2
without a traceback.
"""

from __future__ import annotations

import ipaddress
import os
import re
import unicodedata
from typing import Literal
from urllib.parse import urlsplit

from dotenv import dotenv_values
from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.errors import ConfigError
from worker.model import api_filters

NOTIFY_CHANNEL = "sequin_worker"

# Defaults of the knobs that objects built outside Settings (tests, the demo, bench) also
# take: named once here, used by Settings and as those constructors' defaults.
PAGE_SIZE = 500
POLL_INTERVAL = 1.0
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
REQUEST_TIMEOUT = 60.0
MAX_RETRIES = 20
BATCH_MAX_RECORDS = 5000
PREFETCH_PAGES = 8
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def is_loopback_host(host: str | None) -> bool:
    """True for ``localhost`` and any loopback address (127.0.0.0/8, ::1)."""
    if not host:
        return False
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _env(name: str) -> AliasChoices:
    return AliasChoices(name)


class Settings(BaseSettings):
    """Every setting of the worker. The environment variable of each field is its alias."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=False,
        case_sensitive=True,
    )

    api_token: SecretStr | None = Field(None, validation_alias=_env("SEQUIN_API_TOKEN"))
    base_url: str = Field("https://api.sequin.io", validation_alias=_env("SEQUIN_BASE_URL"))
    allow_insecure_http: bool = Field(False, validation_alias=_env("SEQUIN_ALLOW_INSECURE_HTTP"))
    database_url: SecretStr | None = Field(None, validation_alias=_env("DATABASE_URL"))
    consumer: str = Field("default", validation_alias=_env("SEQUIN_CONSUMER"))
    sync_id: str | None = Field(None, validation_alias=_env("SEQUIN_SYNC_ID"))
    provider: str | None = Field(None, validation_alias=_env("SEQUIN_PROVIDER"))
    collection: str | None = Field(None, validation_alias=_env("SEQUIN_COLLECTION"))
    page_size: int = Field(PAGE_SIZE, ge=1, le=500, validation_alias=_env("SEQUIN_PAGE_SIZE"))
    poll_interval: float = Field(
        POLL_INTERVAL, gt=0, le=3600, validation_alias=_env("SEQUIN_POLL_INTERVAL")
    )
    delete_mode: Literal["soft", "hard"] = Field(
        "soft", validation_alias=_env("SEQUIN_DELETE_MODE")
    )
    db_schema: str = Field("sequin", validation_alias=_env("SEQUIN_DB_SCHEMA"))
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", validation_alias=_env("SEQUIN_LOG_FORMAT")
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", validation_alias=_env("SEQUIN_LOG_LEVEL")
    )
    connect_timeout: float = Field(
        CONNECT_TIMEOUT, gt=0, validation_alias=_env("SEQUIN_CONNECT_TIMEOUT")
    )
    read_timeout: float = Field(READ_TIMEOUT, gt=0, validation_alias=_env("SEQUIN_READ_TIMEOUT"))
    request_timeout: float = Field(
        REQUEST_TIMEOUT, gt=0, le=3600, validation_alias=_env("SEQUIN_REQUEST_TIMEOUT")
    )
    max_retries: int = Field(MAX_RETRIES, ge=0, validation_alias=_env("SEQUIN_MAX_RETRIES"))
    batch_max_records: int = Field(
        BATCH_MAX_RECORDS, ge=1, le=1_000_000, validation_alias=_env("SEQUIN_BATCH_MAX_RECORDS")
    )
    prefetch_pages: int = Field(
        PREFETCH_PAGES, ge=1, le=64, validation_alias=_env("SEQUIN_PREFETCH_PAGES")
    )
    # Bounds every wait on Postgres that should be short; see worker.pg.connection.DbTimeouts for
    # what is derived from it (lock_timeout, keepalives, lease ping, shutdown steps).
    db_timeout: float = Field(10.0, ge=2, le=600, validation_alias=_env("SEQUIN_DB_TIMEOUT"))
    db_statement_timeout: float = Field(
        120.0, ge=1, le=86400, validation_alias=_env("SEQUIN_DB_STATEMENT_TIMEOUT")
    )
    lock_retry_interval: float = Field(
        3.0, gt=0, le=300, validation_alias=_env("SEQUIN_LOCK_RETRY_INTERVAL")
    )
    http_port: int = Field(9090, ge=0, le=65535, validation_alias=_env("SEQUIN_HTTP_PORT"))
    http_host: str = Field("0.0.0.0", validation_alias=_env("SEQUIN_HTTP_HOST"))  # noqa: S104
    heartbeat_timeout: float = Field(120.0, gt=0, validation_alias=_env("SEQUIN_HEARTBEAT_TIMEOUT"))
    notify: bool = Field(False, validation_alias=_env("SEQUIN_NOTIFY"))
    auto_views: bool = Field(True, validation_alias=_env("SEQUIN_AUTO_VIEWS"))

    @field_validator("api_token", mode="before")
    @classmethod
    def _token_text(cls, v: object) -> object:
        # A secret made from a file usually ends in a newline; requests would refuse the
        # header, and retrying cannot fix it. Never echo the value in the message.
        if not isinstance(v, str):
            return v
        v = v.strip()
        if any(unicodedata.category(ch) == "Cc" for ch in v):
            raise ValueError("contains a control character (e.g. a line break inside the value)")
        if not v.isascii():
            raise ValueError("contains a non-ASCII character; an API token is plain ASCII")
        return v

    @field_validator("sync_id", "provider", "collection", mode="before")
    @classmethod
    def _blank_is_unset(cls, v: object) -> object:
        # `SEQUIN_PROVIDER=` in a .env file means "no filter", not "the empty provider".
        if isinstance(v, str) and not v.strip():
            return None
        return v

    @field_validator("db_schema")
    @classmethod
    def _schema_name(cls, v: str) -> str:
        # Quoted with sql.Identifier everywhere anyway; this keeps names operators can type.
        if not _IDENT.match(v):
            raise ValueError("must be a plain identifier: letters, digits, _ (max 63)")
        return v

    @field_validator("consumer")
    @classmethod
    def _consumer_name(cls, v: str) -> str:
        if not v or len(v) > 200 or not v.isprintable():
            raise ValueError("must be 1-200 printable characters")
        return v

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s) URL such as https://api.sequin.io")
        try:
            parts.port  # noqa: B018 -- raises for a port out of range
        except ValueError:
            raise ValueError("has an invalid port") from None
        return v.rstrip("/")

    @model_validator(mode="after")
    def _token_transport(self) -> Settings:
        parts = urlsplit(self.base_url)
        if (
            parts.scheme == "http"
            and not is_loopback_host(parts.hostname)
            and not self.allow_insecure_http
        ):
            raise ValueError(
                "SEQUIN_BASE_URL: plain http:// to a non-loopback host would expose the API "
                "token; use https:// (or SEQUIN_ALLOW_INSECURE_HTTP=true on a private network)"
            )
        return self

    @model_validator(mode="after")
    def _http_bounds(self) -> Settings:
        # The request deadline bounds a whole request; the connect and read timeouts bound
        # one wait for the socket inside it, so they must fit in it. The heartbeat must
        # outlast one request, or a slow but live fetch would fail the liveness probe.
        if self.connect_timeout >= self.request_timeout:
            raise ValueError(
                f"SEQUIN_CONNECT_TIMEOUT ({self.connect_timeout:g}) must be less than "
                f"SEQUIN_REQUEST_TIMEOUT ({self.request_timeout:g})"
            )
        if self.read_timeout > self.request_timeout:
            raise ValueError(
                f"SEQUIN_READ_TIMEOUT ({self.read_timeout:g}) must not exceed "
                f"SEQUIN_REQUEST_TIMEOUT ({self.request_timeout:g}); raise both together"
            )
        if self.heartbeat_timeout <= self.request_timeout:
            raise ValueError(
                f"SEQUIN_HEARTBEAT_TIMEOUT ({self.heartbeat_timeout:g}) must be greater than "
                f"SEQUIN_REQUEST_TIMEOUT ({self.request_timeout:g}): one request may take "
                "that long"
            )
        if self.heartbeat_timeout <= self.db_timeout:
            # A batch waiting on a lock waits up to SEQUIN_DB_TIMEOUT before its retry beats;
            # a shorter heartbeat would flap /healthz between 503 and 200 during one stall.
            raise ValueError(
                f"SEQUIN_HEARTBEAT_TIMEOUT ({self.heartbeat_timeout:g}) must be greater than "
                f"SEQUIN_DB_TIMEOUT ({self.db_timeout:g}): one wait on a lock may take that long"
            )
        return self

    @property
    def filters(self) -> dict[str, str | None]:
        """The API filters this consumer streams with (part of the consumer's identity)."""
        return api_filters(self.sync_id, self.provider, self.collection)


_FIELD_ENV = {
    name: str(field.validation_alias.choices[0])  # type: ignore[union-attr]
    for name, field in Settings.model_fields.items()
}


def env_name(field: str) -> str:
    """The environment variable behind a settings field."""
    return _FIELD_ENV.get(field, field)


def load_settings(*, require: tuple[str, ...] = ()) -> Settings:
    """Read and validate the settings.

    ``require`` names fields (e.g. ``"api_token"``, ``"database_url"``) that this command
    cannot do without. Raises :class:`ConfigError` listing every problem at once.
    """
    try:
        settings = Settings()
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = err.get("loc") or ()
            field = str(loc[0]) if loc else ""
            msg = str(err.get("msg", "invalid"))
            msg = msg.removeprefix("Value error, ")
            if field:
                problems.append(f"{env_name(field)}: {msg}")
            else:
                problems.append(msg)
        # Report missing required settings in the same pass, so one run shows everything.
        present = {**dotenv_values(".env"), **os.environ}
        for f in require:
            if not str(present.get(env_name(f)) or "").strip():
                problems.append(f"{env_name(f)}: required but not set")
        raise ConfigError(problems) from None
    missing = [
        f"{env_name(f)}: required but not set"
        for f in require
        if getattr(settings, f) is None or str(_reveal(getattr(settings, f))).strip() == ""
    ]
    if missing:
        raise ConfigError(missing)
    return settings


def _reveal(v: object) -> object:
    return v.get_secret_value() if isinstance(v, SecretStr) else v
