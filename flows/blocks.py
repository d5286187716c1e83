"""Secrets a run reads from Prefect blocks, named in its parameters as `block:TYPE/NAME`.

- Database URLs: `block:sqlalchemy-connector/NAME` wherever a URL is accepted (source, output, store);
  prefect-sqlalchemy's `SqlAlchemyConnector`, its URL given as components (the password is a secret
  field) or as one string.
- Object storage: `storage_credentials` = `block:aws-credentials/NAME` (prefect-aws, for s3fs) or
  `block:gcp-credentials/NAME` (prefect-gcp, for gcsfs), merged into the run's `storage_options`.

A run's parameters carry only the block's name; what the block holds is read inside the run and lives
only in memory (messages show database URLs with the password hidden).
"""

from __future__ import annotations

from typing import Any, Final

from cleanlist.errors import InputError
from cleanlist.run.options import EnrichOptions

BLOCK_PREFIX: Final = "block:"
CONNECTOR_SLUG: Final = "sqlalchemy-connector"
# The options that take a database URL, and their flags for messages.
DATABASE_OPTIONS: Final = {"source": "SOURCE", "output": "--output", "store": "--store"}


def is_block_reference(value: str | None) -> bool:
    return bool(value) and str(value).startswith(BLOCK_PREFIX)


def resolve_blocks(options: EnrichOptions) -> EnrichOptions:
    """`options` with every `block:sqlalchemy-connector/NAME` replaced by the block's URL and the
    storage credentials block's options merged into `storage_options` (the run's own options win)."""
    update: dict[str, Any] = {
        name: database_url_of(value, what=flag)
        for name, flag in DATABASE_OPTIONS.items()
        if is_block_reference(value := getattr(options, name))
    }
    if options.storage_credentials:
        from_block = storage_options_of(options.storage_credentials)
        update["storage_options"] = {**from_block, **(options.storage_options or {})}
    return options.model_copy(update=update) if update else options


def database_url_of(reference: str, *, what: str) -> str:
    """The SQLAlchemy URL (password included) saved in the block `reference` names; one InputError line
    when the reference is malformed, the block type unsupported or missing, or the block absent."""
    slug, _, name = reference.removeprefix(BLOCK_PREFIX).partition("/")
    if slug != CONNECTOR_SLUG or not name:
        raise InputError(
            f"{what} {reference!r} is not a block reference I can read: write "
            f"block:{CONNECTOR_SLUG}/NAME (a prefect-sqlalchemy SqlAlchemyConnector block)"
        )
    try:
        from prefect_sqlalchemy import ConnectionComponents, SqlAlchemyConnector
        from sqlalchemy.engine import make_url

        from cleanlist_prefect.tasks.prefect_types import sync_result
    except ImportError:
        raise InputError(
            f"{what} names a {CONNECTOR_SLUG} block: install prefect-sqlalchemy "
            "(pip install prefect-sqlalchemy)"
        ) from None
    try:
        block = sync_result(SqlAlchemyConnector.load(name, _sync=True))
    except Exception as exc:  # never quoted: a validation error of a malformed block carries its values
        raise InputError(
            f"{what}: no SqlAlchemyConnector block named {name!r} (create it in the UI, Blocks → SQLAlchemy "
            "Connector, or with SqlAlchemyConnector(...).save(NAME))"
            if _is_missing(exc)
            else f"{what}: the SqlAlchemyConnector block {name!r} could not be loaded "
            f"({type(exc).__name__}; check its fields and that the Prefect API is reachable)"
        ) from None
    info = block.connection_info
    url = info.create_url() if isinstance(info, ConnectionComponents) else make_url(str(info))
    return url.render_as_string(hide_password=False)


STORAGE_SLUGS: Final = {"aws-credentials": ("prefect-aws", "s3"), "gcp-credentials": ("prefect-gcp", "gcs")}


def storage_options_of(reference: str) -> dict[str, Any]:
    """fsspec storage options (s3fs or gcsfs) from the AwsCredentials / GcpCredentials block named."""
    slug, _, name = reference.removeprefix(BLOCK_PREFIX).partition("/")
    if not reference.startswith(BLOCK_PREFIX) or slug not in STORAGE_SLUGS or not name:
        raise InputError(
            f"storage_credentials {reference!r} is not a block reference I can read: write "
            "block:aws-credentials/NAME or block:gcp-credentials/NAME"
        )
    package, extra = STORAGE_SLUGS[slug]
    try:
        from prefect.blocks.core import Block

        from cleanlist_prefect.tasks.prefect_types import sync_result

        block_class = Block.get_block_class_from_key(slug)
    except KeyError:
        block_class = None
    if block_class is None:
        raise InputError(
            f"storage_credentials names a {slug} block: install {package} (pip install '.[{extra}]')"
        )
    try:
        block = sync_result(block_class.load(name, _sync=True))  # type: ignore[call-arg]
    except Exception as exc:  # never quoted, as above
        raise InputError(
            f"storage_credentials: no {slug} block named {name!r}"
            if _is_missing(exc)
            else f"storage_credentials: the {slug} block {name!r} could not be loaded "
            f"({type(exc).__name__}; check its fields and that the Prefect API is reachable)"
        ) from None
    return _s3fs_options(block) if slug == "aws-credentials" else _gcsfs_options(block)


def _is_missing(exc: Exception) -> bool:
    """Prefect's Block.load answer for a name it does not know (a ValueError)."""
    return isinstance(exc, ValueError) and "Unable to find block document" in str(exc)


def _secret(value: Any) -> Any:
    return value.get_secret_value() if hasattr(value, "get_secret_value") else value


def _s3fs_options(block: Any) -> dict[str, Any]:
    """s3fs's names for prefect-aws AwsCredentials fields (its client parameters' endpoint included)."""
    options: dict[str, Any] = {
        "key": block.aws_access_key_id,
        "secret": _secret(block.aws_secret_access_key),
        "token": _secret(block.aws_session_token),
        "profile": block.profile_name,
    }
    client_kwargs: dict[str, Any] = {}
    if block.region_name:
        client_kwargs["region_name"] = block.region_name
    parameters = block.aws_client_parameters
    endpoint = getattr(parameters, "endpoint_url", None)
    if endpoint:
        options["endpoint_url"] = str(endpoint)
    if getattr(parameters, "verify", True) is False:
        client_kwargs["verify"] = False
    if client_kwargs:
        options["client_kwargs"] = client_kwargs
    return {key: value for key, value in options.items() if value is not None}


def _gcsfs_options(block: Any) -> dict[str, Any]:
    """gcsfs's names for prefect-gcp GcpCredentials fields: a service account (file or info), project."""
    options: dict[str, Any] = {"project": block.project}
    if block.service_account_info is not None:
        options["token"] = dict(_secret(block.service_account_info))
    elif block.service_account_file is not None:
        options["token"] = str(block.service_account_file)
    return {key: value for key, value in options.items() if value is not None}
