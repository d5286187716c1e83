"""Processes the benchmarks start and measure: the sandbox, a Prefect server, the measured runs.

Every measured program runs as a child process, so its CPU and memory are its own: `run_measured`
reaps the child with `os.wait4` (exact user/system CPU of that process) and samples the whole process
tree meanwhile: the high-water RSS (VmHWM) of each process, so the peak of the largest one is exact up
to the last 0.1 s, and the CPU over time, so a phase of the run can be costed on its own.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
SANDBOX_KEY = "clapi_" + "bench000" * 8


# Services of the Prefect server that look after deployments, workers and old data. A CLI run or a flow
# run in a test uses none of them, and their loops cost an idle server ~1.5 s of CPU a minute (3.4 s with
# them, 1.9 s without, measured 2026-12-07): on a 2-CPU machine, with a server per test worker and more
# for the fault schedules, that is CPU the tests wait for.
IDLE_PREFECT_SERVICES = (
    "SCHEDULER",
    "LATE_RUNS",
    "FOREMAN",
    "DB_VACUUM",
    "REPOSSESSOR",
    "CLEANUP_RECONCILER",
)


def quiet_prefect_services(env: MutableMapping[str, str]) -> None:
    """Turn the idle services off in `env` for every Prefect server started with it (unless set there)."""
    for service in IDLE_PREFECT_SERVICES:
        env.setdefault(f"PREFECT_SERVER_SERVICES_{service}_ENABLED", "false")


PREFECT_DB = "prefect.db"
_MIGRATING = threading.Lock()  # schedules played at once wait for the one migration


# A directory where every process of one test session (pytest-xdist workers, the fault schedules they
# start) finds one migrated Prefect database instead of migrating its own (tests/conftest.py sets it).
TEMPLATE_DIR_ENV = "CLEANLIST_PREFECT_TEMPLATE_DIR"


# A server started on a copy of the migrated database (`seed_prefect_home`) finds the block types there
# already (`_migrate` registers them) and skips registering them again. A start that registers them first
# imports every installed Prefect collection (prefect-aws brings botocore and aiohttp): 2.3-2.8 s of a
# start's 7.6-8.1 s of CPU here (2026-12-07), paid by each of the ~40 servers a suite run starts.
SEEDED_SERVER_ENV: Final = {
    "PREFECT_API_BLOCKS_REGISTER_ON_START": "false",
    "PREFECT_MEMOIZE_BLOCK_AUTO_REGISTRATION": "false",  # else collections are imported before that check
}

# What a server's start registers (prefect/server/api/server.py::add_block_types), done once on the template.
_REGISTER_BLOCK_TYPES = """
import asyncio
import prefect.plugins
from prefect.server.database import provide_database_interface
from prefect.server.models.block_registration import run_block_auto_registration

async def main():
    prefect.plugins.load_prefect_collections()
    session = await provide_database_interface().session()
    async with session:
        await run_block_auto_registration(session=session)

asyncio.run(main())
"""


def _migrate(home: Path, python: str) -> Path:
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    for name in ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL"):
        env.pop(name, None)
    subprocess.run([python, "-m", "prefect", "server", "database", "upgrade", "-y"],
                   env=env, check=True, capture_output=True, timeout=900)  # fmt: skip
    subprocess.run(
        [python, "-c", _REGISTER_BLOCK_TYPES], env=env, check=True, capture_output=True, timeout=900
    )
    return home / PREFECT_DB


def _shared_migrated_db(directory: Path, python: str) -> Path:
    """The migrated database kept in `directory` for every process that shares it, made by the first
    to ask (the others wait on a file lock): one per Python and Prefect version."""
    import fcntl
    import hashlib

    probe = "import importlib.metadata as m; print(m.version('prefect'))"  # without importing Prefect
    version = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    home = directory / hashlib.sha256(f"{python}\0{version}".encode()).hexdigest()[:16]
    home.mkdir(parents=True, exist_ok=True)
    done = home / "migrated"
    with open(home / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            _migrate(home, python)
            done.touch()
    return home / PREFECT_DB


@functools.cache
def _migrated_prefect_db(python: str) -> Path:
    """A Prefect database with every migration of `python`'s Prefect, made once per process (or once per
    test session: `TEMPLATE_DIR_ENV`).

    A Prefect server's first start on an empty PREFECT_HOME runs Prefect's migrations: ~17 s of CPU on
    this 2-CPU machine, 40-90 s at a load of 5-8. A user pays that once per machine; the benchmarks and
    the fault schedules start many servers, each from a copy of this one (`seed_prefect_home`), as on a
    machine that ran Prefect before. The directory is removed when the process exits."""
    shared = os.environ.get(TEMPLATE_DIR_ENV)
    if shared:
        return _shared_migrated_db(Path(shared), python)
    home = Path(tempfile.mkdtemp(prefix="cleanlist-prefect-template-"))
    atexit.register(shutil.rmtree, home, True)
    return _migrate(home, python)


def migrated_prefect_db(python: str = sys.executable) -> Path:
    with _MIGRATING:
        return _migrated_prefect_db(python)


def seed_prefect_home(home: Path, python: str = sys.executable) -> dict[str, str]:
    """Give an empty PREFECT_HOME the migrated database (see `migrated_prefect_db`); returns what the
    environment of a server started on it adds (`SEEDED_SERVER_ENV`)."""
    home.mkdir(parents=True, exist_ok=True)
    if not (home / PREFECT_DB).exists():
        shutil.copy2(migrated_prefect_db(python), home / PREFECT_DB)
    return dict(SEEDED_SERVER_ENV)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for(url: str, timeout: float, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before answering")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not answer {url} within {timeout:.0f}s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class SandboxProcess:
    """`cleanlist-enrich sandbox` in its own process (its own GIL), with its admin API at hand."""

    def __init__(
        self,
        *,
        rate_limit: str,
        latency: str,
        credits: float = 1e12,
        seed: int = 7,
        log_dir: Path | None = None,
        extra: Sequence[str] = (),
        api_key: str = SANDBOX_KEY,
    ) -> None:
        self.port = free_port()
        self.api_key = api_key
        self.rate_limit = rate_limit
        self.latency = latency
        log_dir = log_dir or Path(tempfile.gettempdir())
        self._log = open(log_dir / f"sandbox-{self.port}.log", "wb")
        cmd = [
            sys.executable, "-m", "cleanlist_prefect.deployments.cli", "sandbox",
            "--port", str(self.port), "--api-key", self.api_key, "--credits", str(credits),
            "--rate-limit", rate_limit, "--latency", latency, "--seed", str(seed), *extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._admin = httpx.Client(
            base_url=self.base_url + "/_sandbox",
            timeout=60.0,
            headers={"Authorization": f"Bearer {self.api_key}"},
        )
        _wait_for(self.base_url + "/_sandbox/counters", 60, self.proc, "the sandbox")

    def reset(self) -> None:
        self._admin.post("/reset").raise_for_status()

    def counters(self) -> dict[str, Any]:
        response = self._admin.get("/counters")
        response.raise_for_status()
        return dict(response.json())

    def requests_log(self) -> list[dict[str, Any]]:
        response = self._admin.get("/requests")
        response.raise_for_status()
        return list(response.json())

    def clock_offset(self) -> float:
        """`time.monotonic()` here minus the sandbox log's `t`, from one validate-key request (free of credits; it spends one request of its window).

        Both processes read CLOCK_MONOTONIC, so this maps request-log times onto local samples (to a few
        milliseconds: the request's own round trip).
        """
        before = time.monotonic()
        httpx.get(
            self.base_url + "/api/v1/public/auth/validate-key",
            headers={"Authorization": f"Bearer {self.api_key}"},
            timeout=10.0,
        ).raise_for_status()
        after = time.monotonic()
        entry = [e for e in self.requests_log() if e["endpoint"] == "validate-key"][-1]
        return (before + after) / 2 - float(entry["t"])

    def cpu_seconds(self) -> float:
        times = psutil.Process(self.proc.pid).cpu_times()
        return float(times.user + times.system)

    def stop(self) -> None:
        self._admin.close()
        _stop(self.proc)
        self._log.close()


class PrefectServer:
    """One `prefect server start` for every measured run, so none pays for a temporary server."""

    def __init__(self, home: Path) -> None:
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.env = {
            **os.environ,
            **seed_prefect_home(home),
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
        }
        self._log = open(home / "server.log", "wb")
        started = time.monotonic()
        cmd = [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            # A first start migrates its database: minutes on a loaded 2-CPU machine.
            _wait_for(self.api_url + "/health", 600, self.proc, "the Prefect server")
        except BaseException:
            self.stop()  # never left running behind a failed start (it was, orphaned, at load ~29)
            raise
        self.startup_seconds = time.monotonic() - started

    def cpu_seconds(self) -> float:
        total = 0.0
        try:
            root = psutil.Process(self.proc.pid)
            for proc in [root, *root.children(recursive=True)]:
                times = proc.cpu_times()
                total += times.user + times.system
        except psutil.Error:
            pass
        return total

    def stop(self) -> None:
        _stop(self.proc)
        self._log.close()


class ExistingPrefect:
    """A Prefect API that is already running (`--prefect-api-url`, e.g. a test session's): nothing is
    started or stopped, and its CPU is not measured (reported as 0)."""

    startup_seconds = 0.0

    def __init__(self, api_url: str) -> None:
        self.api_url = api_url
        self.env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}

    def cpu_seconds(self) -> float:
        return 0.0

    def stop(self) -> None:
        pass


def prefect_for(home: Path, api_url: str | None) -> PrefectServer | ExistingPrefect:
    """The given Prefect API, else a server of our own (started here, stopped by the caller)."""
    return ExistingPrefect(api_url) if api_url else PrefectServer(home)


@dataclass
class Sample:
    t: float  # time.monotonic()
    cpu: float  # user + system seconds of the measured process
    rss: int  # bytes, the largest high-water RSS among the tree's processes so far
    system_busy: float  # busy CPUs of the whole machine since the previous sample (0..ncpu)


@dataclass
class Measured:
    returncode: int
    started: float  # time.monotonic()
    wall: float
    user: float
    system: float
    max_rss: int  # bytes, of the largest process of the tree over the run
    stdout: str
    stderr_tail: str
    samples: list[Sample] = field(default_factory=list)

    @property
    def cpu(self) -> float:
        return self.user + self.system

    def cpu_at(self, moment: float) -> float:
        """The process's CPU seconds at `moment` (monotonic), interpolated between samples."""
        points = [(s.t, s.cpu) for s in self.samples]
        if not points or moment <= points[0][0]:
            return points[0][1] if points else 0.0
        for (t0, c0), (t1, c1) in zip(points, points[1:], strict=False):
            if t0 <= moment <= t1:
                return c0 + (c1 - c0) * ((moment - t0) / (t1 - t0) if t1 > t0 else 0.0)
        return self.cpu

    def machine_busy(self, start: float, end: float) -> float:
        """Average busy CPUs of the whole machine between two moments (all processes, ours included)."""
        inside = [s.system_busy for s in self.samples if start <= s.t <= end]
        return sum(inside) / len(inside) if inside else 0.0


def _peak_rss(proc: psutil.Process) -> int:
    """The process's high-water RSS since exec (VmHWM), so no spike falls between two samples."""
    try:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return int(proc.memory_info().rss)


def run_measured(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path = ROOT,
    interval: float = 0.1,
    timeout: float = 3 * 3600.0,
) -> Measured:
    """Run `cmd` to the end; CPU from wait4, peak RSS of the largest process from /proc sampling."""
    out = tempfile.TemporaryFile()
    err = tempfile.TemporaryFile()
    started = time.monotonic()
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=dict(env), stdout=out, stderr=err)
    samples: list[Sample] = []
    peak = 0
    done = threading.Event()
    result: dict[str, Any] = {}

    def reap() -> None:
        _, status, usage = os.wait4(proc.pid, 0)
        result["status"], result["usage"], result["ended"] = status, usage, time.monotonic()
        done.set()

    threading.Thread(target=reap, daemon=True).start()
    root = psutil.Process(proc.pid)
    psutil.cpu_percent(interval=None)
    ncpu = psutil.cpu_count() or 1
    while not done.wait(interval):
        if time.monotonic() - started > timeout:
            proc.kill()
        try:
            tree = [root, *root.children(recursive=True)]
            rss = max(_peak_rss(p) for p in tree)
            times = root.cpu_times()
            cpu = times.user + times.system
        except psutil.Error:
            continue
        peak = max(peak, rss)
        samples.append(Sample(time.monotonic(), cpu, rss, psutil.cpu_percent(interval=None) / 100 * ncpu))
    usage = result["usage"]
    proc.returncode = os.waitstatus_to_exitcode(result["status"])
    # Not ru_maxrss: it counts the forked child before exec, i.e. this (measuring) process's pages.
    out.seek(0)
    err.seek(0)
    stderr = err.read().decode("utf-8", "replace")
    measured = Measured(
        returncode=proc.returncode,
        started=started,
        wall=result["ended"] - started,
        user=float(usage.ru_utime),
        system=float(usage.ru_stime),
        max_rss=peak,
        stdout=out.read().decode("utf-8", "replace"),
        stderr_tail=stderr[-4000:],
        samples=samples,
    )
    out.close()
    err.close()
    return measured


def machine() -> dict[str, Any]:
    """What the numbers ran on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cpus": psutil.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": sys.version.split()[0],
        "platform": sys.platform,
    }
