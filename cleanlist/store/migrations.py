"""One-time rewrites of stored data when the schema version moves on; `ensure_schema` runs them.

Version 1 → 2: company domains are keyed by their registrable part (`prepare.registrable_domain`), so a
contact stored as `nm:jane|doe|blog.acme.co.uk` is `nm:jane|doe|acme.co.uk` today. Left alone, a rerun
would not find it and would pay for it again; so its rows are rewritten under the new key, in the contacts
table and in the ledger's `contact_keys`. Rows are rewritten in bounded batches, one transaction each,
and every step only moves a key to its fixed point (a registrable domain is its own registrable domain),
so a migration killed half-way and run again converges on the same store.

Version 2 → 3: contact keys fold Unicode compatibility forms (NFKC: full-width letters) and drop
zero-width characters, the BOM and bidi controls (`prepare.fold_compatible`), so a key stored with a
zero-width space inside a name (`nm:jo\\u200bsé|…`) is `nm:josé|…` today. Only keys holding a
non-ASCII character can change; they are rewritten (and merged with the row already under the new key,
when a contact was stored under two spellings) the same way. SQL cannot pick out non-ASCII keys
portably, so this step reads every key once, in the same bounded batches; a run opening the store
waits for it once.

Version 3 → 4: the runs table gains `boot_id` and `proc_start` (which process runs a run, beyond its
pid; `cleanlist/store/liveness.py`). Added as nullable columns, each only if missing, so a step killed
between them completes on the next open; older rows keep nulls and are judged by their pid as before.

Version 4 → 5: the runs table gains `liveness_lock` (the lock a run holds while open; nullable, added if
missing). Older rows keep null and are judged as before (heartbeat, pid and start time).

Version 5 → 6: the rate slots table gains `run_id` (the run that took a slot; nullable, added if missing),
so a slot left in flight by a killed run stops counting once that run is proved dead. Older slots keep
null and stop counting after `STALE_IN_FLIGHT` as before.

Version 6 → 7: the runs table gains its economics columns (`source`, `enrichment_type`, `submitted`,
`emails_found`, `phones_found`, `credits_spent`; nullable, added if missing), filled for the runs already
there from their stored parameters and summary (`economics.economics_of`), in bounded batches. Filling
writes the same values again when run twice, so a step killed half-way converges on the next open.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import (
    Column,
    Connection,
    Row,
    Table,
    bindparam,
    delete,
    insert,
    inspect,
    select,
    tuple_,
    update,
)
from sqlalchemy.schema import CreateColumn

from cleanlist.store.bulk import execute_rows
from cleanlist.store.codec import batches, dump_json, load_json
from cleanlist.store.economics import economics_of
from cleanlist.store.schema import (
    RUN_ECONOMICS_COLUMNS,
    SCHEMA_COMPONENT,
    SCHEMA_VERSION,
    contacts,
    rate_slots,
    runs,
    schema_info,
    workflows,
)
from cleanlist.vocab import ContactKeyKind, LedgerState

logger = logging.getLogger("cleanlist.store")

# Contact rows looked at per transaction: small enough that a batch never holds the write lock long.
CONTACT_BATCH_ROWS: Final = 5000
# Ledger rows per transaction: each holds up to a chunk's worth (250) of keys.
WORKFLOW_BATCH_ROWS: Final = 200

# Only a name key whose org part has two dots can hold a domain with a subdomain; the test is a cheap
# pre-filter, `upgraded_key` decides.
_CANDIDATE_KEY: Final = "nm:%.%.%"
_NAME_PREFIX: Final = ContactKeyKind.NAME.prefix

# A kept row takes the newest stored result of its group, and the in-flight submission (if any) of its
# group: the result is what a rerun reuses, the submission is money spent whose answer is still due.
_RESULT_COLUMNS: Final = (
    "result_workflow_id",
    "result_task_id",
    "result_status",
    "primary_email",
    "primary_email_status",
    "other_emails",
    "phones",
    "raw",
    "enriched_at",
)


def upgraded_key(key: str) -> str:
    """The key `prepare.contact_key` gives today to a contact an older store (or journal) holds under
    `key`: the registrable domain (version 2), then the folded spelling (version 3)."""
    return folded_key(registrable_key(key))


def folded_key(key: str) -> str:
    """`key` with each part folded as `prepare.key_part` folds it today (NFKC, no invisible characters).

    ASCII keys never change; nor does a key that is not `li:…` or a three-part `nm:…`.
    """
    if key.isascii():
        return key
    from cleanlist.prepare import key_part, visible  # see registrable_key

    if key.startswith(ContactKeyKind.LINKEDIN.prefix):
        return ContactKeyKind.LINKEDIN.key(visible(key[len(ContactKeyKind.LINKEDIN.prefix) :]))
    parts = _name_parts(key)
    if parts is None:
        return key
    return _NAME_PREFIX + "|".join(key_part(part) for part in parts)


def _name_parts(key: str) -> list[str] | None:
    """The three parts of a name key, unescaped (`\\|` → `|`, `\\\\` → `\\`), or None."""
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for char in key[len(_NAME_PREFIX) :]:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "|":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts if len(parts) == 3 and key.startswith(_NAME_PREFIX) else None


def registrable_key(key: str) -> str:
    """The key `prepare.contact_key` gives today to a contact a version-1 store holds under `key`.

    Only a name key whose org part is a domain as version 1 stored it (`bare_domain`'s output: ASCII,
    lower case, no `www.`) and has a subdomain changes. Company names, LinkedIn keys and registrable
    domains come back unchanged, and so does every key this returns.
    """
    if not key.startswith(_NAME_PREFIX):
        return key
    org = _org_part(key)
    if org is None or org.count(".") < 2:  # a one-dot domain is registrable already
        return key
    # Here, not at the top: opening a store that needs no upgrade (`cleanlist-enrich report`) should
    # not load the Public Suffix List (tldextract, requests) that only the key rewrite uses.
    from cleanlist.prepare import bare_domain, key_part, registrable_domain

    if bare_domain(org) != org:
        return key
    registrable = key_part(registrable_domain(org))
    return key if registrable == org else key[: len(key) - len(org)] + registrable


def _org_part(key: str) -> str | None:
    """The third `|`-separated part of a name key as stored (escapes kept), or None if it has no three."""
    if "\\" not in key:  # no escapes: every | separates (the common case, at str.split's speed)
        parts = key.split("|")
        return parts[2] if len(parts) == 3 else None  # first|last|org
    separators: list[int] = []
    escaped = False
    for index, char in enumerate(key):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "|":
            separators.append(index)
    return key[separators[1] + 1 :] if len(separators) == 2 else None  # first|last|org


@dataclass
class MigrationCount:
    """What a migration rewrote: contact rows moved, rows dropped as duplicates, ledger rows rewritten."""

    contacts_moved: int = 0
    contacts_merged: int = 0
    workflows_rewritten: int = 0
    columns_added: int = 0


def upgrade(conn: Connection, found: int) -> None:
    """Bring a store at schema version `found` to SCHEMA_VERSION, a step at a time, each one recorded.

    `conn` is not in a transaction; every batch of every step commits on its own (PostgreSQL callers
    hold the schema's session advisory lock around this).
    """
    for version in range(found, SCHEMA_VERSION):
        step = _STEPS.get(version)
        if step is None:
            raise RuntimeError(f"no migration from store schema version {version} to {version + 1}")
        count = step(conn)
        with conn.begin():
            conn.execute(
                update(schema_info)
                .where(schema_info.c.component == SCHEMA_COMPONENT, schema_info.c.version == version)
                .values(version=version + 1)
            )
        logger.info(
            "store schema %d → %d: %d contact keys rewritten (%d rows merged into a row of the same "
            "contact), %d ledger rows rewritten, %d columns added",
            version,
            version + 1,
            count.contacts_moved,
            count.contacts_merged,
            count.workflows_rewritten,
            count.columns_added,
        )


def rekey_registrable_domains(
    conn: Connection,
    *,
    contact_batch: int = CONTACT_BATCH_ROWS,
    workflow_batch: int = WORKFLOW_BATCH_ROWS,
) -> MigrationCount:
    """Version 1 → 2: move contact rows and ledger keys keyed by a full host to the registrable domain."""
    count = MigrationCount()
    _rekey_contacts(conn, contact_batch, count)
    _rekey_workflows(conn, workflow_batch, count)
    return count


def rekey_folded_spellings(
    conn: Connection,
    *,
    contact_batch: int = CONTACT_BATCH_ROWS,
    workflow_batch: int = WORKFLOW_BATCH_ROWS,
) -> MigrationCount:
    """Version 2 → 3: move contact rows and ledger keys holding full-width letters or invisible
    characters to the folded key."""
    count = MigrationCount()
    _rekey_contacts(conn, contact_batch, count, candidates=None)
    _rekey_workflows(conn, workflow_batch, count, candidates=None)
    return count


def _rekey_contacts(
    conn: Connection, batch_rows: int, count: MigrationCount, candidates: str | None = _CANDIDATE_KEY
) -> None:
    # Keyset paging over the primary key: each batch is the next `batch_rows` rows in key order (an
    # index range), and of those only the candidates are read. A filter in the paging query itself
    # would let PostgreSQL scan the whole table for every batch. A moved row may come round again
    # under its new key in a later range; it is then left as it is.
    pk = tuple_(contacts.c.contact_key, contacts.c.enrichment_type)
    after: tuple[str, str] | None = None
    while True:
        with conn.begin():
            bounds = select(contacts.c.contact_key, contacts.c.enrichment_type)
            if after is not None:
                bounds = bounds.where(pk > tuple_(*after))
            last = conn.execute(bounds.order_by(*pk.clauses).offset(batch_rows - 1).limit(1)).one_or_none()
            # `candidates`: a LIKE pattern only candidates match, or None to look at every key.
            page = bounds.where(contacts.c.contact_key.like(candidates)) if candidates else bounds
            if last is not None:
                page = page.where(pk <= tuple_(*last))
            moves: dict[str, dict[str, str]] = {}  # enrichment type → old key → new key
            for row in conn.execute(page):
                new = upgraded_key(row.contact_key)
                if new != row.contact_key:
                    moves.setdefault(row.enrichment_type, {})[row.contact_key] = new
            for enrichment_type, renamed in moves.items():
                _move_rows(conn, enrichment_type, renamed, count)
        if last is None:
            return
        after = (last.contact_key, last.enrichment_type)


_RENAME: Final = (
    update(contacts)
    .where(contacts.c.enrichment_type == bindparam("p_type"), contacts.c.contact_key == bindparam("p_old"))
    .values(contact_key=bindparam("p_new"))
)


def _move_rows(
    conn: Connection, enrichment_type: str, renamed: Mapping[str, str], count: MigrationCount
) -> None:
    """Put the rows of `renamed`'s old keys under their new keys, merging with rows already there."""
    targets = sorted(set(renamed.values()))
    taken: set[str] = set()
    for part in batches(targets):
        taken.update(
            conn.execute(
                select(contacts.c.contact_key).where(
                    contacts.c.enrichment_type == enrichment_type, contacts.c.contact_key.in_(part)
                )
            ).scalars()
        )
    sources: dict[str, list[str]] = {}
    for old, new in sorted(renamed.items()):
        sources.setdefault(new, []).append(old)
    # The common case, a key nobody else has or wants: renamed where it stands.
    execute_rows(
        conn,
        _RENAME,
        [
            {"p_type": enrichment_type, "p_old": olds[0], "p_new": new}
            for new, olds in sources.items()
            if new not in taken and len(olds) == 1
        ],
    )
    collisions = {new: olds for new, olds in sources.items() if new in taken or len(olds) > 1}
    count.contacts_moved += len(renamed)
    if collisions:
        _merge_rows(conn, enrichment_type, collisions, count)


def _merge_rows(
    conn: Connection, enrichment_type: str, collisions: Mapping[str, Sequence[str]], count: MigrationCount
) -> None:
    """Replace each group of rows (the new key's, if any, and its old keys') by one merged row."""
    involved = sorted({*collisions, *(old for olds in collisions.values() for old in olds)})
    found: dict[str, Row[Any]] = {}
    for part in batches(involved):
        stmt = select(contacts).where(
            contacts.c.enrichment_type == enrichment_type, contacts.c.contact_key.in_(part)
        )
        found.update((row.contact_key, row) for row in conn.execute(stmt))
    kept: list[dict[str, Any]] = []
    for new, olds in collisions.items():
        # The row already under the new key comes first: it wins ties.
        rows = [found[key] for key in (new, *olds) if key in found]
        if rows:
            kept.append(merged_row(rows, new))
            count.contacts_merged += len(rows) - 1
    for part in batches(involved):
        conn.execute(
            delete(contacts).where(
                contacts.c.enrichment_type == enrichment_type, contacts.c.contact_key.in_(part)
            )
        )
    if kept:
        conn.execute(insert(contacts), kept)


def merged_row(rows: Sequence[Row[Any]], key: str) -> dict[str, Any]:
    """One contact row, under `key`, for rows that are now the same contact.

    Its stored result is the newest of the group; its state is that of a row in flight if there is one
    (the earliest accepted: its answer is due first), else of the row with that result, else of the first
    row. No in-flight submission is lost unless two are (then the other stays in the ledger).
    """
    with_result = [row for row in rows if row.enriched_at is not None]
    in_flight = [row for row in rows if row.state == LedgerState.ACCEPTED]
    result = max(with_result, key=_enriched_at) if with_result else None
    flight = min(in_flight, key=_accepted_at) if in_flight else None
    base = flight or result or rows[0]
    values: dict[str, Any] = dict(base._mapping)
    if result is not None:
        values.update({name: result._mapping[name] for name in _RESULT_COLUMNS})
    values["contact_key"] = key
    return values


def _enriched_at(row: Row[Any]) -> datetime:
    when: datetime = row.enriched_at
    return when


def _accepted_at(row: Row[Any]) -> tuple[bool, str]:
    when: datetime | None = row.accepted_at
    return (when is None, when.isoformat() if when is not None else "")


_REWRITE_LEDGER_KEYS: Final = (
    update(workflows)
    .where(workflows.c.workflow_id == bindparam("p_workflow"))
    .values(contact_keys=bindparam("p_keys"))
)


def _rekey_workflows(
    conn: Connection, batch_rows: int, count: MigrationCount, candidates: str | None = _CANDIDATE_KEY
) -> None:
    # Paged like the contacts: an index range per batch, then the candidates within it.
    wid = workflows.c.workflow_id
    after = ""
    while True:
        with conn.begin():
            last = conn.execute(
                select(wid).where(wid > after).order_by(wid).offset(batch_rows - 1).limit(1)
            ).scalar_one_or_none()
            page = select(wid, workflows.c.contact_keys).where(wid > after)
            if candidates:
                page = page.where(workflows.c.contact_keys.like(f"%{candidates}"))
            if last is not None:
                page = page.where(wid <= last)
            changed: list[dict[str, str]] = []
            for row in conn.execute(page):
                keys: list[str] = load_json(row.contact_keys)
                # In place, duplicates and all: position i still pairs with task_ids[i].
                upgraded = [upgraded_key(key) for key in keys]
                if upgraded != keys:
                    changed.append({"p_workflow": row.workflow_id, "p_keys": dump_json(upgraded)})
            execute_rows(conn, _REWRITE_LEDGER_KEYS, changed)
            count.workflows_rewritten += len(changed)
        if last is None:
            return
        after = last


def add_run_process_identity(conn: Connection) -> MigrationCount:
    """Version 3 → 4: the runs table's `boot_id` and `proc_start` columns (nullable), where missing."""
    return _add_run_columns(conn, (runs.c.boot_id, runs.c.proc_start))


def add_run_liveness_lock(conn: Connection) -> MigrationCount:
    """Version 4 → 5: the runs table's `liveness_lock` column (nullable), if missing."""
    return _add_run_columns(conn, (runs.c.liveness_lock,))


def add_rate_slot_owner(conn: Connection) -> MigrationCount:
    """Version 5 → 6: the rate slots table's `run_id` column (nullable), if missing."""
    return _add_columns(conn, rate_slots, (rate_slots.c.run_id,))


# Run rows read and rewritten per transaction by the economics step.
RUN_BATCH_ROWS: Final = 500


def add_run_economics(conn: Connection) -> MigrationCount:
    """Version 6 → 7: the runs table's economics columns, filled from each run's params and counts."""
    count = _add_run_columns(conn, RUN_ECONOMICS_COLUMNS)
    after = ""
    while True:
        with conn.begin():
            rows = conn.execute(
                select(runs.c.run_id, runs.c.params, runs.c.counts)
                .where(runs.c.run_id > after)
                .order_by(runs.c.run_id)
                .limit(RUN_BATCH_ROWS)
            ).all()
            for row in rows:
                values = economics_of(_json_object(row.params), _json_object(row.counts))
                if values:
                    conn.execute(update(runs).where(runs.c.run_id == row.run_id).values(values))
        if len(rows) < RUN_BATCH_ROWS:
            return count
        after = rows[-1].run_id


def _json_object(text: str | None) -> dict[str, Any] | None:
    try:
        value = load_json(text)
    except ValueError:  # a row no version of this code wrote: left without economics
        return None
    return value if isinstance(value, dict) else None


def _add_run_columns(conn: Connection, columns: Sequence[Column[Any]]) -> MigrationCount:
    return _add_columns(conn, runs, columns)


def _add_columns(conn: Connection, table: Table, columns: Sequence[Column[Any]]) -> MigrationCount:
    count = MigrationCount()
    with conn.begin():
        present = {column["name"] for column in inspect(conn).get_columns(table.name)}
        for column in columns:
            if column.name not in present:
                ddl = CreateColumn(column).compile(dialect=conn.dialect)
                conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {ddl}")
                count.columns_added += 1
    return count


_STEPS: Final[dict[int, Callable[[Connection], MigrationCount]]] = {
    1: rekey_registrable_domains,
    2: rekey_folded_spellings,
    3: add_run_process_identity,
    4: add_run_liveness_lock,
    5: add_rate_slot_owner,
    6: add_run_economics,
}
