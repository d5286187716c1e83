"""The `CleanlistCredentials` block: one organization's API key, host and rate limit, saved in Prefect.

Several blocks live side by side (one per organization or environment) and a run picks one by name
(`--credentials NAME`, the `credentials` flow parameter). The key stays in the block: a run's
parameters carry only the block's name. `prefect block register -m cleanlist_prefect.flows.credentials` registers the type;
an installed package also registers it through its `prefect.collections` entry point.
"""

from __future__ import annotations

from typing import Any, ClassVar

from prefect.blocks.core import Block
from pydantic import Field, SecretStr, field_validator

from cleanlist.client import CleanlistClient
from cleanlist.constants import DEFAULT_BASE_URL
from cleanlist.errors import InputError
from cleanlist.settings import APIKey, CleanlistSettings, RateLimit, checked_api_key, host_of


class CleanlistCredentials(Block):
    """Access to the Cleanlist Public API for one organization.

    Fields left empty fall back to the environment (`CLEANLIST_BASE_URL`, `CLEANLIST_RATE_LIMIT`) and then
    to the defaults; a run's own `--base-url` / `--rate-limit` override the block.
    """

    _block_type_name: ClassVar[str] = "Cleanlist Credentials"
    _block_type_slug: ClassVar[str] = "cleanlist-credentials"
    _description: ClassVar[str] = (
        "An organization's Cleanlist API key (secret), API host and client-side rate limit."
    )
    _code_example: ClassVar[str] = """
```python
from cleanlist_prefect.flows.credentials import CleanlistCredentials

with CleanlistCredentials.load("BLOCK_NAME").get_client() as client:
    print(client.credits_balance())
```"""

    api_key: SecretStr = Field(description="The organization's API key (`clapi_…`).")
    base_url: str | None = Field(
        default=None,
        description=f"API host or documented base (default CLEANLIST_BASE_URL, else {DEFAULT_BASE_URL}).",
    )
    rate_limit: str | None = Field(
        default=None,
        description="The organization's limit per endpoint, N/SECONDS (default CLEANLIST_RATE_LIMIT).",
    )

    @field_validator("api_key")
    @classmethod
    def _key_is_not_blank(cls, value: SecretStr) -> SecretStr:
        key = value.get_secret_value().strip()
        if not key:
            raise ValueError("the API key is empty")
        return SecretStr(key)

    @field_validator("base_url")
    @classmethod
    def _base_url_is_http(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not value.strip().startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        return host_of(value)

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit_parses(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        try:
            RateLimit.parse(value)
        except InputError as exc:  # pydantic reports ValueErrors as validation errors
            raise ValueError(str(exc)) from None
        return value.strip()

    def checked_key(self) -> APIKey:
        """The block's key, checked for header safety at load; an error names this block, not the
        environment (a key saved before the check existed may hold a newline or a control character)."""
        if isinstance(self.api_key, APIKey):
            return self.api_key
        name = self._block_document_name
        source = f"the CleanlistCredentials block {name!r}" if name else "the CleanlistCredentials block"
        return checked_api_key(self.api_key, source)

    def settings(self, base: CleanlistSettings | None = None) -> CleanlistSettings:
        """`base` (default: the environment's settings) with this block's key, host and rate limit."""
        settings = (base or CleanlistSettings()).model_copy()
        settings.api_key = self.checked_key()
        if self.base_url:
            settings.base_url = self.base_url
        if self.rate_limit:
            settings.rate_limit = self.rate_limit
        return settings

    def get_client(self, **kwargs: Any) -> CleanlistClient:
        """A client of this organization's API (close it, or use it as a context manager)."""
        settings = self.settings()
        return CleanlistClient(settings.api_key, settings=settings, **kwargs)
