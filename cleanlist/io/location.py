"""How a source or destination location may be shown in a message (passwords and signed queries hidden)."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def display_source(source: str) -> str:
    """The source as it may appear in a message: a URL's password and query (signed URLs) are hidden."""
    if "://" not in source:
        return source
    try:
        parts = urlsplit(source)
        if parts.password is not None:
            parts = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1))
        if parts.query:
            parts = parts._replace(query="…")
        return urlunsplit(parts)
    except ValueError:
        return source.split("://", 1)[0] + "://…"
