"""The split-source task: a thin shell over `cleanlist.io.shards.split_source`."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from cleanlist.io.shards import Shard, split_source


@task(name="split-source", cache_policy=NO_CACHE, persist_result=False)
def split_source_task(
    source: str,
    shard_dir: str,
    unparsed_dir: str,
    shard_rows: int,
    sql_query: str | None,
    windows: list[tuple[Any, Any]] | None,
) -> list[Shard]:
    """Cut `source` into Parquet shards of at most `shard_rows` rows (per SQL window, if any)."""
    return split_source(
        source, shard_dir, unparsed_dir, shard_rows=shard_rows, sql_query=sql_query, windows=windows
    )
