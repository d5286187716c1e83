"""Helpers for flow tests: messy CRM exports, running the flow fast, reading outputs back."""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Any

import pandas as pd

# Retry delays, poll estimates and credit re-checks shortened through the flow's own options.
FAST = {
    "retry_delay_seconds": 0.05,
    "initial_poll_seconds": 0.1,
    "credit_recheck_seconds": 0.5,
    "poll_timeout_seconds": 60.0,
}

HEADERS = ["Record ID", "First Name", "Surname", "Account Name", "Company Website", "LinkedIn URL", "Owner"]


def messy_export(
    path: Path,
    *,
    unique: int,
    duplicates: int = 0,
    invalid: int = 0,
    linkedin_only: int = 0,
    seed: int = 1,
    tag: str = "",
) -> Path:
    """A CRM export with messy headers; `Record ID` identifies every row."""
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    for i in range(unique - linkedin_only):
        rows.append(
            {
                "First Name": f"Ann{tag}{i}",
                "Surname": f"Lee{tag}{i}",
                "Account Name": f"Company {i}",
                "Company Website": rng.choice(["https://www.", "http://", "", "www."])
                + f"co{tag}{i}.example/",
                "LinkedIn URL": "",
                "Owner": rng.choice(["ann", "bob"]),
            }
        )
    for i in range(linkedin_only):
        rows.append(
            {
                "First Name": "",
                "Surname": "",
                "Account Name": "",
                "Company Website": "",
                "LinkedIn URL": rng.choice(["https://www.linkedin.com/in/", "linkedin.com/in/"])
                + f"person-{tag}{i}/",
                "Owner": "cy",
            }
        )
    for _ in range(duplicates):
        dup = dict(rng.choice(rows[: max(1, unique)]))
        if dup["First Name"]:
            dup["First Name"] = f"  {dup['First Name'].upper()} "
        rows.append(dup)
    for i in range(invalid):
        rows.append(
            {
                "First Name": f"Solo{i}",
                "Surname": "",
                "Account Name": "",
                "Company Website": "",
                "LinkedIn URL": "",
                "Owner": "dee",
            }
        )
    rng.shuffle(rows)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=HEADERS)
        writer.writeheader()
        for n, row in enumerate(rows):
            writer.writerow({"Record ID": f"r{n:06d}", **row})
    return path


def run_flow(**params: Any) -> tuple[Any, dict[str, Any]]:
    """Run enrich-contacts in this process; returns (final state, summary)."""
    from cleanlist_prefect.flows.enrich_contacts import enrich_contacts, outcome_of

    state = enrich_contacts(**{**FAST, **params}, return_state=True)
    summary, _, _ = outcome_of(state)
    return state, summary


def read_csv(path: Path | str) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def bulk_requests(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in log if entry["endpoint"] == "enrich-bulk"]
