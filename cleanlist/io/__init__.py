"""Reading sources and writing outputs (files, database tables, backfill shards), without Prefect."""
