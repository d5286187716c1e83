"""A flood against a run's webhook receiver during the run (issue 21): rows, throughput and memory.

    .venv/bin/python -m benchmarks.webhook_flood [--contacts 3000] [--forged 3000] [--idle 300] [--big 40]
        [--valid-big 200] [--valid-senders 48] [--receiver-only]

Two runs of the real flow (`cleanlist-enrich run --webhook-listen 127.0.0.1:PORT`) against a sandbox
in its own process, on a compressed clock, each with a fresh store: a quiet one, then one whose receiver
is flooded from this process while it runs — `--forged` forged deliveries (guessed tokens, a real-looking
body), `--idle` connections that send half a request head and wait (reopened whenever the receiver
closes them), `--big` bodies at the receiver's size limit (4 MiB) to guessed tokens (refused before the
body is read), and `--valid-big` bodies at the size limit to a *valid* token (one registered in the run's
store, as another run sharing the receiver would), `--valid-senders` at once: these are read whole, so
they are what the receiver's memory bound (`app.MAX_BODIES_IN_FLIGHT` = 16 bodies) is about; they are
garbage (answered 422, nothing stored). Printed: the rows written and
their statuses, contacts/s over the API phase, status calls, the run process's peak RSS (the receiver
lives in it), what the flood's requests were answered, and the machine's load. The rows must be the
same, the throughput within 10 %, and the peak RSS bounded (not growing with the flood).

`--receiver-only` measures the receiver alone instead (`cleanlist-enrich receiver` in its own process,
no run, no Prefect): its high-water RSS (VmHWM) at rest, then after `--valid-big` bodies at the size
limit sent by `--valid-senders` at once to a valid token, with the answers they got.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from benchmarks.data import DatasetSpec, cached_dataset
from benchmarks.procs import PrefectServer, SandboxProcess, free_port
from benchmarks.run import CHUNK, Stand, last_json_line, measure_api_run, pipeline_cmd, pipeline_env

BIG_BODY = 4 * 2**20  # cleanlist.webhooks.app.MAX_DELIVERY_BYTES


def garbage_at_the_limit() -> bytes:
    """A JSON body of exactly the receiver's size limit that is no delivery (answered 422 once read)."""
    head, tail = b'{"event": "enrichment.completed", "pad": "', b'"}'
    return head + b"x" * (BIG_BODY - len(head) - len(tail)) + tail


def register_flood_token(store_url: str) -> str:
    """A valid token for the receiver serving `store_url`: registered for a run of its own, as another run
    sharing the receiver would have one."""
    from cleanlist.store import EnrichmentStore
    from cleanlist.webhooks import register_run

    with EnrichmentStore(store_url) as store:
        run_id = f"flood-{secrets.token_hex(4)}"
        store.start_run(run_id, {})
        token = register_run(store, run_id)
        store.finish_run(run_id, "completed", {})
    return token


class Flood:
    """Forged deliveries, idle half-sent requests and bodies at the size limit against one receiver."""

    def __init__(
        self,
        port: int,
        *,
        forged: int,
        idle: int,
        big: int,
        valid_big: int = 0,
        valid_senders: int = 1,
        valid_token: str | None = None,
    ) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.forged, self.idle, self.big = forged, idle, big
        self.valid_big, self.valid_senders, self.valid_token = valid_big, valid_senders, valid_token
        self.answers: Counter[str] = Counter()
        self.idle_reopened = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _count(self, what: str) -> None:
        with self._lock:
            self.answers[what] += 1

    def _post(self, client: httpx.Client, body: bytes, token: str | None = None, label: str = "") -> None:
        try:
            status = client.post(f"/hooks/{token or secrets.token_urlsafe(32)}", content=body).status_code
            self._count(f"{label}{status}")
        except httpx.HTTPError as exc:
            self._count(f"{label}{type(exc).__name__}")

    def _valid_big(self, count: int) -> None:
        body = garbage_at_the_limit()
        with httpx.Client(base_url=self.base, timeout=30) as client:
            for _ in range(count):
                if self._stop.is_set():
                    return
                self._post(client, body, self.valid_token, "valid token, 4 MiB: ")

    def _forger(self, count: int) -> None:
        body = json.dumps(
            {"event": "enrichment.completed", "workflow_id": "public_bulk_forged", "status": "completed",
             "results": [{"task_id": f"t{i}", "status": "completed", "primary_email": "x@y.example"}
                         for i in range(20)]}
        ).encode()  # fmt: skip
        with httpx.Client(base_url=self.base, timeout=15) as client:
            for _ in range(count):
                if self._stop.is_set():
                    return
                self._post(client, body)

    def _big(self, count: int) -> None:
        body = b'{"event": "enrichment.completed", "pad": "' + b"x" * (BIG_BODY - 100) + b'"}'
        with httpx.Client(base_url=self.base, timeout=30) as client:
            for _ in range(count):
                if self._stop.is_set():
                    return
                self._post(client, body)

    def _idler(self) -> None:
        sockets: list[socket.socket] = []
        while not self._stop.is_set():
            alive = []
            for sock in sockets:
                try:
                    if sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b"":
                        sock.close()  # closed by the receiver (head deadline): open another
                        continue
                except BlockingIOError:
                    pass
                except OSError:
                    sock.close()
                    continue
                alive.append(sock)
            sockets = alive
            while len(sockets) < self.idle and not self._stop.is_set():
                try:
                    sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
                    sock.sendall(b"POST /hooks/slow HTTP/1.1\r\nHost: x\r\n")
                except OSError:
                    break
                sockets.append(sock)
                with self._lock:
                    self.idle_reopened += 1
            self._stop.wait(0.2)
        for sock in sockets:
            sock.close()

    def start(self) -> None:
        per = max(1, self.forged // 8)
        self._threads = []
        if self.forged:
            self._threads += [
                threading.Thread(target=self._forger, args=(per,), daemon=True) for _ in range(8)
            ]
        if self.big:
            for _ in range(2):
                self._threads.append(
                    threading.Thread(target=self._big, args=(max(1, self.big // 2),), daemon=True)
                )
        if self.idle:
            self._threads.append(threading.Thread(target=self._idler, daemon=True))
        if self.valid_token and self.valid_big:
            per_sender = max(1, self.valid_big // self.valid_senders)
            self._threads += [
                threading.Thread(target=self._valid_big, args=(per_sender,), daemon=True)
                for _ in range(self.valid_senders)
            ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


def _wait_listening(port: int, timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def one_run(stand: Stand, data: Path, args: argparse.Namespace, label: str, flood: bool) -> dict[str, Any]:
    port = free_port()
    out, store = stand.workdir / f"flood-{label}.csv", stand.workdir / f"store-flood-{label}.db"
    extra = ["--initial-poll-seconds", "1", "--webhook-listen", f"127.0.0.1:{port}"]
    chunks = -(-args.contacts // CHUNK)
    ceiling = int(args.rate_limit.split("/")[0]) * CHUNK / float(args.rate_limit.split("/")[1])
    flooder: Flood | None = None
    if flood:
        flooder = Flood(
            port,
            forged=args.forged,
            idle=args.idle,
            big=args.big,
            valid_big=args.valid_big,
            valid_senders=args.valid_senders,
        )

        def start_when_listening(flood: Flood = flooder) -> None:
            if _wait_listening(port):
                if flood.valid_big:  # the run's store exists once its receiver listens
                    flood.valid_token = register_flood_token(f"sqlite:///{store}")
                flood.start()

        starter = threading.Thread(target=start_when_listening, daemon=True)
        starter.start()
    try:
        row, measured, _ = measure_api_run(
            stand,
            pipeline_cmd(data, out, store, extra),
            pipeline_env(stand, args.rate_limit),
            chunks,
            ceiling,
        )
    finally:
        if flooder is not None:
            flooder.stop()
    summary = last_json_line(measured.stdout)
    result = {
        "contacts_per_s": row["contacts_per_s"],
        "ceiling_ratio": row["ceiling_ratio"],
        "status_calls": row["status_calls"],
        "peak_rss_mib": row["peak_rss_mib"],
        "cpu_seconds": row["cpu_seconds"],
        "row_statuses": summary.get("row_statuses"),
        "webhook_deliveries": summary.get("webhook_deliveries"),
        "credits_spent": summary.get("credits_spent"),
        "load": os.getloadavg(),
    }
    if flooder is not None:
        result["flood_answers"] = dict(flooder.answers)
        result["idle_connections_opened"] = flooder.idle_reopened
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contacts", type=int, default=3000)
    parser.add_argument("--rate-limit", default="6/1", help="the sandbox's (and the client's) limit")
    parser.add_argument("--latency", default="0.5-1.5")
    parser.add_argument("--forged", type=int, default=3000)
    parser.add_argument("--idle", type=int, default=300)
    parser.add_argument("--big", type=int, default=40)
    parser.add_argument("--valid-big", type=int, default=200, help="4 MiB bodies to a valid token")
    parser.add_argument("--valid-senders", type=int, default=48, help="of them sent at once")
    parser.add_argument("--receiver-only", action="store_true", help="measure the receiver alone")
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "cleanlist-bench-data")
    args = parser.parse_args(argv)
    if args.receiver_only:
        return receiver_only(args)
    data = cached_dataset(args.data_dir, DatasetSpec(args.contacts), "csv")
    with tempfile.TemporaryDirectory(prefix="cleanlist-flood-") as tmp:
        workdir = Path(tmp)
        prefect = PrefectServer(workdir / "prefect-home")
        try:
            sandbox = SandboxProcess(rate_limit=args.rate_limit, latency=args.latency, log_dir=workdir)
            try:
                stand = Stand(prefect, sandbox, workdir)
                quiet = one_run(stand, data, args, "quiet", flood=False)
                flooded = one_run(stand, data, args, "flooded", flood=True)
            finally:
                sandbox.stop()
        finally:
            prefect.stop()
    for label, row in (("quiet", quiet), ("flooded", flooded)):
        print(f"{label}: {json.dumps(row)}")
    ratio = flooded["contacts_per_s"] / quiet["contacts_per_s"]
    print(
        f"throughput flooded/quiet = {ratio:.3f}; rows {'same' if quiet['row_statuses'] == flooded['row_statuses'] else 'DIFFER'}; "
        f"peak RSS {quiet['peak_rss_mib']:.0f} → {flooded['peak_rss_mib']:.0f} MiB; load {os.getloadavg()}"
    )
    return 0


def _high_water_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def receiver_only(args: argparse.Namespace) -> int:
    """The receiver in its own process: its peak RSS at rest, then under valid-token bodies at the limit."""
    with tempfile.TemporaryDirectory(prefix="cleanlist-flood-") as tmp:
        store_url = f"sqlite:///{Path(tmp) / 'store.db'}"
        token = register_flood_token(store_url)  # also creates the schema
        port = free_port()
        env = {**os.environ, "HOME": tmp, "PREFECT_HOME": str(Path(tmp) / "prefect")}
        process = subprocess.Popen(
            [sys.executable, "-m", "cleanlist_prefect.deployments.cli", "receiver",
             "--port", str(port), "--store", store_url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        )  # fmt: skip
        try:
            if not _wait_listening(port, timeout=60):
                raise RuntimeError("the receiver did not start")
            with httpx.Client(timeout=10) as client:  # warm: one request of each answer
                client.get(f"http://127.0.0.1:{port}/healthz")
                client.post(f"http://127.0.0.1:{port}/hooks/{token}", content=b"{}")
            at_rest = _high_water_mib(process.pid)
            cpu_before = psutil_cpu(process.pid)
            flood = Flood(
                port, forged=0, idle=0, big=0,
                valid_big=args.valid_big, valid_senders=args.valid_senders, valid_token=token,
            )  # fmt: skip
            began = time.monotonic()
            flood.start()
            for thread in flood._threads:  # every sender to its last body (no idle connections here)
                thread.join(timeout=600)
            flood.stop()
            seconds = time.monotonic() - began
            flooded = _high_water_mib(process.pid)
            cpu = psutil_cpu(process.pid) - cpu_before
        finally:
            process.terminate()
            process.wait(timeout=20)
    bodies = sum(flood.answers.values())
    print(
        json.dumps(
            {
                "receiver_peak_rss_mib_at_rest": round(at_rest, 1),
                "receiver_peak_rss_mib_flooded": round(flooded, 1),
                "bodies": bodies,
                "senders_at_once": args.valid_senders,
                "answers": dict(flood.answers),
                "seconds": round(seconds, 1),
                "receiver_cpu_seconds": round(cpu, 1),
                "load": os.getloadavg(),
            }
        )
    )
    print(
        f"receiver peak RSS {at_rest:.0f} → {flooded:.0f} MiB after {bodies} valid-token bodies of 4 MiB, "
        f"{args.valid_senders} at once (bound: 16 in flight × 4 MiB); load {os.getloadavg()}"
    )
    return 0


def psutil_cpu(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


if __name__ == "__main__":
    raise SystemExit(main())
