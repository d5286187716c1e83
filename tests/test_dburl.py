"""cleanlist.dburl: which strings are database URLs, the URL we open, the URL we show, MySQL refused."""

from __future__ import annotations

from contextlib import closing
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from cleanlist.dburl import display_url, is_database_url, to_sqlalchemy_url
from cleanlist.errors import InputError
from cleanlist.io.sources import iter_source
from cleanlist.run.options import EnrichOptions
from cleanlist.store.database import resolve_url
from tests.conftest import postgres_database

SECRET = "s3cr3t-Pa55"
REFUSED = "uses 'mysql'; only sqlite and postgresql are supported"

# The scheme check


@pytest.mark.parametrize(
    "value",
    [
        "sqlite:///x.db",
        "sqlite:////abs/path/x.db",
        "sqlite://",
        "SQLite:///x.db",
        "sqlite+pysqlite:///x.db",
        "postgresql://u@h/db",
        "postgres://u:pw@h:5432/db",
        "postgresql+psycopg://u@h/db",
        "postgres+psycopg2://u@h/db",
        "  postgresql://u@h/db",
    ],
)
def test_database_urls_are_recognised(value: str) -> None:
    assert is_database_url(value) is True


@pytest.mark.parametrize(
    "value",
    [
        "contacts.csv",
        "/data/contacts.db",
        "out/enriched.parquet",
        "s3://bucket/x.csv",
        "gs://bucket/contacts-*.parquet",
        "https://example.com/x.csv?sig=abc",
        "file:///tmp/x.csv",
        "C:\\x.csv",
        "C:/data/x.csv",
        "sqlite:x.db",
        "postgresql",
        "",
    ],
)
def test_paths_and_other_urls_are_not_database_urls(value: str) -> None:
    assert is_database_url(value) is False


@pytest.mark.parametrize(
    ("value", "backend"),
    [
        (f"mysql://root:{SECRET}@db/x", "mysql"),
        ("mysql+pymysql://root@db/x", "mysql"),
        ("MySQL://root@db/x", "mysql"),
        ("mariadb://root@db/x", "mariadb"),
    ],
)
def test_mysql_is_refused_with_one_line(value: str, backend: str) -> None:
    with pytest.raises(InputError) as caught:
        is_database_url(value, what="output")
    message = str(caught.value)
    assert message.startswith("output ")
    assert message.endswith(f"uses {backend!r}; only sqlite and postgresql are supported")
    assert "\n" not in message
    assert SECRET not in message


def test_mysql_refusal_hides_the_password() -> None:
    with pytest.raises(InputError) as caught:
        is_database_url(f"mysql://root:{SECRET}@db:3306/x")
    assert str(caught.value) == f"database URL mysql://root:***@db:3306/x {REFUSED}"


# The URL we open


@pytest.mark.parametrize(
    ("given", "opened"),
    [
        ("postgresql://u@h:5432/db", "postgresql+psycopg://u@h:5432/db"),
        ("postgres://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql+psycopg2://u@h/db", "postgresql+psycopg2://u@h/db"),
        ("postgres+asyncpg://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("sqlite:///x.db", "sqlite:///x.db"),
        ("sqlite:////abs/x.db", "sqlite:////abs/x.db"),
        ("sqlite+pysqlite:///x.db", "sqlite+pysqlite:///x.db"),
        ("sqlite://", "sqlite://"),
        ("SQLite:///x.db", "sqlite:///x.db"),
        ("PostgreSQL://u@h/db", "postgresql+psycopg://u@h/db"),
    ],
)
def test_postgresql_is_bound_to_psycopg_and_sqlite_is_kept(given: str, opened: str) -> None:
    url = to_sqlalchemy_url(given)
    assert isinstance(url, sa.URL)
    assert url.render_as_string(hide_password=False) == opened


def test_the_password_survives_the_rewrite() -> None:
    url = to_sqlalchemy_url(f"postgresql://u:{SECRET}@h/db")
    assert url.password == SECRET
    assert url.drivername == "postgresql+psycopg"


@pytest.mark.parametrize(
    "given",
    [f"mysql://root:{SECRET}@db/x", "mysql+pymysql://root@db/x", "s3://bucket/x.csv"],
)
def test_only_sqlite_and_postgresql_are_opened(given: str) -> None:
    with pytest.raises(InputError, match=r"; only sqlite and postgresql are supported$") as caught:
        to_sqlalchemy_url(given, what="store URL")
    assert str(caught.value).startswith("store URL ")
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    "given",
    ["contacts.csv", f"not a url {SECRET}", "C:\\x.csv", "", f"postgresql://u:{SECRET}@h:no-port/db"],
)
def test_a_string_that_is_no_url_is_one_line_without_its_text(given: str) -> None:
    with pytest.raises(InputError) as caught:
        to_sqlalchemy_url(given, what="the SQL source")
    assert str(caught.value) == (
        "the SQL source is not a database URL (expected sqlite:///… or postgresql://…)"
    )


# The URL we show


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"postgresql://u:{SECRET}@h:5432/db", "postgresql://u:***@h:5432/db"),
        (make_url(f"postgresql+psycopg://u:{SECRET}@h/db"), "postgresql+psycopg://u:***@h/db"),
        (f"mysql://root:{SECRET}@db/x", "mysql://root:***@db/x"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("sqlite:///x.db", "sqlite:///x.db"),
        (f"postgresql://u:{SECRET}@h:no-port/db", "postgresql://…"),
        (f"not a url {SECRET}", "…"),
    ],
)
def test_display_hides_the_password(url: str | sa.URL, shown: str) -> None:
    assert display_url(url) == shown


def test_display_of_the_opened_url_hides_the_password() -> None:
    shown = display_url(to_sqlalchemy_url(f"postgres://u:{SECRET}@h/db"))
    assert shown == "postgresql+psycopg://u:***@h/db"


# MySQL is refused everywhere: sources, output tables, stores


def test_mysql_source_is_refused_before_any_driver_is_looked_for() -> None:
    with pytest.raises(InputError) as caught:
        next(iter(iter_source(f"mysql://root:{SECRET}@db/x", sql_query="select 1")))
    assert str(caught.value) == f"the SQL source mysql://root:***@db/x {REFUSED}"


def test_mysql_output_table_is_refused() -> None:
    options = EnrichOptions(source="contacts.csv", output=f"mysql://root:{SECRET}@db/x", table="contacts")
    with pytest.raises(InputError) as caught:
        options.check_destinations()
    assert str(caught.value) == f"database URL mysql://root:***@db/x {REFUSED}"


def test_mysql_store_is_refused() -> None:
    with pytest.raises(InputError) as caught:
        resolve_url(f"mysql://root:{SECRET}@db/x")
    assert str(caught.value) == f"store URL mysql://root:***@db/x {REFUSED}"


# Real round trips


def test_sqlite_url_opens_and_answers(tmp_path: Path) -> None:
    path = tmp_path / "round-trip.db"
    url = to_sqlalchemy_url(f"sqlite:///{path}")
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
            assert conn.dialect.name == "sqlite"
    finally:
        engine.dispose()
    assert path.is_file()


def test_in_memory_sqlite_url_opens_and_answers() -> None:
    engine = sa.create_engine(to_sqlalchemy_url("sqlite://"))
    with closing(engine.connect()) as conn:
        assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
    engine.dispose()


@pytest.mark.postgres
def test_postgresql_url_opens_with_psycopg_and_answers() -> None:
    with postgres_database() as plain:
        # The URL as a user writes it: no driver; trust authentication ignores the password.
        given = make_url(plain).set(password=SECRET).render_as_string(hide_password=False)
        assert given.startswith("postgresql://")
        url = to_sqlalchemy_url(given)
        engine = sa.create_engine(url)
        try:
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
                assert conn.dialect.name == "postgresql"
                assert conn.dialect.driver == "psycopg"
        finally:
            engine.dispose()
        assert SECRET not in display_url(url)
