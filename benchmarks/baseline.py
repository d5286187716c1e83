"""The loop the Cleanlist documentation suggests, as the baseline the pipeline is measured against.

One chunk of 250 at a time: `POST /enrich/bulk` through the errors page's `call_with_backoff` (one try
and five retries, sleeping 2**attempt seconds plus up to 0.5 s of jitter, only on 429), then the
workflow is polled on a fixed interval until it is done, its results are written, and only then is the
next chunk sent. Every documented delay is divided by `--time-scale`, the same factor that compresses
the sandbox's clock (the benchmark's sandbox runs 20 requests per 2 s for the real 60 per 60 s, i.e.
×30, so the 5 s poll interval becomes 1/6 s).

    .venv/bin/python -m benchmarks.baseline contacts.csv --base-url http://127.0.0.1:8787 \\
        --api-key clapi_… --output out.csv --time-scale 30

The last stdout line is a JSON summary. Rows without the required fields go to the rejects count.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

API = "/api/v1/public"
CHUNK = 250
TERMINAL = {"completed", "failed", "cancelled"}
# Source columns of benchmarks.data → the API's contact fields.
FIELDS = {
    "First Name": "first_name",
    "Last Name": "last_name",
    "Company": "company_name",
    "LinkedIn URL": "linkedin_url",
}


def call_with_backoff(
    session: httpx.Client, method: str, url: str, *, time_scale: float, **kwargs: Any
) -> httpx.Response:
    """The errors page's recommended retry strategy, verbatim but for the clock compression.

    The page uses `requests`; httpx (a dependency of the project) behaves the same here.
    """
    for attempt in range(6):  # 1 try + 5 retries
        r = session.request(method, url, **kwargs)
        if r.status_code != 429:
            return r
        sleep_for = (2**attempt) + random.uniform(0, 0.5)
        time.sleep(sleep_for / time_scale)
    r.raise_for_status()
    return r


def contacts_of(row: dict[str, str]) -> dict[str, str] | None:
    contact = {
        field: row[column].strip() for column, field in FIELDS.items() if (row.get(column) or "").strip()
    }
    if "linkedin_url" in contact:
        contact["linkedin_url"] = "https://www." + contact["linkedin_url"].removeprefix("https://www.")
        return contact
    if {"first_name", "last_name", "company_name"} <= contact.keys():
        return contact
    return None


def chunks(path: Path, rejects: list[int]) -> Iterator[list[tuple[dict[str, str], dict[str, str]]]]:
    chunk: list[tuple[dict[str, str], dict[str, str]]] = []
    with path.open(newline="", encoding="utf-8") as source:
        for row in csv.DictReader(source):
            contact = contacts_of(row)
            if contact is None:
                rejects[0] += 1
                continue
            chunk.append((row, contact))
            if len(chunk) == CHUNK:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def run(args: argparse.Namespace) -> dict[str, Any]:
    session = httpx.Client(headers={"Authorization": f"Bearer {args.api_key}"}, timeout=60.0)
    bulk_url = args.base_url.rstrip("/") + API + "/enrich/bulk"
    status_url = args.base_url.rstrip("/") + API + "/enrich/status"
    poll_every = args.poll_seconds / args.time_scale
    rejects = [0]
    counts = {"bulk_calls": 0, "status_calls": 0, "workflows": 0, "contacts": 0, "rows_written": 0}
    started = first_submit = time.monotonic()
    with open(args.output, "w", newline="", encoding="utf-8") as out:
        writer: csv.DictWriter[str] | None = None
        for n, chunk in enumerate(chunks(Path(args.source), rejects)):
            if args.limit and counts["contacts"] >= args.limit:
                break
            r = call_with_backoff(
                session,
                "POST",
                bulk_url,
                time_scale=args.time_scale,
                json={"enrichment_type": "partial", "contacts": [contact for _, contact in chunk]},
            )
            counts["bulk_calls"] += 1
            r.raise_for_status()
            if n == 0:
                first_submit = time.monotonic()
            accepted = r.json()
            while True:
                time.sleep(poll_every)
                r = call_with_backoff(
                    session,
                    "GET",
                    status_url,
                    time_scale=args.time_scale,
                    params={"workflow_id": accepted["workflow_id"]},
                )
                counts["status_calls"] += 1
                r.raise_for_status()
                status = r.json()
                if str(status.get("status", "")).lower() in TERMINAL:
                    break
            by_task = {result["task_id"]: result for result in status.get("results") or []}
            for (row, _), task_id in zip(chunk, accepted["task_ids"], strict=True):
                result = by_task.get(task_id, {})
                line = {**row, "email": result.get("primary_email") or "", "status": result.get("status", "")}
                if writer is None:
                    writer = csv.DictWriter(out, fieldnames=list(line))
                    writer.writeheader()
                writer.writerow(line)
                counts["rows_written"] += 1
            counts["workflows"] += 1
            counts["contacts"] += len(chunk)
    ended = time.monotonic()
    session.close()
    return {
        **counts,
        "rejected": rejects[0],
        "seconds": round(ended - first_submit, 3),
        "seconds_total": round(ended - started, 3),
        "poll_seconds": round(poll_every, 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", help="a CSV written by benchmarks.data")
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--time-scale", type=float, default=1.0, help="divide every documented delay by this")
    parser.add_argument("--poll-seconds", type=float, default=5.0, help="the fixed poll interval, real time")
    parser.add_argument("--limit", type=int, default=0, help="stop after about this many contacts (0 = all)")
    args = parser.parse_args(argv)
    print(json.dumps(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
