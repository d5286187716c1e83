"""The one definition of an enrich run's options: names, defaults, ranges and help text.

The `enrich-contacts` flow declares the same parameters (Prefect builds its UI form and
`--param` parsing from the flow's signature, so they stay plain keyword parameters there) and turns them
into this model first thing; the CLI generates its options from it; the backfill validates the
parameters it hands to each shard through it. `tests/test_options.py` proves the four agree.
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cleanlist.constants import INITIAL_RETRY_DELAY, MAX_CONTACTS_PER_REQUEST, POLL_NOT_FOUND_GRACE, RETRIES
from cleanlist.dburl import is_database_url
from cleanlist.errors import InputError
from cleanlist.settings import RateLimit
from cleanlist.vocab import EnrichmentType

# How a cursor column's values compare (cleanlist/io/cursor.py): "auto" infers number or timestamp and
# never falls back to text.
CursorType = Literal["auto", "number", "timestamp", "text"]

# Threads of the flow's task runner: every chunk task in flight holds one while it waits in the limiter.
TASK_RUNNER_WORKERS = 32
# Prefect's rule for block document names.
_BLOCK_NAME = re.compile(r"[a-z0-9-]+")
# fsspec storage options (s3fs, gcsfs, adlfs) that carry a secret: they come from blocks, not parameters.
_SECRET_STORAGE_OPTIONS = frozenset(
    {
        "secret",
        "token",
        "password",
        "session_token",
        "aws_secret_access_key",
        "aws_session_token",
        "account_key",
        "sas_token",
        "client_secret",
        "credentials",
    }
)


class EnrichOptions(BaseModel):
    """Everything one enrich-contacts run is told; the flow's parameters, validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(
        description="path or fsspec URL (.csv .tsv .parquet .jsonl .xlsx), or a SQLAlchemy URL "
        "(or block:sqlalchemy-connector/NAME)",
        min_length=1,
    )
    output: str = Field(
        description="path/URL ending .csv .parquet .jsonl, or a database URL (with table; or "
        "block:sqlalchemy-connector/NAME)",
        min_length=1,
    )
    enrichment_type: EnrichmentType = Field(
        default=EnrichmentType.PARTIAL,
        description="what to look up (and pay for): none, partial, phone_only, full, …",
    )
    mapping: dict[str, str] | None = Field(
        default=None, description="field → source column, for headers the automatic mapping misses"
    )
    rejects: str | None = Field(
        default=None, description="where invalid rows go (default <output>.rejects.csv)"
    )
    table: str | None = Field(
        default=None, description="with a database URL as output: the table to upsert into"
    )
    sql_query: str | None = Field(
        default=None, description="with a SQLAlchemy URL as source: the query to read"
    )
    store: str | None = Field(
        default=None,
        description="SQLAlchemy URL (or block:sqlalchemy-connector/NAME) of the enrichment store "
        "(default ~/.cleanlist/store.db)",
    )
    refresh_days: float = Field(
        default=30.0,
        ge=0,
        description="re-enrich contacts whose stored result is older than this (0 = always)",
    )
    max_credits: float | None = Field(
        default=None, gt=0, description="never let the run's worst-case spend exceed this"
    )
    dry_run: bool = Field(default=False, description="read, prepare and plan; submit nothing")
    webhook_url: str | None = Field(
        default=None,
        description="public base URL of a cleanlist webhook receiver (the run's own with webhook_listen, "
        "else a shared `cleanlist-enrich receiver` on the same store); the API POSTs to <url>/hooks/<token>",
    )
    credit_recheck_seconds: float = Field(
        default=60.0, gt=0, description="while paused on 402, how often to re-check the balance"
    )
    pause_timeout_seconds: int = Field(
        default=7 * 24 * 3600, gt=0, description="give up on a credit pause after this long"
    )
    poll_timeout_seconds: float = Field(
        default=6 * 3600.0,
        gt=0,
        description="stop polling a workflow after this long (its contacts stay pending)",
    )
    initial_poll_seconds: float = Field(
        default=5.0,
        gt=0,
        description="a generous guess at how long a workflow takes: the first status probe goes out at a "
        "quarter of it, and the poller learns the real figure from there",
    )
    not_found_grace_seconds: float = Field(
        default=POLL_NOT_FOUND_GRACE,
        ge=0,
        description="a workflow this run just submitted that the status endpoint does not know yet is "
        "asked again for this long before it counts as forgotten (its tasks are then asked for by id)",
    )
    max_concurrent_chunks: int = Field(
        default=8,
        ge=1,
        le=TASK_RUNNER_WORKERS,
        description="chunk tasks in flight at once (at most the task runner's threads)",
    )
    retries: int = Field(
        default=RETRIES, ge=0, description="retries of a chunk after a transient error (429, 5xx)"
    )
    retry_delay_seconds: float = Field(
        default=INITIAL_RETRY_DELAY, ge=0, description="first retry delay; doubles each retry, with jitter"
    )
    batch_rows: int = Field(default=50_000, ge=1, description="rows read (and held in memory) at a time")
    base_url: str | None = Field(
        default=None, description="the API's host or documented base (default CLEANLIST_BASE_URL)"
    )
    rate_limit: str | None = Field(
        default=None,
        description="the organization's limit per endpoint: N/SECONDS, a ceiling learning only lowers, "
        "or auto[/SECONDS], learned from 429s (default CLEANLIST_RATE_LIMIT, else 60/60)",
    )

    sheet: str | None = Field(
        default=None, description="with an .xlsx source: the sheet to read ('*' = every sheet, same header)"
    )
    encoding: str | None = Field(
        default=None, description="the source's text encoding (default: UTF-8, else detected and logged)"
    )
    raw_csv: bool = Field(
        default=False,
        description="write CSV cells as they are (default: a leading = + - @, tab or CR gets a ')",
    )
    api_outage_seconds: float = Field(
        default=300.0,
        gt=0,
        description="stop the run (results so far written, exit 1) after the API was unreachable this long",
    )
    cursor: str | None = Field(
        default=None,
        min_length=1,
        description="incremental: read only rows whose value in this column (e.g. updated_at) is past the "
        "last completed run's mark for this source",
    )
    full_refresh: bool = Field(
        default=False, description="with --cursor: read every row, ignoring the mark (then update it)"
    )
    cursor_type: CursorType = Field(
        default="auto",
        description="with --cursor: how its values compare: auto (the stored mark's kind, else number or "
        "timestamp as the values show, never text), number, timestamp (UTC; no offset = UTC) or text",
    )
    credentials: str | None = Field(
        default=None,
        description="name of the CleanlistCredentials block (API key, base URL, rate limit) to run with "
        "(default: the Secret block cleanlist-api-key, else CLEANLIST_API_KEY)",
    )
    storage_options: dict[str, Any] | None = Field(
        default=None,
        description="fsspec options for a source or output URL (s3://, gs://…), e.g. endpoint_url, "
        "region_name, anon; credentials go in a block (storage_credentials), never here",
    )
    storage_credentials: str | None = Field(
        default=None,
        description="object storage credentials from a Prefect block: block:aws-credentials/NAME "
        "(pip install .[s3]) or block:gcp-credentials/NAME (.[gcs])",
    )

    webhook_listen: str | None = Field(
        default=None,
        description="HOST:PORT: receive webhooks for the run's duration (sent as http://HOST:PORT/hooks/… "
        "unless webhook_url is given); workflows are then polled only when their delivery is overdue",
    )
    webhook_grace_seconds: float = Field(
        default=0.5,
        ge=0,
        description="with webhooks: how long past a workflow's expected completion to wait for its delivery "
        "before polling it",
    )
    webhook_allow: str | None = Field(
        default=None,
        description="with webhook_listen: only these sender networks (CIDRs, comma- or space-separated; "
        "ask Cleanlist support for its outbound addresses) may deliver; others get 403",
    )
    webhook_tls_cert: str | None = Field(
        default=None,
        description="with webhook_listen: serve HTTPS with this certificate (PEM; with webhook_tls_key), "
        "or leave TLS to a reverse proxy in front and give its URL as webhook_url",
    )
    webhook_tls_key: str | None = Field(
        default=None, description="with webhook_tls_cert: the certificate's private key (PEM)"
    )
    webhook_retry_scale: float = Field(
        default=1.0,
        ge=0,
        description="with webhooks: multiplies Cleanlist's documented retry waits (1, 2, 4, 8 s) that an "
        "overdue delivery with failed attempts is given before it is polled (tests shorten them)",
    )

    @field_validator("webhook_listen")
    @classmethod
    def _listen_parses(cls, value: str | None) -> str | None:
        if value:
            from cleanlist.webhooks.server import parse_listen

            try:
                parse_listen(value)
            except InputError as exc:
                raise ValueError(str(exc)) from None
        return value or None

    @field_validator("webhook_allow")
    @classmethod
    def _allow_parses(cls, value: str | None) -> str | None:
        if value:
            from cleanlist.webhooks.app import parse_networks

            try:
                parse_networks([value])
            except InputError as exc:
                raise ValueError(str(exc)) from None
        return value or None

    @model_validator(mode="after")
    def _tls_pair(self) -> Self:
        if bool(self.webhook_tls_cert) != bool(self.webhook_tls_key):
            raise ValueError("webhook_tls_cert and webhook_tls_key go together")
        return self

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit_parses(cls, value: str | None) -> str | None:
        if value:
            RateLimit.parse(value)
        return value or None

    @field_validator("credentials")
    @classmethod
    def _credentials_is_a_block_name(cls, value: str | None) -> str | None:
        # "" is what prefect.yaml deploys for a Variable that is not set: no block, as for `store`.
        return check_block_name(value) if value else None

    @field_validator("storage_options")
    @classmethod
    def _no_secrets_in_storage_options(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        secret = sorted(_SECRET_STORAGE_OPTIONS & set(value or {}))
        if secret:
            raise ValueError(
                f"must not hold credentials ({', '.join(secret)}): flow parameters are shown in the UI; "
                "give them as a block with storage_credentials (block:aws-credentials/NAME)"
            )
        return value or None

    @classmethod
    def from_parameters(cls, parameters: dict[str, Any]) -> EnrichOptions:
        """Validate parameters as given to the flow; a bad value is one InputError line."""
        try:
            return cls.model_validate(parameters)
        except ValidationError as exc:
            raise InputError(describe_validation_error(exc)) from None

    def as_parameters(self) -> dict[str, Any]:
        """The options that differ from their defaults, as flow parameters (JSON-compatible)."""
        return self.model_dump(mode="json", exclude_defaults=True)

    @property
    def rejects_target(self) -> str:
        """Where rejects go: `rejects`, else the table NAME_rejects beside a database output, else a
        file beside the output (`out/enriched.csv` → `out/enriched.rejects.csv`)."""
        if self.rejects:
            return self.rejects
        if self.table:
            return f"{self.table}_rejects"
        return f"{self.output.rpartition('.')[0]}.rejects.csv"

    def check_destinations(self) -> None:
        """One InputError line when the output or the rejects cannot be written as given.

        The flow calls this before anything is read or sent, so nothing is spent on a run whose results
        could not be written. Refused: an output or rejects file that is the source (after following
        symlinks; hard links too), the output and the rejects being one file, a local directory that
        cannot be created or written to. Missing directories are created here (0700, as the writer
        would; not on a dry run, which only checks that they could be). Remote URLs (s3://…) are only
        compared as strings; database outputs (with `table`) skip the file checks.
        """
        from cleanlist.io.location import display_source
        from cleanlist.io.outputs import output_format
        from cleanlist.io.sink import local_path

        if self.table is not None:
            if not is_database_url(self.output):
                raise InputError(
                    "--table needs a database URL as --output (sqlite:///… or postgresql://…), "
                    f"not {self.output!r}"
                )
            return
        output_format(self.output)
        rejects = self.rejects_target
        names = {self.output: "--output", rejects: "--rejects" if self.rejects else "the rejects file"}
        if self.output == rejects:
            raise InputError("--output and --rejects are the same file; give them different paths")
        source = local_path(self.source)
        for target in (self.output, rejects):
            path = local_path(target)
            same = self.source == target
            if path is not None and source is not None:
                same = same or _same_file(source, path)
            if same:
                raise InputError(
                    f"{names[target]} {display_source(target)} is the source file; write to another path "
                    "(the source is never overwritten)"
                )
        out, rej = local_path(self.output), local_path(rejects)
        if out is not None and rej is not None and _same_file(out, rej):
            raise InputError(f"--output {self.output} and {names[rejects]} {rejects} are the same file")
        for target, path in ((self.output, out), (rejects, rej)):
            if path is not None:
                _check_writable(names[target], path, create=not self.dry_run)

    @property
    def chunk_size(self) -> int:
        return MAX_CONTACTS_PER_REQUEST

    @property
    def fresh_after(self) -> datetime | None:
        """Stored results newer than this count as fresh; None when every contact is re-enriched."""
        if self.refresh_days <= 0:
            return None
        return datetime.now(UTC) - timedelta(days=self.refresh_days)


def check_block_name(value: str) -> str:
    """A Prefect block name (lowercase letters, digits, dashes), else ValueError.

    The message never echoes the value: a key pasted in its place by mistake must not reach a log line.
    """
    if not _BLOCK_NAME.fullmatch(value):
        raise ValueError(
            "must be the name of a CleanlistCredentials block (lowercase letters, digits, dashes), "
            "never the key itself"
        )
    return value


def _same_file(one: Path, other: Path) -> bool:
    """Whether two local paths name one file: the same real path (symlinks followed) or, when both
    exist, the same inode (hard links, case-insensitive filesystems)."""
    if os.path.realpath(one) == os.path.realpath(other):
        return True
    try:
        return os.path.samefile(one, other)
    except OSError:  # one of them does not exist (yet)
        return False


def _check_writable(what: str, path: Path, *, create: bool) -> None:
    """One InputError line unless `path` can be written: its directory exists (or is created, 0700,
    when `create`; else could be) and is writable, and `path` is not itself a directory."""
    from cleanlist.store.database import make_private_dirs

    if path.is_dir():
        raise InputError(f"{what} {path} is a directory; give a file path")
    directory = probe = path.parent
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"cannot create the directory {directory} of {what}: {probe} is not a directory")
    if create:
        try:
            make_private_dirs(directory)
        except OSError as exc:
            raise InputError(
                f"cannot create the directory {directory} of {what}: {exc.strerror or exc}"
            ) from None
        probe = directory
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"the directory {probe} of {what} is not writable")


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming each bad option and what is wrong with it."""
    parts = []
    for error in exc.errors():
        name = ".".join(str(part) for part in error["loc"]) or "options"
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "is not an option"
        elif error["type"] == "missing":
            message = "is required"
        parts.append(f"{name} {message}" if message.startswith(("is ", "must ")) else f"{name}: {message}")
    return "invalid options: " + "; ".join(parts)
