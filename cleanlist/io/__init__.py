"""Reading sources (`sources/`) and writing outputs through sinks (files, database tables), backfill shards;
without Prefect, and without knowing runs."""
