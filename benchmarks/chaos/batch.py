"""A batch of schedules: seeds drawn from the batch seed, played `--jobs` at a time against one shared
Prefect server, the Prefect records (flow runs, task runs, logs, events, artifacts, through the server's
REST API, and the server's database files) scanned for every schedule's key at the end, one JSON line
printed.

    .venv/bin/python -m benchmarks.chaos --profile ci --schedules 30 --seed 23      # the CI batch
    .venv/bin/python -m benchmarks.chaos --schedules 200 --seed 1 [--jobs 3] [--checkout DIR]
    .venv/bin/python -m benchmarks.chaos --replay SEED --profile ci [--event E] [--moment M]

A schedule is a function of its seed and of the replay flags: --profile, --event, --moment and
--temp-server-share. Each violation carries its `replay` command with exactly those; --jobs, --checkout,
--progress, --schedules and --seed do not change a schedule.

Exit status: 0 when no invariant was violated, 1 otherwise (each violation names its schedule's seed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from benchmarks.chaos.invariants import Violation, last_line
from benchmarks.chaos.runner import Played, World, api_key_for, play
from benchmarks.chaos.schedule import EVENTS, EXTRA_MOMENTS, LATER_EVENTS, MOMENTS, PROFILES, Schedule, draw
from benchmarks.procs import ROOT, PrefectServer, quiet_prefect_services


def schedule_seeds(seed: int, count: int) -> list[int]:
    """The schedules of a batch: stable for a batch seed, each replayable on its own."""
    rng = random.Random(f"chaos-batch:{seed}")
    return [rng.randrange(1, 10**7) for _ in range(count)]


# The shared server's records a key could end up in, read back through its REST API.
RECORD_ENDPOINTS = ("flow_runs", "task_runs", "logs", "artifacts", "variables", "block_documents")


def _prefect_records(api_url: str) -> dict[str, str]:
    """Every flow run, task run, log, artifact, variable, block document and event of the shared server,
    as JSON text per kind (what the UI and the API show a user)."""
    texts: dict[str, str] = {}
    with httpx.Client(base_url=api_url, timeout=60.0) as client:
        for kind in RECORD_ENDPOINTS:
            pages: list[str] = []
            offset = 0
            while True:
                response = client.post(f"/{kind}/filter", json={"limit": 200, "offset": offset})
                if response.status_code >= 400:
                    break
                items = response.json()
                pages.append(response.text)
                if len(items) < 200:
                    break
                offset += 200
            texts[kind] = "\n".join(pages)
        pages = []
        response = client.post("/events/filter", json={"limit": 50})
        while response.status_code < 400:
            page = response.json()
            pages.append(response.text)
            following = page.get("next_page")
            if not following or not page.get("events"):
                break
            response = client.get(following)
        texts["events"] = "\n".join(pages)
    return texts


def _prefect_records_leaks(home: Path, api_url: str | None, seeds: list[int]) -> list[tuple[int, str]]:
    """Schedules whose API key (or its core, when a key had a trailing newline: JSON escapes only the end)
    is in the shared Prefect server's records (REST) or its database files (bytes)."""
    texts: dict[str, str] = {}
    if api_url is not None:
        with contextlib.suppress(httpx.HTTPError):
            texts = {
                f"the shared Prefect server's {kind}": text
                for kind, text in _prefect_records(api_url).items()
            }
    blob = b"".join(path.read_bytes() for path in sorted(home.glob("*.db*")))
    texts["the shared Prefect server's database files"] = blob.decode("latin-1")
    return [(seed, where) for seed in seeds for where, text in texts.items() if api_key_for(seed) in text]


def expected_cost(schedule: Schedule) -> float:
    """A rough rank of a schedule's wall time: a temporary Prefect server (started by every run), two
    runs at once, a rerun in a new container, and each extra run after a signal cost most."""
    cost = float(schedule.rows) / 100
    if schedule.temp_server:
        cost += 30
    if schedule.event in ("concurrent", "container", "other_store"):
        cost += 10
    elif schedule.event != "none":
        cost += 6
    if schedule.source_format == "dataframe":
        cost += 3
    return cost


def replay_command(seed: int, *, profile: str, event: str | None, moment: str | None,
                   temp_server_share: float | None) -> str:  # fmt: skip
    """The command that plays schedule `seed` again: the seed and every flag a schedule depends on."""
    parts = ["python -m benchmarks.chaos", f"--replay {seed}", f"--profile {profile}"]
    if event is not None:
        parts.append(f"--event {event}")
    if moment is not None:
        parts.append(f"--moment {moment}")
    if temp_server_share is not None:
        parts.append(f"--temp-server-share {temp_server_share:g}")
    return " ".join(parts)


def run_batch(
    seeds: list[int],
    *,
    checkout: Path,
    jobs: int,
    profile: str = "long",
    temp_server_share: float | None = None,
    event: str | None = None,
    moment: str | None = None,
    keep: Path | None = None,
    progress: bool = False,
    keep_all: bool = False,
) -> dict[str, Any]:
    """Play `seeds`; returns the batch report (what the CLI prints)."""
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="cleanlist-chaos-", dir=keep))
    quiet_prefect_services(os.environ)
    prefect = PrefectServer(root / "prefect-shared")
    world = World(
        checkout=checkout.resolve(),
        root=root,
        prefect_api_url=prefect.api_url,
        prefect_env=dict(prefect.env),
        keep_all=keep_all,
    )
    played: list[Played] = []
    errors: list[dict[str, Any]] = []

    schedules = {seed: draw(seed, profile=profile, temp_server_share=temp_server_share, event_override=event,
                            moment_override=moment) for seed in seeds}  # fmt: skip

    def one(seed: int) -> Played | None:
        schedule = schedules[seed]
        try:
            result = play(schedule, world)
        except Exception as exc:  # the harness's own failure: reported, never hidden as a pass
            errors.append({"seed": seed, "error": f"{type(exc).__name__}: {exc}"})
            return None
        if progress:
            mark = "VIOLATION" if result.violations else "ok"
            runs = "; ".join(
                f"{r.label}: {r.exit_code} {r.status} {((r.ended_at or r.started_at) - r.started_at):.0f}s"
                + (f" cpu {r.cpu_seconds:.1f}s" if r.cpu_seconds is not None else "")
                + (f" ({last_line(r.stderr)})" if r.status is None and (r.exit_code or 0) > 0 else "")
                for r in result.facts.runs
            )
            print(f"  seed {seed}: {mark} ({result.seconds:.0f} s, {schedule.event}/{schedule.moment}) [{runs}]"
                  + "".join(f"\n    [{v.invariant}] {v.message}" for v in result.violations),
                  file=sys.stderr, flush=True)  # fmt: skip
        return result

    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            # The costliest first: a long schedule started last would leave the other workers idle at
            # the end (the batch's wall time is its tail). Reported in the seeds' order all the same.
            order = sorted(seeds, key=lambda seed: -expected_cost(schedules[seed]))
            done = dict(zip(order, pool.map(one, order), strict=True))
            played += [result for seed in seeds if (result := done[seed]) is not None]
        leaks = _prefect_records_leaks(root / "prefect-shared", prefect.api_url, seeds)
    finally:
        prefect.stop()
    faults: Counter[str] = Counter()
    violations: list[dict[str, Any]] = []

    def entry(seed: int, violation: Violation) -> dict[str, Any]:
        return {"seed": seed, "invariant": violation.invariant, "message": violation.message,
                "replay": replay_command(seed, profile=profile, event=event, moment=moment,
                                         temp_server_share=temp_server_share)}  # fmt: skip

    for result in played:
        faults.update(result.schedule.faults)
        violations += [entry(result.schedule.seed, v) for v in result.violations]
    violations += [entry(seed, Violation("5 no secret anywhere", f"the API key appears in {where}"))
                   for seed, where in leaks]  # fmt: skip
    per_schedule = sorted(r.seconds for r in played)
    run_cpu = sorted(sum(run.cpu_seconds or 0.0 for run in r.facts.runs) for r in played)
    if not any(r.violations for r in played) and not errors and not keep_all:
        shutil.rmtree(root, ignore_errors=True)
    by_invariant = Counter(v["invariant"] for v in violations)
    return {
        "schedules": len(played),
        "seeds": seeds if len(seeds) <= 50 else f"{len(seeds)} drawn from the batch seed",
        "checkout": str(checkout.resolve()),
        "profile": profile,
        "jobs": jobs,
        "seconds": round(time.monotonic() - started, 1),
        "schedule_seconds": {
            "median": round(per_schedule[len(per_schedule) // 2], 1) if per_schedule else None,
            "max": round(per_schedule[-1], 1) if per_schedule else None,
        },
        # CPU of the runs' process trees (the harness, sandbox and Prefect server come on top).
        "run_cpu_seconds": {
            "total": round(sum(run_cpu), 1),
            "median_per_schedule": round(run_cpu[len(run_cpu) // 2], 1) if run_cpu else None,
        },
        "faults": dict(sorted(faults.items())),
        "violations": violations,
        "violations_by_invariant": dict(sorted(by_invariant.items())),
        "seeds_to_replay": sorted({v["seed"] for v in violations}),
        "harness_errors": errors,
        "kept": str(root) if root.exists() else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.chaos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--schedules", type=int, default=30, help="how many schedules (default 30)")
    parser.add_argument("--seed", type=int, default=23, help="the batch seed (default 23)")
    parser.add_argument("--replay", type=int, action="append", help="play this schedule seed (repeatable)")
    parser.add_argument("--checkout", type=Path, default=ROOT, help="run the CLI of this checkout")
    parser.add_argument("--jobs", type=int, default=3, help="schedules played at once (default 3)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="long",
                        help="ci: compressed, for .ci/run; long: the benchmark (default long)")  # fmt: skip
    parser.add_argument("--temp-server-share", type=float,
                        help="share of schedules whose runs start Prefect's temporary server (default: the "
                        "profile's, 0.1 long, 0.04 ci)")  # fmt: skip
    parser.add_argument(
        "--event", choices=sorted({*EVENTS, *LATER_EVENTS}), help="force this process event on every schedule"
    )
    parser.add_argument("--moment", choices=[*MOMENTS, *EXTRA_MOMENTS],
                        help="force the moment the event fires at on every schedule")  # fmt: skip
    parser.add_argument("--progress", action="store_true", help="one line per schedule on stderr")
    parser.add_argument("--keep-all", action="store_true",
                        help="keep every schedule's folder (logs, store, outputs), not only those that failed")  # fmt: skip
    args = parser.parse_args(argv)
    seeds = list(args.replay) if args.replay else schedule_seeds(args.seed, args.schedules)
    report = run_batch(
        seeds,
        checkout=args.checkout,
        jobs=args.jobs,
        profile=args.profile,
        temp_server_share=args.temp_server_share,
        event=args.event,
        moment=args.moment,
        progress=args.progress,
        keep_all=args.keep_all,
    )
    report = {"batch_seed": None if args.replay else args.seed, **report}
    print(json.dumps(report, ensure_ascii=False))
    return 1 if report["violations"] or report["harness_errors"] else 0
