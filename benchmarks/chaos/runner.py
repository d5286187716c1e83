"""Plays one schedule: the sandbox and the proxy up, the CLI run under the drawn event, reruns until the
source is done, then every fact the invariants need gathered from outside the product.

The CLI is always a subprocess of the checkout under test (its own venv, else this interpreter with the
checkout first on PYTHONPATH), against one Prefect server shared by the batch, or (a share of schedules)
its own temporary server. The sandbox always comes from this checkout: it is the yardstick.
"""

from __future__ import annotations

import ast
import contextlib
import csv
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks.chaos.invariants import SEND_WINDOW_SECONDS, RunFacts, ScheduleFacts, Violation, check
from benchmarks.chaos.proxy import ApiProxy
from benchmarks.chaos.schedule import Schedule
from benchmarks.chaos.sources import Source, build_rows, write_source
from benchmarks.procs import SandboxProcess, free_port, seed_prefect_home

POSTGRES_ADMIN = os.environ.get("CLEANLIST_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
WATCH_EVERY_SECONDS = 0.3
SIGNAL_GRACE_SECONDS = 35.0  # the 30 s bound of invariant 6, plus the harness's own polling
# A SIGKILL sent is pending until the process next enters the kernel (a running thread on another CPU
# keeps going for a moment): intents written that long after `os.kill` returned are the kill's too.
KILL_LANDS_SECONDS = 0.05
OTHER_STORE_LABEL = "run 2 (other store)"
UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
SIGNALS = {
    "sigterm": signal.SIGTERM,
    "sigint": signal.SIGINT,
    "kill9": signal.SIGKILL,
    "container": signal.SIGKILL,
}


@dataclass
class World:
    """What a batch shares: the checkout under test, the Prefect server, a scratch root."""

    checkout: Path
    root: Path
    prefect_api_url: str | None
    prefect_env: dict[str, str]
    keep_failed: bool = True
    keep_all: bool = False
    postgres: bool = True
    # Each PREFECT_HOME of a schedule starts with a migrated database (`benchmarks.procs.seed_prefect_home`:
    # a first start migrates for 40-90 s at a load of 5-8, which alone passed a schedule's 100 s bound:
    # seeds 303197 and 2373544 beside a test suite). False: each of those homes starts empty.
    seed_prefect_homes: bool = True

    @property
    def python(self) -> str:
        venv = self.checkout / ".venv" / "bin" / "python"
        return str(venv) if venv.exists() else sys.executable


@dataclass
class Played:
    """One schedule's outcome: the facts, the violations, how long it took."""

    schedule: Schedule
    facts: ScheduleFacts
    violations: list[Violation]
    seconds: float
    notes: list[str] = field(default_factory=list)


def api_key_for(seed: int) -> str:
    """A key of its own per schedule, so a leak found in a shared record names its schedule."""
    return "clapi_" + hashlib.sha256(f"chaos-key-{seed}".encode()).hexdigest()[:64]


def _password_for(seed: int) -> str:
    return "pw" + hashlib.sha256(f"chaos-pw-{seed}".encode()).hexdigest()[:20]


def _read_rows(path: Path) -> list[dict[str, str]] | None:
    if not path.exists():
        return None
    with path.open(newline="", encoding="utf-8") as handle:
        return [dict(row) for row in csv.DictReader(handle)]


def _summary(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{") and '"status"' in line:
            with contextlib.suppress(json.JSONDecodeError):
                parsed = json.loads(line)
                if isinstance(parsed, dict):
                    return parsed
    return None


def unsettled_intents_before(home: Path, death: float, window: float, *, killed: float | None = None) -> int:
    """Intents in the journals under `home` with no settling line, written at most `window` seconds
    before `death` (wall clock) and no later than `killed` (when the kill had been sent; `death` if not
    given): requests a kill -9 may have stopped before their body left. The harness reads the clock, then
    finds the process (a container's PID 1) and kills it; an intent written in between is the kill's too
    (seed 9918632 wrote one there and was reported as overstating its doubt)."""
    entries: list[dict[str, Any]] = []
    for path in sorted((home / ".cleanlist" / "journal").glob("*.jsonl")):
        with contextlib.suppress(OSError):
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if isinstance(entry, dict):
                        entries.append(entry)
    settled = {e.get("request") for e in entries if e.get("kind") != "intent"}
    return sum(
        1
        for e in entries
        if e.get("kind") == "intent"
        and e.get("request") not in settled
        and isinstance(e.get("at"), int | float)
        and death - window <= float(e["at"]) <= (death if killed is None else killed) + KILL_LANDS_SECONDS
    )


_DONE = " - done: {"


def logged_summary(stderr: str) -> dict[str, Any] | None:
    """The summary a run logged as its last step (`done: {...}`, after its output and cursor mark were
    written), for a run killed -9 before it printed its JSON line: it had completed (seed 9330503)."""
    for line in reversed(stderr.splitlines()):
        at = line.find(_DONE)
        if at >= 0:
            with contextlib.suppress(ValueError, SyntaxError):
                parsed = ast.literal_eval(line[at + len(_DONE) - 1 :].strip())
                if isinstance(parsed, dict) and "status" in parsed:
                    return parsed
    return None


class _Postgres:
    """A fresh database per schedule (the store), dropped at the end; it can refuse connections."""

    def __init__(self, seed: int) -> None:
        import psycopg

        self.name = f"chaos_{seed}_{os.getpid()}_{threading.get_ident() % 100000}"
        self._admin = POSTGRES_ADMIN
        with psycopg.connect(self._admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{self.name}"')
        base = self._admin.rsplit("/", 1)[0].replace("postgres@", f"postgres:{_password_for(seed)}@")
        self.url = f"{base}/{self.name}"

    def workflows(self) -> int:
        import psycopg

        with contextlib.suppress(psycopg.Error), psycopg.connect(self.url, autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM cleanlist_workflows").fetchone()
            return int(row[0]) if row else 0
        return 0

    def outage(self, *, down: bool) -> None:
        """Refuse new connections and end the open ones (down), or accept them again. Only this
        schedule's own database is touched."""
        import psycopg

        with contextlib.suppress(psycopg.Error), psycopg.connect(self._admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS {"false" if down else "true"}')
            if down:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (self.name,)
                )

    def drop(self) -> None:
        import psycopg

        with contextlib.suppress(psycopg.Error), psycopg.connect(self._admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def _sqlite_workflows(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            return int(conn.execute("SELECT count(*) FROM cleanlist_workflows").fetchone()[0])
    except sqlite3.Error:
        return 0


class _Run:
    """One CLI process of a schedule, watched from outside: its descendants, its end, its files."""

    def __init__(
        self,
        label: str,
        cmd: list[str],
        env: dict[str, str],
        cwd: Path,
        output: Path,
        *,
        library: bool = False,
        bound: float = 150.0,
    ) -> None:
        self.label = label
        self.library = library
        self.bound = bound
        self.output = output
        self.out = tempfile.TemporaryFile()
        self.err = tempfile.TemporaryFile()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=self.out, stderr=self.err, start_new_session=True
        )
        self.descendants: dict[int, str] = {}
        self.signal_name: str | None = None
        self.signalled_at: float | None = None
        self.signalled_wall: float | None = None
        self.killed_wall: float | None = None  # when the signal had been sent (after finding the process)
        self.ended_at: float | None = None
        self.cpu_seconds: float | None = None
        self._next_watch = 0.0
        self.home = Path(env.get("HOME", str(cwd)))

    def watch(self) -> None:
        """Remember every descendant (a temporary Prefect server, a receiver) while the run lives.

        A scan of the process table costs milliseconds: done at most every 0.3 s (what it looks for lives
        for the whole run), so waiting for a moment at 100 Hz costs the harness next to nothing."""
        now = time.monotonic()
        if now < self._next_watch:
            return
        self._next_watch = now + WATCH_EVERY_SECONDS
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                if child.pid not in self.descendants:
                    with contextlib.suppress(psutil.Error):
                        self.descendants[child.pid] = " ".join(child.cmdline()[:4])[:80]

    def target_pid(self) -> int:
        """The process a signal goes to: in a container (unshare), its PID 1."""
        if self.label.endswith("(container)"):
            with contextlib.suppress(psutil.Error):
                children = psutil.Process(self.proc.pid).children()
                if children:
                    return int(children[0].pid)
        return int(self.proc.pid)

    def send(self, name: str, sig: signal.Signals) -> None:
        self.signal_name = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT", signal.SIGKILL: "SIGKILL"}[
            sig
        ]
        self.signalled_at = time.monotonic()
        self.signalled_wall = time.time()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.target_pid(), sig)
            if sig == signal.SIGKILL:
                os.kill(self.proc.pid, sig)
        self.killed_wall = time.time()

    def poll(self) -> bool:
        """Has the run ended? Reaped with `os.wait4`, so its CPU time (with its reaped descendants') is
        known: what a schedule costs a quiet machine, whatever the load of this one."""
        if self.proc.returncode is None:
            with contextlib.suppress(ChildProcessError):
                pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
                if pid:
                    self.proc.returncode = os.waitstatus_to_exitcode(status)
                    self.cpu_seconds = usage.ru_utime + usage.ru_stime
        if self.proc.returncode is not None:
            if self.ended_at is None:
                self.ended_at = time.monotonic()
            return True
        return False

    def finish(self, deadline: float) -> RunFacts:
        """Wait until `deadline`; then collect. A run still alive then is killed and reported hung."""
        while not self.poll() and time.monotonic() < deadline:
            self.watch()
            time.sleep(0.1)
        hung = not self.poll()
        if hung:
            # Where it hangs, in its log: every thread's stack (faulthandler, on SIGABRT), then the kill.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.target_pid(), signal.SIGABRT)
            end = time.monotonic() + 3
            while not self.poll() and time.monotonic() < end:
                time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            end = time.monotonic() + 10
            while not self.poll() and time.monotonic() < end:
                time.sleep(0.05)
        leftovers = self._leftovers(report=not hung and self.signal_name != "SIGKILL")
        self.out.seek(0)
        self.err.seek(0)
        stdout = self.out.read().decode("utf-8", "replace")
        stderr = self.err.read().decode("utf-8", "replace")
        self.out.close()
        self.err.close()
        rejects = self.output.with_name(self.output.stem + ".rejects.csv")
        self.output.with_suffix(".log").write_text(f"$ {' '.join(self.proc.args)}\n{stdout}\n{stderr}")  # type: ignore[arg-type]
        return RunFacts(
            label=self.label,
            exit_code=None if hung else self.proc.returncode,
            # Killed -9 after it logged its end: it completed, its JSON line was never printed. Not when
            # its output is missing: a DataFrame program killed before it saved the frame the run
            # returned has lost it (seeds 9007567, 6089384): the user reruns, served from the store.
            summary=_summary(stdout)
            or (
                logged_summary(stderr)
                if self.signal_name == "SIGKILL" and not hung and self.output.exists()
                else None
            ),
            stderr=stderr + "\n" + stdout,
            signal=self.signal_name,
            signalled_at=self.signalled_at,
            ended_at=self.ended_at,
            started_at=self.started,
            bound_seconds=self.bound,
            leftover_processes=leftovers,
            intents_at_death=(
                unsettled_intents_before(
                    self.home, self.signalled_wall, SEND_WINDOW_SECONDS, killed=self.killed_wall
                )
                if self.signal_name == "SIGKILL" and self.signalled_wall is not None
                else 0
            ),
            output_rows=_read_rows(self.output),
            reject_rows=_read_rows(rejects),
            library=self.library,
            cpu_seconds=self.cpu_seconds,
        )

    def _leftovers(self, *, report: bool) -> list[str]:
        """Descendants still alive a moment after the run ended; killed either way (we started them).

        After a kill -9 the wait is longer: a killed process stuck in a system call (an fsync on a busy
        disk) dies only when the call returns, and until then it still holds its store session and its
        liveness lock. A container restart waits for its processes to be gone; so does the harness
        before the rerun (seed 1075081: a rerun 5 s after the kill rightly found the run alive)."""
        deadline = time.monotonic() + (3.0 if report else KILLED_PROCESS_WAIT_SECONDS)
        alive: list[psutil.Process] = []
        while time.monotonic() < deadline:
            alive = []
            for pid in self.descendants:
                with contextlib.suppress(psutil.Error):
                    proc = psutil.Process(pid)
                    if proc.status() != psutil.STATUS_ZOMBIE:
                        alive.append(proc)
            if not alive:
                break
            time.sleep(0.2)
        names = [f"{self.descendants[p.pid]} (pid {p.pid})" for p in alive]
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        return names if report else []


KILLED_PROCESS_WAIT_SECONDS = 30.0


def _until_each_ends(runs: list[tuple[_Run, float]]) -> None:
    """Watch runs that live side by side together, each until it ends or its deadline passes, so each
    one's end is recorded when it happens. Waiting for one and only then polling the other recorded the
    other's end late: of two runs at once, the order of their ends (invariant 4 reads marks in that
    order) came out wrong (seed 303197: run 2 ended 15 s before run 1 and was counted as ending after)."""
    while True:
        waiting = [run for run, deadline in runs if not run.poll() and time.monotonic() < deadline]
        if not waiting:
            return
        for run in waiting:
            run.watch()
        time.sleep(0.1)


class SchedulePlayer:
    """Everything one schedule starts, and the order it happens in."""

    def __init__(self, schedule: Schedule, world: World) -> None:
        self.schedule = schedule
        self.world = world
        self.work = world.root / f"s{schedule.seed}"
        shutil.rmtree(self.work, ignore_errors=True)
        self.home = self.work / "home"
        self.home.mkdir(parents=True)
        self.key = api_key_for(schedule.seed)
        self.notes: list[str] = []
        self.runs: list[RunFacts] = []
        self.pg: _Postgres | None = None
        self.sandbox: SandboxProcess | None = None
        self.proxy: ApiProxy | None = None
        self.source: Source | None = None
        self.outage_fired: float | None = None

    # --- setup ------------------------------------------------------------------------------------

    def _start(self) -> None:
        s = self.schedule
        rows = build_rows(s)
        self.source = write_source(s, rows, self.work)
        n, window = s.server_rate
        self.sandbox = SandboxProcess(
            rate_limit=f"{n}/{window:g}", latency=f"{s.latency[0]}-{s.latency[1]}", credits=s.credits,
            seed=s.seed, log_dir=self.work, extra=s.sandbox_flags, api_key=self.key,
        )  # fmt: skip
        self.proxy = ApiProxy(self.sandbox.base_url, bulk_delay=s.bulk_delay, seed=s.seed)
        if s.store == "postgres" and self.world.postgres:
            self.pg = _Postgres(s.seed)
            self.store_url = self.pg.url
        else:
            self.store_url = f"sqlite:///{self.work / 'store.db'}"

    def _env(self) -> dict[str, str]:
        s = self.schedule
        assert self.proxy is not None
        env = {
            k: v for k, v in self.world.prefect_env.items() if not k.startswith(("CLEANLIST_", "PREFECT_API"))
        }
        # A /tmp of its own per schedule: a run in a PID namespace takes the workspaces of runs outside it
        # for dead (their pids are not in its namespace) and deletes them; schedules played at once
        # must not do that to each other (runs of one schedule still share it).
        tmp = self.work / "tmp"
        tmp.mkdir(exist_ok=True)
        env.update(
            TMPDIR=str(tmp),
            HOME=str(self.home),
            CLEANLIST_API_KEY=self.key + s.key_tail,
            CLEANLIST_BASE_URL=self.proxy.base_url,
            CLEANLIST_RATE_LIMIT=s.client_rate,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PYTHONPATH=str(self.world.checkout),
            PYTHONFAULTHANDLER="1",  # a hung run's stacks go to its log when the bound kills it
        )
        if s.temp_server or self.world.prefect_api_url is None:
            home = self.work / "prefect"
            if self.world.seed_prefect_homes:
                env.update(seed_prefect_home(home, self.world.python))
            env["PREFECT_HOME"] = str(home)
            # A loaded CI machine starts the temporary server slowly: that is not the run's fault.
            env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
        else:
            env["PREFECT_API_URL"] = self.world.prefect_api_url
        return env

    def _frame_cmd(self, output: Path) -> list[str]:
        """The DataFrame driver with the same options as keyword arguments."""
        s = self.schedule
        assert self.source is not None
        options: dict[str, Any] = {"store": self.store_url, "enrichment_type": s.enrichment_type,
                                   "max_concurrent_chunks": s.concurrency}  # fmt: skip
        flags = list(s.run_options)
        for flag, value in zip(flags[::2], flags[1::2], strict=True):
            name = flag.removeprefix("--").replace("-", "_")
            options[name] = int(value) if name in ("retries", "pause_timeout_seconds") else float(value)
        driver = Path(__file__).with_name("frame_driver.py")
        return [self.world.python, str(driver), self.source.argument, str(output), json.dumps(options)]

    def _cmd(self, output: Path, container: bool, store_url: str | None = None) -> list[str]:
        s = self.schedule
        assert self.source is not None
        if s.source_format == "dataframe":
            cmd = self._frame_cmd(output)
            return [*UNSHARE, *cmd] if container else cmd
        cmd = [self.world.python, "-m", "cleanlist_prefect.deployments.cli", "run", self.source.argument, "--output", str(output),
               "--store", store_url or self.store_url, "--enrichment-type", s.enrichment_type, "--json",
               "--max-concurrent-chunks", str(s.concurrency), *s.run_options]  # fmt: skip
        if self.source.sql:
            cmd += ["--sql", self.source.sql]
        if s.cursor:
            cmd += ["--cursor", "updated"]
        if s.webhooks:
            cmd += ["--webhook-listen", f"127.0.0.1:{free_port()}", "--webhook-grace-seconds", "0.5"]
        return [*UNSHARE, *cmd] if container else cmd

    def _launch(self, label: str, container: bool = False, store_url: str | None = None) -> _Run:
        output = self.work / f"out-{len(self.runs) + 1}-{len(label)}.csv"
        label = label + (" (container)" if container else "")
        library = self.schedule.source_format == "dataframe"
        return _Run(
            label,
            self._cmd(output, container, store_url),
            self._env(),
            self.world.checkout,
            output,
            library=library,
            bound=self.schedule.run_bound,
        )

    # --- events -----------------------------------------------------------------------------------

    def _moment_reached(self, run: _Run) -> bool:
        s = self.schedule
        assert self.proxy is not None
        seen = self.proxy.snapshot()
        if s.moment == "bulk_on_wire":
            return bool(seen["bulk_on_wire"] > 0)
        if s.moment == "second_bulk":
            return bool(seen["bulk"] + seen["bulk_on_wire"] >= 2)
        if s.moment == "limiter_wait":
            # The first answer is in: with a tight window the other chunks now wait for a rate slot.
            done = self.proxy.bulk
            return bool(done) and time.monotonic() >= done[0].ended + s.event_delay * 0.4
        if s.moment == "credit_pause":
            # The API said "out of credits": the run pauses, re-checking the balance.
            paused = self.proxy.first_402_at
            return paused is not None and time.monotonic() >= paused + 0.3 + s.event_delay * 0.2
        first = self.proxy.first_request_at
        return first is not None and first >= run.started and time.monotonic() >= first + s.event_delay

    def _with_event(self, run: _Run, sig: signal.Signals) -> RunFacts:
        deadline = run.started + self.schedule.run_bound
        fired = False
        while not run.poll() and time.monotonic() < deadline:
            run.watch()
            if self._moment_reached(run):
                if self.schedule.moment in ("bulk_on_wire", "second_bulk"):
                    time.sleep(min(self.schedule.event_delay * 0.02, 0.05))
                run.send(self.schedule.event, sig)
                fired = True
                break
            time.sleep(0.01)
        if not fired:
            self.notes.append(f"{run.label}: ended before its {self.schedule.moment} moment")
            return run.finish(deadline)
        grace = SIGNAL_GRACE_SECONDS if sig != signal.SIGKILL else 10.0
        return run.finish(time.monotonic() + grace)

    def _other_store(self) -> list[RunFacts]:
        """Run 1 on the schedule's store; at its moment, a second run of the same source on another store
        path (SQLite beside the source), on the same machine and HOME. Both run to their end."""
        s = self.schedule
        first = self._launch("run 1")
        deadline = first.started + s.run_bound
        while not first.poll() and time.monotonic() < deadline and not self._moment_reached(first):
            first.watch()
            time.sleep(0.01)
        if first.poll():
            self.notes.append(f"run 1 ended before its {s.moment} moment")
        other = self._launch(OTHER_STORE_LABEL, store_url=f"sqlite:///{self.work / 'other-store.db'}")
        _until_each_ends([(first, deadline), (other, other.started + s.run_bound)])
        ran = first.finish(deadline)
        beside = other.finish(other.started + s.run_bound)
        beside.other_store = True
        beside.workflows_recorded = _sqlite_workflows(self.work / "other-store.db")
        return [beside, ran]  # run 1 last: the reruns follow the schedule's own store

    def _heal(self) -> None:
        """After the fault phase: faults cleared, the key restored, credits back; the API stays as drawn."""
        assert self.sandbox is not None
        admin = httpx.Client(base_url=self.sandbox.base_url + "/_sandbox", timeout=30,
                             headers={"Authorization": f"Bearer {self.key}"})  # fmt: skip
        with admin:
            admin.delete("/faults")
            admin.post("/keys/restore", json={"api_key": self.key})
            admin.post("/credits", json={"add": 1e9})

    def _outage_watch(self, stop: threading.Event) -> None:
        """The store outage: PostgreSQL refuses connections a drawn delay after the first request."""
        s = self.schedule
        assert self.proxy is not None and self.pg is not None and s.store_outage is not None
        while not stop.is_set():
            first = self.proxy.first_request_at
            if first is not None and time.monotonic() >= first + s.store_outage:
                self.pg.outage(down=True)
                self.outage_fired = time.monotonic()
                return
            stop.wait(0.05)

    # --- the schedule -----------------------------------------------------------------------------

    def play(self) -> tuple[ScheduleFacts, list[str]]:
        s = self.schedule
        try:
            self._start()
            container = s.event == "container"
            stop_outage = threading.Event()
            watcher: threading.Thread | None = None
            if s.store_outage is not None and self.pg is not None:
                watcher = threading.Thread(target=self._outage_watch, args=(stop_outage,), daemon=True)
                watcher.start()
            if s.event == "concurrent":
                first = self._launch("run 1")
                time.sleep(0.3 + s.event_delay)
                second = self._launch("run 2 (at once)")
                _until_each_ends(
                    [(first, first.started + s.run_bound), (second, second.started + s.run_bound)]
                )
                self.runs.append(first.finish(first.started + s.run_bound))
                self.runs.append(second.finish(second.started + s.run_bound))
            elif s.event == "other_store":
                self.runs.extend(self._other_store())
            elif s.event in SIGNALS:
                self.runs.append(self._with_event(self._launch("run 1", container), SIGNALS[s.event]))
            else:
                first = self._launch("run 1")
                self.runs.append(first.finish(first.started + s.run_bound))
            if watcher is not None:
                stop_outage.set()
                watcher.join()
                if self.outage_fired is None:
                    self.notes.append("run 1 ended before the store outage")
            if self.pg is not None:
                self.pg.outage(down=False)  # the store is back for the reruns
            reruns = 0
            all_completed = all(run.completed for run in self.runs)
            first_rerun = s.event != "none" and (s.rerun_after_completed or not all_completed)
            while reruns < s.max_reruns and (first_rerun or not self.runs[-1].completed):
                first_rerun = False
                if (
                    reruns >= 1
                    or (self.runs[-1].exit_code or 0) == 2
                    or self.runs[-1].status == "credits_exhausted"
                    or s.moment == "credit_pause"  # the user topped up, then ran again
                ):
                    self._heal()
                reruns += 1
                run = self._launch(f"rerun {reruns}", container)
                self.runs.append(run.finish(run.started + self.schedule.run_bound))
                if self.runs[-1].completed:
                    break
                if self.runs[-1].exit_code is None:
                    break  # a rerun that hangs is the finding; more reruns would hang the same way
            return self._facts(), self.notes
        finally:
            self._stop()

    def _facts(self) -> ScheduleFacts:
        s = self.schedule
        assert self.sandbox is not None and self.proxy is not None and self.source is not None
        counters = self.sandbox.counters()
        workflows = self.pg.workflows() if self.pg else _sqlite_workflows(self.work / "store.db")
        email, phone = (1.0, 10.0) if s.enrichment_type == "full" else (1.0, 0.0)
        texts: dict[str, str] = {}
        for run in self.runs:
            texts[f"{run.label} stdout/stderr"] = run.stderr
        for path in sorted(self.work.rglob("*")):
            if (
                not path.is_file()
                or path.name.startswith(("store.db", "other-store.db", "sandbox-", "source"))
                or path.suffix == ".log"
            ):
                continue
            with contextlib.suppress(OSError):
                texts[str(path.relative_to(self.work))] = path.read_bytes().decode("latin-1")
        refused = (
            not s.key_tail  # a key with a trailing newline is the user's key, not a refused source
            and not self.proxy.bulk
            and all(r.exit_code == 1 for r in self.runs)
            and all("Traceback" not in r.stderr for r in self.runs)
        )
        return ScheduleFacts(
            seed=s.seed,
            input_rows=dict(self.source.rows),
            cursor_kind=s.cursor,
            runs=self.runs,
            bulk_requests=list(self.proxy.bulk),
            workflows_recorded=workflows,
            contacts_accepted_more_than_once=int(counters["contacts_accepted_more_than_once"]),
            credits_charged=float(counters["credits_charged"]),
            credits_never_asked=float(counters.get("credits_of_workflows_never_asked", 0.0)),
            email_credit=email,
            phone_credit=phone,
            secrets=[self.key, *([_password_for(s.seed)] if self.pg else [])],
            texts=texts,
            source_refused=refused,
        )

    def _stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        if self.sandbox is not None:
            self.sandbox.stop()
        if self.pg is not None:
            self.pg.drop()


def play(schedule: Schedule, world: World) -> Played:
    """Play one schedule and check every invariant on what it left."""
    started = time.monotonic()
    player = SchedulePlayer(schedule, world)
    facts, notes = player.play()
    violations = check(facts)
    if not world.keep_all and (not violations or not world.keep_failed):
        shutil.rmtree(player.work, ignore_errors=True)
    return Played(schedule, facts, violations, time.monotonic() - started, notes)
