"""Where a run's API key comes from: a named `CleanlistCredentials` block, else the Prefect Secret block
`cleanlist-api-key`, else CLEANLIST_API_KEY (`run_credentials` states the whole precedence)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr, ValidationError

from cleanlist.errors import InputError, MissingAPIKeyError
from cleanlist.run.options import describe_validation_error
from cleanlist.settings import CleanlistSettings

if TYPE_CHECKING:
    from flows.credentials import CleanlistCredentials

SECRET_BLOCK = "cleanlist-api-key"
logger = logging.getLogger("cleanlist.secrets")


def resolve_api_key(settings: CleanlistSettings) -> SecretStr:
    """The key from the Secret block when one is saved, otherwise from the environment."""
    try:
        from prefect.blocks.system import Secret

        from tasks.prefect_types import sync_result

        block = sync_result(Secret.load(SECRET_BLOCK, _sync=True))  # type: ignore[call-arg]
        value = block.get()
        if isinstance(value, str) and value.strip():
            return SecretStr(value.strip())
    except ValueError:
        pass  # no such block: fall back to the environment
    except Exception as exc:  # the API is unreachable or the block is malformed
        logger.warning(
            "could not read the %s Secret block (%s); using CLEANLIST_API_KEY",
            SECRET_BLOCK,
            type(exc).__name__,
        )
    if settings.api_key is None or not settings.api_key.get_secret_value().strip():
        raise MissingAPIKeyError()
    return settings.api_key


def save_api_key(value: str) -> None:
    """Store the key in the Secret block (overwriting), for deployments."""
    from prefect.blocks.system import Secret

    Secret(value=SecretStr(value.strip())).save(SECRET_BLOCK, overwrite=True, _sync=True)  # type: ignore[call-arg]


def load_credentials(name: str) -> CleanlistCredentials:
    """The `CleanlistCredentials` block `name`; one InputError line when there is none."""
    from flows.credentials import CleanlistCredentials
    from tasks.prefect_types import sync_result

    try:
        block = sync_result(CleanlistCredentials.load(name, _sync=True))  # type: ignore[call-arg]
    except ValueError:  # Prefect's "Unable to find block document"
        raise InputError(
            f"no CleanlistCredentials block named {name!r}: create it with "
            f"`cleanlist-enrich set-key --credentials {name}` (the key is read from standard input)"
        ) from None
    except Exception as exc:  # never quoted: a pydantic error under it carries the block's field values
        if isinstance(exc, RuntimeError) and "failed validation" in str(exc):  # Prefect 3.9's wording
            raise InputError(
                f"the CleanlistCredentials block {name!r} is not valid (check its base URL and rate "
                f"limit, or save it again with `cleanlist-enrich set-key --credentials {name}`)"
            ) from None
        # The Prefect API is unreachable: fail rather than fall back to another organization's key.
        raise InputError(
            f"could not read the CleanlistCredentials block {name!r} ({type(exc).__name__}); "
            "is the Prefect API reachable?"
        ) from None
    assert isinstance(block, CleanlistCredentials)
    return block


def run_credentials(
    credentials: str | None, *, base_url: str | None = None, rate_limit: str | None = None
) -> tuple[CleanlistSettings, SecretStr]:
    """A run's settings and API key.

    The key: the `CleanlistCredentials` block named by `credentials` when given (a missing block is an
    error, never a silent fallback to another organization's key); otherwise the Secret block
    `cleanlist-api-key`, else CLEANLIST_API_KEY. Base URL and rate limit: the run's own option, else the
    named block's field, else CLEANLIST_BASE_URL / CLEANLIST_RATE_LIMIT, else the defaults.
    """
    settings = CleanlistSettings()
    block = load_credentials(credentials) if credentials else None
    if block is not None:
        settings = block.settings(settings)
    if base_url:
        settings.base_url = base_url
    if rate_limit:
        settings.rate_limit = rate_limit
    if block is not None:
        return settings, block.api_key
    return settings, resolve_api_key(settings)


def save_credentials(
    name: str, api_key: str, *, base_url: str | None = None, rate_limit: str | None = None
) -> CleanlistCredentials:
    """Create the `CleanlistCredentials` block `name`, or update its key (and the fields given) in place."""
    from flows.credentials import CleanlistCredentials
    from tasks.prefect_types import sync_result

    try:
        block = sync_result(CleanlistCredentials.load(name, _sync=True))  # type: ignore[call-arg]
    except ValueError:  # no such block yet
        block = None
    fields: dict[str, Any] = {
        "api_key": SecretStr(api_key.strip()),
        "base_url": base_url or (block.base_url if block is not None else None),
        "rate_limit": rate_limit or (block.rate_limit if block is not None else None),
    }
    try:
        updated = CleanlistCredentials(**fields)
    except ValidationError as exc:
        raise InputError(describe_validation_error(exc)) from None
    updated.save(name, overwrite=True, _sync=True)  # type: ignore[call-arg]
    return updated
