"""The pipeline against the independent stand-in (benchmarks/standin.py), measured from its side.

    .venv/bin/python -m benchmarks.independent            # 40,000 contacts, 20 requests / 2 s, 0.5–1.5 s

The stand-in was written from the API's description only; it counts fixed windows on the wall clock,
answers requests concurrently and shapes per-task results its own way. The pipeline is the real CLI,
configured as a user would: CLEANLIST_BASE_URL set to the documented base (…/api/v1/public),
CLEANLIST_RATE_LIMIT to the stand-in's limit. Throughput is the stand-in's own figure: contacts
accepted ÷ (last status answer that completed a workflow − first bulk request).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from benchmarks.data import DatasetSpec, cached_dataset
from benchmarks.procs import ROOT, _wait_for, free_port, prefect_for, run_measured
from benchmarks.run import CHUNK, RESULTS, count_rows, pipeline_cmd
from benchmarks.standin import DEFAULT_KEY


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contacts", type=int, default=40_000)
    parser.add_argument("--rate-limit", default="20/2")
    parser.add_argument("--latency", default="0.5-1.5")
    parser.add_argument("--data-dir", type=Path, default=RESULTS / "data")
    parser.add_argument("--output", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--prefect-api-url", help="use this running Prefect API instead of starting a server")
    args = parser.parse_args(argv)

    requests, _, window = args.rate_limit.partition("/")
    ceiling = int(requests) * CHUNK / float(window)
    data = cached_dataset(args.data_dir, DatasetSpec(args.contacts), "csv")
    variants = [("CLI defaults", []), ("--initial-poll-seconds 6", ["--initial-poll-seconds", "6"])]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cleanlist-independent-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        standin = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.standin",
                "--port",
                str(port),
                "--rate-limit",
                args.rate_limit,
                "--latency",
                args.latency,
            ],  # fmt: skip
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        prefect = prefect_for(workdir / "prefect-home", args.prefect_api_url)
        admin = httpx.Client(base_url=base + "/_standin", timeout=60.0)
        try:
            _wait_for(base + "/_standin/stats", 60, standin, "the stand-in")
            for name, extra in variants:
                admin.post("/reset", params={"all": "true"}).raise_for_status()
                out = workdir / f"out-{len(rows)}.csv"
                env = {
                    **prefect.env,
                    "PREFECT_API_URL": prefect.api_url,
                    "PREFECT_LOGGING_LEVEL": "WARNING",
                    "CLEANLIST_API_KEY": DEFAULT_KEY,
                    "CLEANLIST_BASE_URL": base + "/api/v1/public",
                    "CLEANLIST_RATE_LIMIT": args.rate_limit,
                }
                print(f"… {name}: {args.contacts} contacts", flush=True)
                measured = run_measured(
                    pipeline_cmd(data, out, workdir / f"store-{len(rows)}.db", extra), env=env
                )
                stats = admin.get("/stats").json()
                summary = json.loads(measured.stdout.strip().splitlines()[-1])
                answered = {ep: sum(codes.values()) for ep, codes in stats["responses"].items()}
                limited = sum(codes.get("429", 0) for codes in stats["responses"].values())
                rate = stats["contacts_accepted"] / stats["elapsed_first_bulk_to_last_completed"]
                rows.append(
                    {
                        "run": name,
                        "exit": measured.returncode,
                        "contacts_per_s": round(rate),
                        "ceiling_ratio": round(rate / ceiling, 3),
                        "status_calls_per_workflow": round(answered["enrich-status"] / stats["workflows"], 3),
                        "share_429": round(limited / max(sum(answered.values()), 1), 4),
                        "accepted_twice": stats["contacts_accepted_more_than_once"],
                        "rows_written": count_rows(out),
                        "credits_charged": round(1e7 - stats["credits"], 2),
                        "credits_spent_by_run": summary["credits_spent"],
                        "peak_rss_mib": round(measured.max_rss / 2**20),
                    }
                )
                print("  " + json.dumps(rows[-1]), flush=True)
        finally:
            admin.close()
            prefect.stop()
            standin.terminate()
            standin.wait(timeout=30)
    print(
        f"\nIndependent stand-in: {args.contacts:,} contacts, {args.rate_limit} per endpoint, "
        f"workflows {args.latency} s, ceiling {ceiling:,.0f} contacts/s"
    )
    header = (
        f"{'run':26} {'contacts/s':>10} {'ceiling':>8} {'status/wf':>9} {'429s':>6} {'twice':>6} {'rows':>7}"
    )
    print(header + "\n" + "-" * len(header))
    for row in rows:
        print(
            f"{row['run']:26} {row['contacts_per_s']:>10,} {row['ceiling_ratio']:>8.3f} "
            f"{row['status_calls_per_workflow']:>9.3f} {row['share_429']:>6.2%} {row['accepted_twice']:>6} "
            f"{row['rows_written']:>7,}"
        )
    if args.output:
        args.output.write_text(json.dumps({"contacts": args.contacts, "runs": rows}, indent=1))
    return 0 if all(row["exit"] == 0 and row["rows_written"] == args.contacts for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
