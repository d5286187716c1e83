"""Database URLs: which strings are one, which backends we open, and how they appear in messages.

This module is the one place that decides:

- whether a source, output or store string is a database URL (`is_database_url`: by scheme, with an
  optional `+driver`, e.g. `sqlite:///x.db`, `postgresql+psycopg://u@h/db`);
- which backends are supported: SQLite and PostgreSQL only. MySQL/MariaDB (and SQLAlchemy's other
  dialects) are refused up front with one line, for sources, output tables and stores alike: no driver
  for them is a dependency and the upsert code only knows the sqlite and postgresql dialects;
- the SQLAlchemy `URL` to open (`to_sqlalchemy_url`: `postgresql://` and `postgres://` are bound to
  psycopg 3 unless the URL names a driver; SQLite is left as is);
- how a URL is shown in messages and logs (`display_url`: password hidden), and how any text that may
  hold URLs is shown (`hide_passwords`: summaries, parameters, driver messages).

Store-specific rules (the default SQLite file, no in-memory stores) live in `cleanlist.store.database`.
"""

from __future__ import annotations

import re
from typing import Final

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from cleanlist.errors import InputError

SUPPORTED_BACKENDS: Final = ("sqlite", "postgresql")
POSTGRES_DRIVER: Final = "psycopg"  # psycopg 3, the installed driver
_POSTGRES_NAMES: Final = frozenset({"postgresql", "postgres"})
# Database schemes we recognise but refuse (SQLAlchemy's other built-in dialects).
_REFUSED_BACKENDS: Final = frozenset({"mysql", "mariadb", "mssql", "oracle"})
_SCHEME: Final = re.compile(r"^([A-Za-z][A-Za-z0-9.-]*)(?:\+[A-Za-z0-9_.-]+)?://")
_EXPECTED: Final = "expected sqlite:///… or postgresql://…"


def is_database_url(value: str, *, what: str = "database URL") -> bool:
    """True for a sqlite or postgresql URL (any `+driver`); False for a path or another kind of URL.

    A MySQL (or other unsupported database) URL raises InputError naming `what`, so it is refused
    where it is first seen instead of failing later in a driver.
    """
    match = _SCHEME.match(value.strip())
    if match is None:
        return False
    backend = _backend(match.group(1))
    if backend in _REFUSED_BACKENDS:
        raise _unsupported(what, display_url(value), backend)
    return backend in SUPPORTED_BACKENDS


def to_sqlalchemy_url(value: str, *, what: str = "database URL") -> URL:
    """The SQLAlchemy URL to open for a user's `value`.

    `postgresql://` and `postgres://` become `postgresql+psycopg://` unless a driver is given; SQLite
    URLs are kept as they are (the scheme lower-cased). Anything else raises InputError with one line
    naming `what` and never the password.
    """
    try:
        parsed = make_url(value.strip())
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        # SQLAlchemy's message repeats the whole string, password included.
        raise InputError(f"{what} is not a database URL ({_EXPECTED})") from None
    name, _, driver = parsed.drivername.partition("+")
    backend = _backend(name)
    if backend == "postgresql":
        return parsed.set(drivername=f"postgresql+{driver or POSTGRES_DRIVER}")
    if backend != "sqlite":
        raise _unsupported(what, display_url(parsed), backend)
    if name != backend:  # "SQLite://": SQLAlchemy looks dialects up by their lower-case name
        return parsed.set(drivername=f"sqlite+{driver}" if driver else "sqlite")
    return parsed


def display_url(url: URL | str) -> str:
    """`url` as it may appear in a message: the password replaced by `***`."""
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    try:
        return make_url(url.strip()).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        match = _SCHEME.match(url.strip())  # the scheme alone: nothing after it is safe to show
        return f"{match.group(0)}…" if match else "…"


def _backend(name: str) -> str:
    backend = name.lower()
    return "postgresql" if backend in _POSTGRES_NAMES else backend


def _unsupported(what: str, shown: str, backend: str) -> InputError:
    return InputError(f"{what} {shown} uses {backend!r}; only sqlite and postgresql are supported")


# `scheme://user:PASSWORD@` anywhere in a text; the password ends at the first `@`, as SQLAlchemy reads it.
_URL_PASSWORD: Final = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9.+-]*://[^\s:/?#@\"']*:)(?P<password>[^\s@\"']*)@"
)


def hide_passwords(text: str) -> str:
    """`text` with the password of every URL in it (`scheme://user:PASSWORD@host…`) replaced by `***`.

    For strings that may hold a URL among other words (a summary field, a parameter, a driver's error
    line); the rest of the text is kept exactly.
    """
    return _URL_PASSWORD.sub(r"\g<head>***@", text)


def without_password(value: str) -> str:
    """`value` with the password of any URL in it removed (`scheme://user@host…`), the rest kept as is."""
    return _URL_PASSWORD.sub(lambda match: match.group("head")[:-1] + "@", value)


def url_password(value: str) -> str | None:
    """The (decoded) password of a sqlite or postgresql URL, or None (no password, or another string)."""
    match = _SCHEME.match(value.strip())
    if match is None or _backend(match.group(1)) not in SUPPORTED_BACKENDS:
        return None
    try:
        password = make_url(value.strip()).password
    except (ArgumentError, ValueError):
        return None
    return str(password) if password else None
