"""The schedule generator: one seed → one source, one set of run options, one sandbox, one process event.

Everything is drawn from `random.Random(seed)`, so `--replay SEED` plays the same schedule (the moments
at which events fire are drawn too; what the machine does in between is not, so a timing bug may need a
few replays). Time is compressed: a few hundred rows (2–5 chunks), windows mostly of 1–5 s, short
retry delays and outage bounds. The draws lean towards the moments that cost money: a signal while bulk
requests are on the wire, a kill -9 while chunks wait for a rate slot, a rerun in a restarted container.

A new mechanism (a source kind, an API reading the sandbox can play, a process event) adds its faults
here, so every later schedule also tries it beside everything else.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

SOURCE_FORMATS = ("csv", "parquet", "jsonl", "sqlite")
# Process events, with their weights: the three that cost money before issue 19 weigh most.
EVENTS: dict[str, float] = {
    "none": 0.8,
    "sigterm": 1.6,
    "sigint": 0.6,
    "kill9": 1.6,
    "container": 1.2,  # kill -9, then every rerun in a new PID namespace (a restarted container: PID 1 again)
    "concurrent": 0.8,  # two runs of one source on one store at once
}
# When the event fires.
MOMENTS: dict[str, float] = {
    "bulk_on_wire": 3.0,  # the moment a bulk request is forwarded and its answer held back
    "after_first_request": 1.0,  # a random delay after the run's first request (staging is done)
    "second_bulk": 1.0,  # once the second bulk request has started (chunks queued behind a limit)
}
# Drawn last (so the seeds recorded before it replay the same): a little after the first answer, when the
# other chunks wait for a rate slot (kill -9 there is what overstated doubt needed).
LIMITER_WAIT_SHARE = 0.3


@dataclass
class Schedule:
    """One drawn schedule: everything `runner.play` needs, nothing it has to decide."""

    seed: int
    rows: int
    source_format: str
    duplicate_share: float
    invalid_share: float
    invisible_share: float
    cursor: str | None  # None, "int" or "timestamp"
    odd_cursor_values: int
    store: str  # "sqlite" or "postgres"
    enrichment_type: str
    webhooks: bool
    concurrency: int
    client_rate: str  # what CLEANLIST_RATE_LIMIT says
    server_rate: tuple[int, float]
    latency: tuple[float, float]
    bulk_delay: tuple[float, float]
    sandbox_flags: list[str] = field(default_factory=list)
    faults: dict[str, int] = field(default_factory=dict)  # kind → 1, for the report's counts
    event: str = "none"
    moment: str = "bulk_on_wire"
    event_delay: float = 0.0
    temp_server: bool = False
    credits: float = 1e9
    max_reruns: int = 3

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pick(rng: random.Random, weights: dict[str, float]) -> str:
    names = list(weights)
    return rng.choices(names, weights=[weights[n] for n in names])[0]


def _window(rng: random.Random, chunks: int) -> tuple[int, float]:
    """A server window: mostly short (the compressed minute); long ones allow every chunk at once."""
    seconds = rng.choices([1.0, 2.0, 3.0, 5.0, 10.0, 60.0, 120.0], weights=[3, 3, 2, 1, 1, 0.5, 0.5])[0]
    if seconds >= 10:
        # A long window must not make the schedule wait it out: room for every request of every run.
        return (max(40, chunks * 12), seconds)
    return (rng.randint(1, 4), seconds)


def draw(seed: int, *, temp_server_share: float = 0.1) -> Schedule:
    """The schedule of `seed`."""
    rng = random.Random(seed)
    rows = rng.randint(300, 900)
    chunks = rows // 250 + 1
    cursor = rng.choices([None, "int", "timestamp"], weights=[6, 2, 1])[0]
    server_rate = _window(rng, chunks)
    event = _pick(rng, EVENTS)
    faults: dict[str, int] = {f"event:{event}": 1}
    flags: list[str] = []

    def fault(kind: str, *extra: str) -> None:
        faults[kind] = faults.get(kind, 0) + 1
        flags.extend(extra)

    if rng.random() < 0.25:
        share = rng.choice(["0.1", "0.2", "0.3"])
        status = rng.choice(["503", "500", "502", "504", "429"])
        fault(f"bulk {status} storm", "--fault", f"enrich-bulk=rate:{share}:{status}")
    if rng.random() < 0.15:
        fault("status 503 storm", "--fault", "enrich-status=rate:0.2:503")
    if rng.random() < 0.15:
        fault("results shuffled", "--results-order", "shuffled")
    if rng.random() < 0.12:
        fault("tasks omitted", "--omit-task-rate", "0.1")
    if rng.random() < 0.08:
        fault("tasks unknown", "--unknown-task-rate", "0.05")
    if rng.random() < 0.08:
        fault("bulk task_ids absent", "--bulk-task-ids", "absent", "--results-order", "shuffled")
    if rng.random() < 0.08:
        word = rng.choice(["failed", "cancelled", "finished"])
        fault(f"final word {word}", "--final-word", word, "--final-word-rate", "0.3")
    if rng.random() < 0.1:
        fault("error envelope", "--error-envelope", "error")
    if rng.random() < 0.08:
        fault("retry-after-ms", "--retry-after-ms")
    if rng.random() < 0.1:
        fault("rate scope organization", "--rate-scope", "organization")
    if rng.random() < 0.08:
        fault("revoked key", "--revoke-after-batches", str(rng.randint(1, 2)))
    webhooks = rng.random() < 0.2
    if webhooks and rng.random() < 0.5:
        fault("webhooks dropped", "--webhook-drop-rate", "0.3", "--webhook-backoff-scale", "0.1")
    credits = 1e9
    if rng.random() < 0.08:
        credits = float(rng.randint(100, 400))
        faults["low credits (402)"] = 1
    client_rate = rng.choices(
        [f"{server_rate[0]}/{server_rate[1]:g}", f"{server_rate[0] * 3}/{server_rate[1]:g}", "60/60", "auto"],
        weights=[4, 2, 1, 1],
    )[0]
    if client_rate != f"{server_rate[0]}/{server_rate[1]:g}":
        faults["client limit above the server's"] = 1
    schedule = Schedule(
        seed=seed,
        rows=rows,
        source_format=rng.choice(SOURCE_FORMATS),
        duplicate_share=rng.choice([0.0, 0.05, 0.15]),
        invalid_share=rng.choice([0.0, 0.01, 0.05]),
        invisible_share=rng.choice([0.0, 0.0, 0.03]),
        cursor=cursor,
        odd_cursor_values=(rng.choice([0, 0, 1, 2]) if cursor else 0),
        store=rng.choices(["sqlite", "postgres"], weights=[7, 3])[0],
        enrichment_type=rng.choices(["partial", "full"], weights=[4, 1])[0],
        webhooks=webhooks,
        concurrency=rng.choice([1, 2, 4, 8]),
        client_rate=client_rate,
        server_rate=server_rate,
        latency=(0.2, rng.choice([0.5, 1.0, 2.0])),
        bulk_delay=(0.05, rng.choice([0.3, 0.8, 1.5])),
        sandbox_flags=flags,
        faults=faults,
        event=event,
        moment=_pick(rng, MOMENTS),
        event_delay=rng.uniform(0.0, 2.5),
        temp_server=rng.random() < temp_server_share,
        credits=credits,
    )
    if event in ("kill9", "container", "sigterm") and rng.random() < LIMITER_WAIT_SHARE:
        schedule.moment = "limiter_wait"
    if schedule.cursor:
        faults[f"cursor {schedule.cursor}" + (" with odd values" if schedule.odd_cursor_values else "")] = 1
    faults[f"source {schedule.source_format}"] = 1
    faults[f"store {schedule.store}"] = 1
    if schedule.temp_server:
        faults["temporary Prefect server"] = 1
    return schedule
