"""A batch of schedules: seeds drawn from the batch seed, played two at a time against one shared Prefect
server, the Prefect records scanned for every schedule's key at the end, one JSON line printed.

    .venv/bin/python -m benchmarks.chaos --schedules 30 --seed 23 [--jobs 2] [--checkout DIR]
    .venv/bin/python -m benchmarks.chaos --replay SEED [--checkout DIR]

Exit status: 0 when no invariant was violated, 1 otherwise (each violation names its schedule's seed).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.chaos.invariants import Violation, last_line
from benchmarks.chaos.runner import Played, World, api_key_for, play
from benchmarks.chaos.schedule import draw
from benchmarks.procs import ROOT, PrefectServer


def schedule_seeds(seed: int, count: int) -> list[int]:
    """The schedules of a batch: stable for a batch seed, each replayable on its own."""
    rng = random.Random(f"chaos-batch:{seed}")
    return [rng.randrange(1, 10**7) for _ in range(count)]


def _prefect_records_leaks(home: Path, seeds: list[int]) -> list[tuple[int, str]]:
    """Schedules whose API key is in the shared Prefect server's database (logs, runs, events, artifacts)."""
    blob = b""
    for path in sorted(home.glob("*.db*")):
        blob += path.read_bytes()
    return [
        (seed, "the shared Prefect server's records") for seed in seeds if api_key_for(seed).encode() in blob
    ]


def run_batch(
    seeds: list[int],
    *,
    checkout: Path,
    jobs: int,
    temp_server_share: float,
    event: str | None = None,
    keep: Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Play `seeds`; returns the batch report (what the CLI prints)."""
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="cleanlist-chaos-", dir=keep))
    prefect = PrefectServer(root / "prefect-shared")
    world = World(
        checkout=checkout.resolve(), root=root, prefect_api_url=prefect.api_url, prefect_env=dict(prefect.env)
    )
    played: list[Played] = []
    errors: list[dict[str, Any]] = []

    def one(seed: int) -> Played | None:
        schedule = draw(seed, temp_server_share=temp_server_share)
        if event is not None:
            schedule.event = event
            schedule.faults = {k: v for k, v in schedule.faults.items() if not k.startswith("event:")}
            schedule.faults[f"event:{event}"] = 1
        try:
            result = play(schedule, world)
        except Exception as exc:  # the harness's own failure: reported, never hidden as a pass
            errors.append({"seed": seed, "error": f"{type(exc).__name__}: {exc}"})
            return None
        if progress:
            mark = "VIOLATION" if result.violations else "ok"
            runs = "; ".join(
                f"{r.label}: {r.exit_code} {r.status} {((r.ended_at or r.started_at) - r.started_at):.0f}s"
                + (f" ({last_line(r.stderr)})" if r.status is None and (r.exit_code or 0) > 0 else "")
                for r in result.facts.runs
            )
            print(f"  seed {seed}: {mark} ({result.seconds:.0f} s, {schedule.event}/{schedule.moment}) [{runs}]"
                  + "".join(f"\n    [{v.invariant}] {v.message}" for v in result.violations),
                  file=sys.stderr, flush=True)  # fmt: skip
        return result

    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for result in pool.map(one, seeds):
                if result is not None:
                    played.append(result)
        leaks = _prefect_records_leaks(root / "prefect-shared", seeds)
    finally:
        prefect.stop()
    faults: Counter[str] = Counter()
    violations: list[dict[str, Any]] = []
    for result in played:
        faults.update(result.schedule.faults)
        violations += [_entry(result.schedule.seed, v) for v in result.violations]
    violations += [_entry(seed, Violation("5 no secret anywhere", f"the API key appears in {where}"))
                   for seed, where in leaks]  # fmt: skip
    if not any(r.violations for r in played) and not errors:
        shutil.rmtree(root, ignore_errors=True)
    by_invariant = Counter(v["invariant"] for v in violations)
    return {
        "schedules": len(played),
        "seeds": seeds if len(seeds) <= 50 else f"{len(seeds)} drawn from the batch seed",
        "checkout": str(checkout.resolve()),
        "seconds": round(time.monotonic() - started, 1),
        "faults": dict(sorted(faults.items())),
        "violations": violations,
        "violations_by_invariant": dict(sorted(by_invariant.items())),
        "seeds_to_replay": sorted({v["seed"] for v in violations}),
        "harness_errors": errors,
        "kept": str(root) if root.exists() else None,
    }


def _entry(seed: int, violation: Violation) -> dict[str, Any]:
    return {"seed": seed, "invariant": violation.invariant, "message": violation.message}


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
    parser.add_argument("--temp-server-share", type=float, default=0.1,
                        help="share of schedules whose runs start Prefect's temporary server (default 0.1)")  # fmt: skip
    parser.add_argument("--event", help="force this process event on every schedule (hunting)")
    parser.add_argument("--progress", action="store_true", help="one line per schedule on stderr")
    args = parser.parse_args(argv)
    seeds = list(args.replay) if args.replay else schedule_seeds(args.seed, args.schedules)
    report = run_batch(
        seeds,
        checkout=args.checkout,
        jobs=args.jobs,
        temp_server_share=args.temp_server_share,
        event=args.event,
        progress=args.progress,
    )
    report = {"batch_seed": None if args.replay else args.seed, **report}
    print(json.dumps(report, ensure_ascii=False))
    return 1 if report["violations"] or report["harness_errors"] else 0
