"""Where a run's API key comes from: a named `CleanlistCredentials` block, else the Prefect Secret block
`cleanlist-api-key`, else CLEANLIST_API_KEY (`run_credentials` states the whole precedence).

Every key is checked where it is loaded (`cleanlist.settings.checked_api_key`) and remembers its source
(`APIKey.source`): a key error, at load or from the API (401/403), names the source to fix. A Secret
block that wins over a different CLEANLIST_API_KEY says so in the log.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr, ValidationError

from cleanlist.errors import POLICY, AuthenticationError, InputError, MissingAPIKeyError
from cleanlist.run.options import describe_validation_error
from cleanlist.settings import ENV_KEY_SOURCE, APIKey, CleanlistSettings, checked_api_key

if TYPE_CHECKING:
    from cleanlist_prefect.flows.credentials import CleanlistCredentials

SECRET_BLOCK = "cleanlist-api-key"
SECRET_BLOCK_SOURCE = f"the Secret block {SECRET_BLOCK!r}"
logger = logging.getLogger("cleanlist.secrets")


def _secret_block_value() -> str | None:
    """The Secret block's value, None when there is none (or it cannot be read: said in the log)."""
    try:
        from prefect.blocks.system import Secret

        from cleanlist_prefect.tasks.prefect_types import sync_result

        block = sync_result(Secret.load(SECRET_BLOCK, _sync=True))  # type: ignore[call-arg]
        value = block.get()
    except ValueError:
        return None  # no such block: fall back to the environment
    except Exception as exc:  # the API is unreachable or the block is malformed
        logger.warning(
            "could not read the %s Secret block (%s); using CLEANLIST_API_KEY",
            SECRET_BLOCK,
            type(exc).__name__,
        )
        return None
    return value if isinstance(value, str) and value.strip() else None


def resolve_api_key(settings: CleanlistSettings) -> APIKey:
    """The key from the Secret block when one is saved, otherwise from the environment."""
    value = _secret_block_value()
    from_env = settings.api_key
    if value is not None:
        key = checked_api_key(value, SECRET_BLOCK_SOURCE)
        if from_env is not None and from_env.get_secret_value() != key.get_secret_value():
            logger.warning(
                "using the API key from %s; CLEANLIST_API_KEY is set to another key and is not used",
                SECRET_BLOCK_SOURCE,
            )
            key.source = f"{SECRET_BLOCK_SOURCE} (used instead of CLEANLIST_API_KEY)"
        return key
    if from_env is None or not from_env.get_secret_value().strip():
        raise MissingAPIKeyError()
    return checked_api_key(from_env, ENV_KEY_SOURCE)


def _fix_for(source: str) -> str:
    """What to do about a refused key, by where it came from."""
    if source.startswith(SECRET_BLOCK_SOURCE):
        return f"save a valid one with `cleanlist-enrich set-key` (it is {SECRET_BLOCK_SOURCE})"
    if source.startswith("the CleanlistCredentials block "):
        name = source.split("'")[1] if "'" in source else "NAME"
        return f"save a valid one with `cleanlist-enrich set-key --credentials {name}`"
    return "set a valid CLEANLIST_API_KEY"


def naming_key_source(message: str, key: SecretStr) -> str:
    """`message` (a key refused by the API, 401 or 403) saying which configured key it was and its fix.

    The error table's own fix ("set a valid CLEANLIST_API_KEY") is the right one only for a key from the
    environment: for a key from a block it sends the user to the wrong place.
    """
    source = key.source if isinstance(key, APIKey) else ENV_KEY_SOURCE
    generic = POLICY[AuthenticationError].fix
    if generic in message:
        return message.replace(
            generic, f"the API key from {source} is missing, expired or revoked: {_fix_for(source)}"
        )
    return f"{message} (the API key came from {source})"


def save_api_key(value: str) -> None:
    """Store the key in the Secret block (overwriting), for deployments."""
    from prefect.blocks.system import Secret

    key = checked_api_key(value, "standard input")  # a key httpx would refuse is never saved
    Secret(value=SecretStr(key.get_secret_value())).save(SECRET_BLOCK, overwrite=True, _sync=True)  # type: ignore[call-arg]


def load_credentials(name: str) -> CleanlistCredentials:
    """The `CleanlistCredentials` block `name`; one InputError line when there is none."""
    from cleanlist_prefect.flows.credentials import CleanlistCredentials
    from cleanlist_prefect.tasks.prefect_types import sync_result

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
    block.checked_key()  # a key no header can carry: one line naming this block, before anything runs
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
        return settings, block.checked_key()
    return settings, resolve_api_key(settings)


def save_credentials(
    name: str, api_key: str, *, base_url: str | None = None, rate_limit: str | None = None
) -> CleanlistCredentials:
    """Create the `CleanlistCredentials` block `name`, or update its key (and the fields given) in place."""
    from cleanlist_prefect.flows.credentials import CleanlistCredentials
    from cleanlist_prefect.tasks.prefect_types import sync_result

    try:
        block = sync_result(CleanlistCredentials.load(name, _sync=True))  # type: ignore[call-arg]
    except ValueError:  # no such block yet
        block = None
    key = checked_api_key(api_key, "standard input")
    fields: dict[str, Any] = {
        "api_key": SecretStr(key.get_secret_value()),
        "base_url": base_url or (block.base_url if block is not None else None),
        "rate_limit": rate_limit or (block.rate_limit if block is not None else None),
    }
    try:
        updated = CleanlistCredentials(**fields)
    except ValidationError as exc:
        raise InputError(describe_validation_error(exc)) from None
    updated.save(name, overwrite=True, _sync=True)  # type: ignore[call-arg]
    return updated
