"""The one settings object: environment first (CLEANLIST_*), overridable per call.

Every API key is loaded through `checked_api_key`, whatever its source (CLEANLIST_API_KEY here, the
Secret block and the CleanlistCredentials block in `flows/`): stripped of surrounding whitespace (a
Kubernetes Secret made from a file, a `.env` line, a paste end in a newline) and refused, in one line
naming its source, when it could not be sent as a header. httpx would refuse it on every request, and a
refused header is a transport error: retried, taken for an outage, and quoted (escaped, so redaction
missed it) in the log.
"""

from __future__ import annotations

import unicodedata
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


ENV_KEY_SOURCE = "CLEANLIST_API_KEY"


class APIKey(SecretStr):
    """An API key (a `SecretStr`) that knows where it was configured, for every error that names it."""

    def __init__(self, secret_value: str, source: str) -> None:
        super().__init__(secret_value)
        self.source = source


def _unsendable(key: str) -> str | None:
    """Why `key` cannot be an `Authorization: Bearer` value, or None. Never quotes the key."""
    for position, char in enumerate(key, start=1):
        if "!" <= char <= "~":
            continue
        if char.isspace() and char.isascii():
            kind = "a control character" if char not in " " else "a space"
        elif unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp", "Zs"):
            kind = "a control character"
        else:
            return f"contains a non-ASCII character at position {position}"
        return f"contains {kind} (U+{ord(char):04X}) at position {position}"
    return None


def checked_api_key(value: str | SecretStr, source: str) -> APIKey:
    """`value` without surrounding whitespace, as an `APIKey` from `source`; one InputError line naming
    `source` when it is empty or holds a character no HTTP header may carry (control, space, non-ASCII).

    `source` says where the key was configured ("CLEANLIST_API_KEY", "the Secret block …"): the line
    tells the user which one to fix.
    """
    text = value.get_secret_value() if isinstance(value, SecretStr) else value
    key = text.strip()
    if not key:
        raise InputError(f"the API key from {source} is empty")
    problem = _unsendable(key)
    if problem is not None:
        raise InputError(f"the API key from {source} {problem}; set it again without it")
    return APIKey(key, source)


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

    @field_validator("api_key", mode="before")
    @classmethod
    def _check_api_key(cls, value: object) -> object:
        # An InputError is not a ValueError: pydantic lets it through as it is, so the one line (and not
        # a ValidationError quoting the input) is what the user gets.
        if isinstance(value, APIKey):
            return value  # checked where it was loaded (a block): keep its source
        if isinstance(value, str | SecretStr):
            return checked_api_key(value, ENV_KEY_SOURCE)
        return value

    @field_validator("store_url", mode="before")
    @classmethod
    def _strip_store_url(cls, value: object) -> object:
        # A URL from a file or a .env line ends in a newline that would become part of the password.
        return value.strip() or None if isinstance(value, str) else value

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
