"""Where the API key comes from: the Prefect Secret block `cleanlist-api-key`, else CLEANLIST_API_KEY."""

from __future__ import annotations

import logging

from pydantic import SecretStr

from cleanlist.errors import MissingAPIKeyError
from cleanlist.settings import CleanlistSettings

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
