"""The one settings object: environment first (CLEANLIST_*), overridable per call."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cleanlist.constants import (
    API_PREFIX,
    CONNECT_TIMEOUT,
    DEFAULT_BASE_URL,
    DEFAULT_RATE_LIMIT,
    READ_TIMEOUT,
)
from cleanlist.errors import InputError


@dataclass(frozen=True)
class RateLimit:
    """At most `requests` per `seconds`, per endpoint (the API's documented unit).

    `auto` limits start at `requests` (the documented 60 per minute, scaled to the window) and grow
    until the API's first 429 tells the real limit; `N/SECONDS` is a ceiling learning only lowers.
    """

    requests: int
    seconds: float
    auto: bool = False

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        """Parse `N/SECONDS` (e.g. `60/60`, `20/2`), `auto` or `auto/SECONDS` (e.g. `auto/2`)."""
        count, slash, window = str(text).strip().lower().partition("/")
        if count.strip() == "auto":
            return cls._auto(text, window if slash else "60")
        try:
            limit = cls(int(count), float(window))
        except ValueError:
            raise InputError(f"rate limit {text!r} is not N/SECONDS (e.g. 60/60) or auto[/SECONDS]") from None
        if limit.requests < 1 or not limit.seconds > 0 or limit.seconds == float("inf"):
            raise InputError(f"rate limit {text!r} must have N >= 1 and SECONDS > 0")
        return limit

    @classmethod
    def _auto(cls, text: str, window: str) -> RateLimit:
        try:
            seconds = float(window)
        except ValueError:
            raise InputError(f"rate limit {text!r} is not auto/SECONDS (e.g. auto/60)") from None
        if not 0 < seconds < float("inf"):
            raise InputError(f"rate limit {text!r} must have SECONDS > 0")
        # The documented 60 requests per minute, in this window.
        return cls(max(1, round(60 * seconds / 60)), seconds, auto=True)

    def __str__(self) -> str:
        return f"auto/{self.seconds:g}" if self.auto else f"{self.requests}/{self.seconds:g}"


def host_of(base_url: str) -> str:
    """The API host from either form a user may give: `https://host` or the documented base,
    `https://host/api/v1/public` (the client appends the prefix itself)."""
    url = base_url.strip().rstrip("/")
    if url.endswith(API_PREFIX):
        url = url[: -len(API_PREFIX)].rstrip("/")
    return url


class CleanlistSettings(BaseSettings):
    """Configuration of the Cleanlist client, read from `CLEANLIST_*` environment variables."""

    # Overrides assigned later (a flow's parameters) go through the same validators as the environment.
    model_config = SettingsConfigDict(env_prefix="CLEANLIST_", extra="ignore", validate_assignment=True)

    api_key: SecretStr | None = Field(
        default=None, description="API key (`clapi_…`); sent only as `Authorization: Bearer`."
    )
    base_url: str = Field(
        default=DEFAULT_BASE_URL,
        description="Host of the API (or the documented base ending in /api/v1/public).",
    )
    rate_limit: str = Field(
        default=DEFAULT_RATE_LIMIT,
        description="Client-side limit per endpoint: `N/SECONDS` (a ceiling) or `auto[/SECONDS]` (learned).",
    )
    store_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the enrichment store (default ~/.cleanlist/store.db)."
    )
    connect_timeout: float = Field(default=CONNECT_TIMEOUT, description="Seconds to open a connection.")
    read_timeout: float = Field(default=READ_TIMEOUT, description="Seconds to wait for a response.")

    @field_validator("rate_limit")
    @classmethod
    def _check_rate_limit(cls, value: str) -> str:
        RateLimit.parse(value)
        return value

    @field_validator("base_url")
    @classmethod
    def _strip_base_url(cls, value: str) -> str:
        return host_of(value)

    @property
    def rate(self) -> RateLimit:
        return RateLimit.parse(self.rate_limit)
