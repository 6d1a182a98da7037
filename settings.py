"""Configuration: one typed object, read from the environment and `.env`."""

import inspect
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import asyncpg
from pydantic import Field, PrivateAttr, RedisDsn, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

RATE = re.compile(r"(?P<requests>[0-9]+)\s*/\s*(?P<period>second|minute|hour)")
PERIODS = {"second": 1, "minute": 60, "hour": 3600}
# What DATABASE_URL's query may pass to asyncpg, typed as asyncpg takes them: its own
# `connect()` keywords (the type of each numeric one from its default), and SQLAlchemy's.
ASYNCPG_OPTIONS: dict[str, type] = {
    name: type(parameter.default) if isinstance(parameter.default, int | float) else str
    for name, parameter in inspect.signature(asyncpg.connect).parameters.items()
    if parameter.kind == parameter.KEYWORD_ONLY
} | {"command_timeout": float, "prepared_statement_cache_size": int}


class Settings(BaseSettings):
    """Every knob of the service; a value that does not parse stops the process."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    database_url: str = "sqlite+aiosqlite:///./books.db"
    # Comma-separated in the environment (NoDecode: not JSON).
    database_replica_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="PostgreSQL read replicas of DATABASE_URL."
    )
    database_pooler: Literal["none", "transaction"] = Field(
        "none",
        description="`transaction`: PostgreSQL is behind a transaction-mode pooler (PgBouncer).",
    )
    host: str = "127.0.0.1"
    port: int = Field(5042, ge=1, le=65535)
    sql_echo: bool = False
    pool_size: int = Field(10, ge=1)
    max_overflow: int = Field(10, ge=0)
    pool_timeout: float = Field(5.0, gt=0, description="Seconds to wait for a pooled connection.")
    pool_pre_ping: bool = False
    connect_timeout: float = Field(
        3.0, gt=0, description="Seconds to wait for a new database connection."
    )
    redis_url: RedisDsn | None = Field(None, description="Turns the shared cache on.")
    cache_ttl_seconds: int = Field(300, ge=1, description="Life of a cached entry.")
    cache_prefix: str = Field("books:", description="Prefix of every cache key.")
    # Comma-separated in the environment (NoDecode: not JSON).
    api_tokens: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Bearer tokens that may write; none: writes are open."
    )
    api_tokens_file: Path | None = Field(None, description="A file of tokens, one per line.")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins allowed by CORS; none: no CORS headers."
    )
    request_timeout: float | None = Field(
        None, gt=0, description="Seconds before a 504; on PostgreSQL also the statement timeout."
    )
    rate_limit: tuple[int, int] | None = Field(
        None, description="`N/second`, `N/minute` or `N/hour` per client, as (N, seconds)."
    )
    trust_proxy_headers: bool = Field(
        False, description="Take the client's address from Forwarded / X-Forwarded-For."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="`info` logs one line per request; `warning` only trouble."
    )
    _write_tokens: list[str] = PrivateAttr(default_factory=list)

    @field_validator("database_replica_urls", mode="before")
    @classmethod
    def _replica_urls(cls, value: object) -> object:
        """Comma-separated, each a URL as DATABASE_URL is (`postgresql://` means asyncpg)."""
        if isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        if isinstance(value, list):
            return [cls._usable_driver_options(cls._async_driver(str(url))) for url in value]
        return value

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, value: str) -> str:
        """Map `postgres://` and `postgresql://` to asyncpg and check the driver loads."""
        for prefix in ("postgres://", "postgresql://"):
            if value.startswith(prefix):
                value = "postgresql+asyncpg://" + value.removeprefix(prefix)
        try:
            make_url(value).get_dialect()
        except (ArgumentError, NoSuchModuleError, ValueError) as exc:
            raise ValueError(f"not a usable SQLAlchemy URL ({type(exc).__name__})") from None
        return value

    @field_validator("database_url")
    @classmethod
    def _usable_driver_options(cls, value: str) -> str:
        """Every driver option in the URL is one asyncpg takes, of the type it takes."""
        url = make_url(value)
        if url.get_driver_name() != "asyncpg":
            return value
        for name, option in url.query.items():
            if name not in ASYNCPG_OPTIONS:
                raise PydanticCustomError("driver_option", f"unknown driver option {name!r}")
            try:
                ASYNCPG_OPTIONS[name](option)
            except (TypeError, ValueError):
                kind = ASYNCPG_OPTIONS[name].__name__
                raise PydanticCustomError(
                    "driver_option", f"driver option {name!r} must be a {kind}"
                ) from None
        return value

    @property
    def driver_options(self) -> dict[str, Any]:
        """DATABASE_URL's query options for asyncpg, as the types it takes (a URL's query
        is text: `statement_cache_size=0` would reach asyncpg as the string "0")."""
        url = make_url(self.database_url)
        if url.get_driver_name() != "asyncpg":
            return {}
        return {name: ASYNCPG_OPTIONS[name](value) for name, value in url.query.items()}

    @field_validator("redis_url", mode="before")
    @classmethod
    def _empty_means_off(cls, value: object) -> object:
        """`REDIS_URL=` (set but empty, as compose files often leave it) keeps the cache off."""
        return None if value == "" else value

    @field_validator("api_tokens", "cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("rate_limit", mode="before")
    @classmethod
    def _requests_per_period(cls, value: object) -> object:
        """`100/minute` as (100, 60)."""
        if not isinstance(value, str):
            return value
        match = RATE.fullmatch(value.strip().lower())
        if match is None:
            raise PydanticCustomError("rate_limit", "expected N/second, N/minute or N/hour")
        requests = int(match["requests"])
        if requests < 1:
            raise PydanticCustomError("rate_limit", "N must be at least 1")
        return requests, PERIODS[match["period"]]

    @model_validator(mode="after")
    def _read_tokens_file(self) -> Self:
        """The tokens of API_TOKENS and of API_TOKENS_FILE (blank lines and # comments skipped)."""
        tokens = list(self.api_tokens)
        if self.api_tokens_file is not None:
            try:
                lines = self.api_tokens_file.read_text().splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise PydanticCustomError(
                    "tokens_file", f"API_TOKENS_FILE: cannot be read ({exc.__class__.__name__})"
                ) from None
            tokens += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        self._write_tokens = tokens
        return self

    @property
    def write_tokens(self) -> list[str]:
        """Who may write: empty means everyone (no API_TOKENS or API_TOKENS_FILE)."""
        return self._write_tokens

    @property
    def is_sqlite(self) -> bool:
        return make_url(self.database_url).get_backend_name() == "sqlite"


def load_settings() -> Settings:
    """Read the settings, or exit with one line per bad variable (never a traceback)."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            ": ".join(filter(None, ["_".join(map(str, error["loc"])).upper(), error["msg"]]))
            for error in exc.errors(include_input=False)
        )
        sys.exit(f"invalid configuration: {problems}")
