"""Prefect tasks: thin `@task` shells over plain functions in `cleanlist/` (retries, names, visibility)."""
