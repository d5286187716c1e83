"""Database URLs given as Prefect blocks: `block:sqlalchemy-connector/NAME` wherever a URL is accepted.

A run's parameters then carry only the block's name; the URL, password included, is read from the
block inside the run and lives only in memory (messages show it with the password hidden). The block
is prefect-sqlalchemy's `SqlAlchemyConnector`, with its URL given as components (the password is a
secret field) or as one string.
"""

from __future__ import annotations

from typing import Final

from cleanlist.errors import InputError
from cleanlist.run.options import EnrichOptions

BLOCK_PREFIX: Final = "block:"
CONNECTOR_SLUG: Final = "sqlalchemy-connector"
# The options that take a database URL, and their flags for messages.
DATABASE_OPTIONS: Final = {"source": "SOURCE", "output": "--output", "store": "--store"}


def is_block_reference(value: str | None) -> bool:
    return bool(value) and str(value).startswith(BLOCK_PREFIX)


def resolve_database_blocks(options: EnrichOptions) -> EnrichOptions:
    """`options` with every `block:sqlalchemy-connector/NAME` replaced by the block's URL."""
    update = {
        name: database_url_of(value, what=flag)
        for name, flag in DATABASE_OPTIONS.items()
        if is_block_reference(value := getattr(options, name))
    }
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

        from tasks.prefect_types import sync_result
    except ImportError:
        raise InputError(
            f"{what} names a {CONNECTOR_SLUG} block: install prefect-sqlalchemy "
            "(pip install prefect-sqlalchemy)"
        ) from None
    try:
        block = sync_result(SqlAlchemyConnector.load(name, _sync=True))
    except ValueError as exc:
        # Never quote the exception: a validation error of a malformed block carries its field values.
        missing = "Unable to find block document" in str(exc)
        raise InputError(
            f"{what}: no SqlAlchemyConnector block named {name!r} (create it in the UI, Blocks → SQLAlchemy "
            "Connector, or with SqlAlchemyConnector(...).save(NAME))"
            if missing
            else f"{what}: the SqlAlchemyConnector block {name!r} could not be loaded (check its fields)"
        ) from None
    info = block.connection_info
    url = info.create_url() if isinstance(info, ConnectionComponents) else make_url(str(info))
    return url.render_as_string(hide_password=False)
