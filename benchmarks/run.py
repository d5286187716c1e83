"""Benchmarks of the enrich-contacts pipeline: throughput against the API's rate ceiling, and scale.

    .venv/bin/python -m benchmarks.run throughput   # pipeline vs the documented loop, compressed clock
    .venv/bin/python -m benchmarks.run scale        # 200k and 1M contacts from CSV and Parquet
    .venv/bin/python -m benchmarks.run all

Everything runs in its own process: one Prefect server for all runs (its startup is reported apart and
never counted), the sandbox (so it does not share the pipeline's GIL), each pipeline run (the real
flow through the `cleanlist-enrich run` CLI) and each baseline run. A table is printed and the full
results are written to benchmarks/results/<time>-<mode>.json. See benchmarks/README.md for what each
column means.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from benchmarks.data import DatasetSpec, cached_dataset
from benchmarks.procs import (
    ROOT,
    ExistingPrefect,
    Measured,
    PrefectServer,
    SandboxProcess,
    machine,
    prefect_for,
    run_measured,
)

RESULTS = Path(__file__).resolve().parent / "results"
CHUNK = 250
MIB = 2**20


# ------------------------------------------------------------------------------------------- metrics


@dataclass
class ApiPhase:
    """What the sandbox saw of one run: from its first bulk request to its last status answer."""

    start: float  # sandbox log time
    end: float
    contacts: int
    workflows: int
    requests: dict[str, dict[str, int]]

    @property
    def seconds(self) -> float:
        return self.end - self.start

    def calls(self, endpoint: str, status: str | None = None) -> int:
        by_status = self.requests.get(endpoint, {})
        return sum(n for s, n in by_status.items() if status is None or s == status)

    @property
    def rate_limited_share(self) -> float:
        limited = sum(self.calls(e) for e in self.requests if e != "validate-key")
        too_many = sum(self.calls(e, "429") for e in self.requests if e != "validate-key")
        return too_many / limited if limited else 0.0


def api_phase(sandbox: SandboxProcess) -> ApiPhase:
    log = sandbox.requests_log()
    counters = sandbox.counters()
    bulk = [e for e in log if e["endpoint"] == "enrich-bulk"]
    status_ok = [e for e in log if e["endpoint"] == "enrich-status" and e["status"] == 200]
    # With webhooks, a run's last result may come by delivery rather than by a status answer.
    ends = [float(status_ok[-1]["t"])] if status_ok else []
    if counters.get("last_webhook_delivered_t") is not None:
        ends.append(float(counters["last_webhook_delivered_t"]))
    if not bulk or not ends:
        raise RuntimeError("the run sent no bulk request and got no status answer or delivery")
    return ApiPhase(
        start=float(bulk[0]["t"]),
        end=max(ends),
        contacts=int(counters["contacts_accepted"]),
        workflows=int(counters["bulk_accepted"]),
        requests=counters["requests"],
    )


def last_json_line(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return dict(json.loads(line))
    raise RuntimeError("no JSON summary on stdout")


def count_rows(path: Path) -> int:
    if not path.exists():
        return 0
    if path.suffix == ".parquet":
        return int(pq.ParquetFile(path).metadata.num_rows)
    reader = pacsv.open_csv(
        path,
        read_options=pacsv.ReadOptions(block_size=16 * MIB),
        convert_options=pacsv.ConvertOptions(include_columns=[], include_missing_columns=True),
    )
    return sum(batch.num_rows for batch in reader)


# --------------------------------------------------------------------------------------------- runs


@dataclass
class Stand:
    prefect: PrefectServer | ExistingPrefect
    sandbox: SandboxProcess
    workdir: Path


def pipeline_cmd(source: Path, output: Path, store: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "cleanlist_prefect.deployments.cli", "run", str(source),
        "--output", str(output), "--store", f"sqlite:///{store}", "--json", *extra,
    ]  # fmt: skip


def pipeline_env(stand: Stand, rate_limit: str) -> dict[str, str]:
    return {
        **stand.prefect.env,
        "PREFECT_API_URL": stand.prefect.api_url,
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "CLEANLIST_API_KEY": stand.sandbox.api_key,
        "CLEANLIST_BASE_URL": stand.sandbox.base_url,
        "CLEANLIST_RATE_LIMIT": rate_limit,
    }


def measure_api_run(
    stand: Stand, cmd: list[str], env: dict[str, str], chunks: int, ceiling: float
) -> tuple[dict[str, Any], Measured, ApiPhase]:
    """Run one client against the sandbox and cost its API phase."""
    offset = stand.sandbox.clock_offset()
    stand.sandbox.reset()
    sandbox_cpu, prefect_cpu = stand.sandbox.cpu_seconds(), stand.prefect.cpu_seconds()
    measured = run_measured(cmd, env=env)
    sandbox_cpu, prefect_cpu = (
        stand.sandbox.cpu_seconds() - sandbox_cpu,
        stand.prefect.cpu_seconds() - prefect_cpu,
    )
    if measured.returncode != 0:
        raise RuntimeError(f"{cmd[2:4]} exited with {measured.returncode}:\n{measured.stderr_tail}")
    phase = api_phase(stand.sandbox)
    start, end = phase.start + offset, phase.end + offset
    rate = phase.contacts / phase.seconds
    row = {
        "contacts": phase.contacts,
        "workflows": phase.workflows,
        "api_seconds": round(phase.seconds, 2),
        "contacts_per_s": round(rate, 1),
        "ceiling_ratio": round(rate / ceiling, 3),
        "status_calls": phase.calls("enrich-status"),
        "status_calls_per_workflow": round(phase.calls("enrich-status") / phase.workflows, 3),
        "bulk_calls": phase.calls("enrich-bulk"),
        "share_429": round(phase.rate_limited_share, 4),
        "requests": phase.requests,
        "cpu_seconds": round(measured.cpu, 2),
        "cpu_ms_per_chunk": round(1000 * measured.cpu / chunks, 1),
        "api_phase_cpu_ms_per_chunk": round(
            1000 * (measured.cpu_at(end) - measured.cpu_at(start)) / chunks, 1
        ),
        "peak_rss_mib": round(measured.max_rss / MIB, 1),
        "wall_seconds": round(measured.wall, 2),
        "machine_busy_cpus_in_api_phase": round(measured.machine_busy(start, end), 2),
        "sandbox_cpu_seconds": round(sandbox_cpu, 2),
        "prefect_server_cpu_seconds": round(prefect_cpu, 2),
    }
    return row, measured, phase


def throughput(args: argparse.Namespace, stand: Stand, report: dict[str, Any]) -> None:
    requests_per_window, _, window = args.rate_limit.partition("/")
    ceiling = int(requests_per_window) * CHUNK / float(window)
    data = cached_dataset(args.data_dir, DatasetSpec(args.contacts), "csv")
    chunks = -(-args.contacts // CHUNK)
    report["throughput"] = {
        "contacts": args.contacts,
        "rate_limit": args.rate_limit,
        "latency": args.latency,
        "ceiling_contacts_per_s": ceiling,
        "time_scale": args.time_scale,
        "runs": {},
    }
    runs = report["throughput"]["runs"]
    variants: list[tuple[str, list[str]]] = [
        (
            "pipeline",
            [
                "--initial-poll-seconds",
                str(args.initial_poll_seconds),
                "--max-concurrent-chunks",
                str(args.max_concurrent_chunks),
            ],
        ),  # fmt: skip
    ]
    if args.with_defaults:
        variants.append(("pipeline (CLI defaults)", []))
    for name, extra in variants:
        for attempt in range(1, args.repeat + 1):
            label = name if args.repeat == 1 else f"{name} #{attempt}"
            print(f"… {label}: {args.contacts} contacts", flush=True)
            # A store of its own per run: a shared one would hold every contact fresh after the first.
            slug = "".join(c if c.isalnum() else "-" for c in label)
            out = stand.workdir / f"{slug}.csv"
            store = stand.workdir / f"store-{slug}.db"
            cmd = pipeline_cmd(data, out, store, extra)
            row, measured, _ = measure_api_run(
                stand, cmd, pipeline_env(stand, args.rate_limit), chunks, ceiling
            )
            summary = last_json_line(measured.stdout)
            rows_out, rows_rej = count_rows(out), count_rows(Path(summary["rejects"]))
            row.update(
                {
                    "options": " ".join(extra) or "(defaults)",
                    "flow_seconds": summary.get("seconds"),
                    "flow_contacts_per_s": round(args.contacts / summary["seconds"], 1),
                    "flow_ceiling_ratio": round(args.contacts / summary["seconds"] / ceiling, 3),
                    "rows_in": args.contacts,
                    "rows_out": rows_out,
                    "rows_rejected": rows_rej,
                    "all_rows_written": rows_out + rows_rej == args.contacts,
                    "summary": summary,
                }
            )
            runs[label] = row
            print(_brief(label, row), flush=True)
    if not args.skip_baseline:
        print(f"… documented loop: {args.baseline_contacts or args.contacts} contacts", flush=True)
        out = stand.workdir / "baseline.csv"
        cmd = [
            sys.executable, "-m", "benchmarks.baseline", str(data),
            "--base-url", stand.sandbox.base_url, "--api-key", stand.sandbox.api_key,
            "--output", str(out), "--time-scale", str(args.time_scale),
            "--limit", str(args.baseline_contacts),
        ]  # fmt: skip
        limit = args.baseline_contacts or args.contacts
        row, measured, phase = measure_api_run(stand, cmd, dict(os.environ), -(-limit // CHUNK), ceiling)
        summary = last_json_line(measured.stdout)
        row.update({"options": f"poll every {summary['poll_seconds']}s", "summary": summary})
        row["rows_out"] = count_rows(out)
        runs["documented loop"] = row
        print(_brief("documented loop", row), flush=True)
        # The median of the pipeline's runs with the benchmark's options (not the best one).
        rates = sorted(
            r["contacts_per_s"] for k, r in runs.items() if k.startswith("pipeline") and "(" not in k
        )
        middle = len(rates) // 2
        median = rates[middle] if len(rates) % 2 else (rates[middle - 1] + rates[middle]) / 2
        report["throughput"]["speedup_vs_documented_loop"] = round(median / row["contacts_per_s"], 1)


def webhooks(args: argparse.Namespace, stand: Stand, report: dict[str, Any]) -> None:
    """Polling only beside webhooks (issue 14), against a sandbox that never sends a share of deliveries."""
    requests_per_window, _, window = args.rate_limit.partition("/")
    ceiling = int(requests_per_window) * CHUNK / float(window)
    data = cached_dataset(args.data_dir, DatasetSpec(args.contacts), "csv")
    chunks = -(-args.contacts // CHUNK)
    common = ["--initial-poll-seconds", str(args.initial_poll_seconds)]
    report["webhooks"] = {
        "contacts": args.contacts,
        "rate_limit": args.rate_limit,
        "latency": args.webhooks_latency,
        "drop_rate": args.webhook_drop_rate,
        "ceiling_contacts_per_s": ceiling,
        "runs": {},
    }
    variants = [("polling only", common), ("webhooks", [*common, "--webhook-listen", "127.0.0.1:0"])]
    for label, extra in variants:
        print(f"… {label}: {args.contacts} contacts", flush=True)
        slug = label.replace(" ", "-")
        out, store = stand.workdir / f"wh-{slug}.csv", stand.workdir / f"store-wh-{slug}.db"
        row, measured, _ = measure_api_run(
            stand,
            pipeline_cmd(data, out, store, extra),
            pipeline_env(stand, args.rate_limit),
            chunks,
            ceiling,
        )
        summary = last_json_line(measured.stdout)
        rows_out, rows_rej = count_rows(out), count_rows(Path(summary["rejects"]))
        row.update(
            {
                "options": " ".join(extra),
                "flow_seconds": summary.get("seconds"),
                "rows_out": rows_out,
                "all_rows_written": rows_out + rows_rej == args.contacts,
                "webhook_deliveries": summary.get("webhook_deliveries", 0),
                "status_calls_saved": summary.get("status_calls_saved", 0),
                "webhook_fallbacks": summary.get("webhook_fallbacks", 0),
                "credits_match": summary["credits_spent"] == stand.sandbox.counters()["credits_charged"],
                "summary": summary,
            }
        )
        report["webhooks"]["runs"][label] = row
        print(_brief(label, row), flush=True)


def _brief(label: str, row: dict[str, Any]) -> str:
    return (
        f"  {label}: {row['contacts_per_s']:.0f} contacts/s = {row['ceiling_ratio']:.3f} of the ceiling, "
        f"{row['status_calls_per_workflow']:.3f} status calls/workflow, {100 * row['share_429']:.2f}% 429, "
        f"{row['cpu_ms_per_chunk']:.0f} ms CPU/chunk, peak RSS {row['peak_rss_mib']:.0f} MiB"
    )


def scale(args: argparse.Namespace, stand: Stand, report: dict[str, Any]) -> None:
    spec_of = {size: DatasetSpec(size, invalid_every=50, duplicate_every=20) for size in args.sizes}
    report["scale"] = {"rate_limit": args.scale_rate_limit, "latency": args.scale_latency, "runs": {}}
    runs = report["scale"]["runs"]
    for fmt in args.formats:
        for size in args.sizes:
            spec = spec_of[size]
            data = cached_dataset(args.data_dir, spec, fmt)
            label = f"{fmt} {size:,}"
            print(f"… scale {label} rows", flush=True)
            out = stand.workdir / f"scale-{size}.{fmt}"
            store = stand.workdir / f"store-scale-{fmt}-{size}.db"
            extra = [
                "--max-concurrent-chunks",
                str(args.scale_concurrent_chunks),
                "--initial-poll-seconds",
                "0.2",
            ]
            env = pipeline_env(stand, args.scale_rate_limit)
            if args.scale_cli_defaults:
                # As a user would run it: no options, and Prefect's own temporary server (a child of
                # the CLI process, so it is among the processes whose peak RSS is measured).
                extra = []
                env = {k: v for k, v in env.items() if not k.startswith("PREFECT_")}
                env["HOME"] = str(stand.workdir / "home")
                Path(env["HOME"]).mkdir(exist_ok=True)
            stand.sandbox.reset()
            measured = run_measured(pipeline_cmd(data, out, store, extra), env=env)
            if measured.returncode != 0:
                raise RuntimeError(
                    f"scale run {label} exited with {measured.returncode}:\n{measured.stderr_tail}"
                )
            summary = last_json_line(measured.stdout)
            rows_out, rows_rej = count_rows(out), count_rows(Path(summary["rejects"]))
            runs[label] = {
                "rows_in": size,
                "rows_out": rows_out,
                "rows_rejected": rows_rej,
                "all_rows_written": rows_out + rows_rej == size,
                "expected_rejects": spec.invalid_rows,
                "unique_contacts": summary.get("unique_contacts"),
                "wall_seconds": round(measured.wall, 1),
                "flow_seconds": summary.get("seconds"),
                "rows_per_s": round(size / summary["seconds"], 1),
                "peak_rss_mib": round(measured.max_rss / MIB, 1),
                "cpu_seconds": round(measured.cpu, 1),
                "summary": summary,
            }
            print(
                f"  {label}: {summary['seconds']:.0f} s in the flow ({measured.wall:.0f} s wall), peak RSS "
                f"{measured.max_rss / MIB:.0f} MiB, rows {rows_out} + {rows_rej} rejects = {rows_out + rows_rej}"
                f" of {size}",
                flush=True,
            )
            for path in (out, Path(summary["rejects"]), store):
                path.unlink(missing_ok=True)
    ratios = {}
    if len(args.sizes) >= 2:
        small, large = min(args.sizes), max(args.sizes)
        for fmt in args.formats:
            a, b = runs.get(f"{fmt} {small:,}"), runs.get(f"{fmt} {large:,}")
            if a and b:
                ratios[fmt] = round(b["peak_rss_mib"] / a["peak_rss_mib"], 3)
    report["scale"]["rss_ratio_large_to_small"] = ratios


# -------------------------------------------------------------------------------------------- table


def table(report: dict[str, Any]) -> str:
    lines: list[str] = []
    tp = report.get("throughput")
    if tp:
        lines.append(
            f"Throughput: {tp['contacts']:,} contacts, sandbox {tp['rate_limit']} per endpoint, workflows "
            f"{tp['latency']} s, ceiling {tp['ceiling_contacts_per_s']:,.0f} contacts/s"
        )
        head = (
            f"{'run':<26}{'contacts/s':>11}{'ceiling':>9}{'status/wf':>10}{'429s':>7}"
            f"{'CPU ms/chunk':>13}{'peak RSS':>10}{'API s':>8}{'flow s':>8}"
        )
        lines += [head, "-" * len(head)]
        for name, row in tp["runs"].items():
            flow = row.get("flow_seconds")
            lines.append(
                f"{name:<26}{row['contacts_per_s']:>11,.0f}{row['ceiling_ratio']:>9.3f}"
                f"{row['status_calls_per_workflow']:>10.3f}{100 * row['share_429']:>6.2f}%"
                f"{row['cpu_ms_per_chunk']:>13.0f}{row['peak_rss_mib']:>7.0f} MiB{row['api_seconds']:>8.1f}"
                f"{flow if flow is not None else '-':>8}"
            )
        if "speedup_vs_documented_loop" in tp:
            lines.append(f"pipeline / documented loop: {tp['speedup_vs_documented_loop']}×")
        lines.append("")
    wh = report.get("webhooks")
    if wh:
        lines.append(
            f"Webhooks: {wh['contacts']:,} contacts, sandbox {wh['rate_limit']} per endpoint, workflows "
            f"{wh['latency']} s, {100 * wh['drop_rate']:.0f} % of deliveries never sent, ceiling "
            f"{wh['ceiling_contacts_per_s']:,.0f} contacts/s"
        )
        head = (
            f"{'run':<16}{'contacts/s':>11}{'ceiling':>9}{'status/wf':>10}{'delivered':>10}"
            f"{'polled':>8}{'429s':>7}{'API s':>8}{'flow s':>8}{'rows ok':>9}"
        )
        lines += [head, "-" * len(head)]
        for name, row in wh["runs"].items():
            lines.append(
                f"{name:<16}{row['contacts_per_s']:>11,.0f}{row['ceiling_ratio']:>9.3f}"
                f"{row['status_calls_per_workflow']:>10.3f}{row['webhook_deliveries']:>10}"
                f"{row['webhook_fallbacks']:>8}{100 * row['share_429']:>6.2f}%{row['api_seconds']:>8.1f}"
                f"{row['flow_seconds']:>8}{row['all_rows_written'] and row['credits_match']!s:>9}"
            )
        lines.append("")
    sc = report.get("scale")
    if sc:
        lines.append(f"Scale: sandbox {sc['rate_limit']}, workflows {sc['latency']} s")
        head = f"{'source':<18}{'rows':>11}{'written+rejects':>17}{'flow s':>9}{'wall s':>9}{'rows/s':>9}{'peak RSS':>11}"
        lines += [head, "-" * len(head)]
        for name, row in sc["runs"].items():
            lines.append(
                f"{name:<18}{row['rows_in']:>11,}{row['rows_out'] + row['rows_rejected']:>17,}"
                f"{row['flow_seconds']:>9.0f}{row['wall_seconds']:>9.0f}{row['rows_per_s']:>9,.0f}"
                f"{row['peak_rss_mib']:>8.0f} MiB"
            )
        for fmt, ratio in sc.get("rss_ratio_large_to_small", {}).items():
            lines.append(f"peak RSS, largest / smallest size ({fmt}): {ratio}")
        lines.append("")
    env = report["machine"]
    lines.append(
        f"Machine: {env['cpu_model']}, {env['cpus']} CPUs, {env['memory_gib']} GiB; load average before "
        f"{env['load_before']}, after {env['load_after']}; Prefect server startup {env['prefect_startup_s']} s "
        "(not counted)"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["throughput", "scale", "webhooks", "all"])
    parser.add_argument("--contacts", type=int, default=40_000, help="throughput: unique contacts")
    parser.add_argument("--rate-limit", default="20/2", help="throughput: the sandbox's limit per endpoint")
    parser.add_argument("--latency", default="0.5-1.5", help="throughput: workflow duration, seconds")
    parser.add_argument("--time-scale", type=float, default=30.0, help="real seconds per sandbox second")
    parser.add_argument("--initial-poll-seconds", type=float, default=6.0)
    parser.add_argument("--max-concurrent-chunks", type=int, default=8, help="throughput (CLI default 8)")
    parser.add_argument("--scale-concurrent-chunks", type=int, default=24)
    parser.add_argument("--webhooks-latency", default="0.9-1.1", help="webhooks: workflow duration, seconds")
    parser.add_argument(
        "--webhook-drop-rate", type=float, default=0.1, help="webhooks: deliveries never sent"
    )
    parser.add_argument(
        "--scale-cli-defaults",
        action="store_true",
        help="scale: run the CLI with no options and Prefect's temporary server instead of the shared one",
    )
    parser.add_argument(
        "--with-defaults", action="store_true", help="also run the pipeline with CLI defaults"
    )
    parser.add_argument("--repeat", type=int, default=1, help="pipeline runs per variant")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--baseline-contacts", type=int, default=0, help="cap the documented loop (0 = all)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[200_000, 1_000_000])
    parser.add_argument("--formats", nargs="+", default=["csv", "parquet"], choices=["csv", "parquet"])
    parser.add_argument("--scale-rate-limit", default="100000/1")
    parser.add_argument("--scale-latency", default="0.05")
    parser.add_argument("--data-dir", type=Path, default=RESULTS / "data", help="generated sources, reused")
    parser.add_argument(
        "--prefect-api-url",
        help="use this running Prefect API instead of starting a server (its CPU is then not measured)",
    )
    parser.add_argument(
        "--output", type=Path, help="results JSON (default benchmarks/results/<time>-<mode>.json)"
    )
    args = parser.parse_args(argv)

    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    report: dict[str, Any] = {
        "mode": args.mode,
        "started_at": stamp,
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.run", *sys.argv[1:]]),
        "machine": {**machine(), "load_before": [round(x, 2) for x in os.getloadavg()]},
    }
    with tempfile.TemporaryDirectory(prefix="cleanlist-bench-") as tmp:
        workdir = Path(tmp)
        prefect = prefect_for(workdir / "prefect-home", args.prefect_api_url)
        report["machine"]["prefect_startup_s"] = round(prefect.startup_seconds, 1)
        try:
            if args.mode in ("throughput", "all"):
                sandbox = SandboxProcess(rate_limit=args.rate_limit, latency=args.latency, log_dir=workdir)
                try:
                    throughput(args, Stand(prefect, sandbox, workdir), report)
                finally:
                    sandbox.stop()
            if args.mode == "webhooks":
                sandbox = SandboxProcess(
                    rate_limit=args.rate_limit,
                    latency=args.webhooks_latency,
                    log_dir=workdir,
                    extra=["--webhook-drop-rate", str(args.webhook_drop_rate)],
                )
                try:
                    webhooks(args, Stand(prefect, sandbox, workdir), report)
                finally:
                    sandbox.stop()
            if args.mode in ("scale", "all"):
                sandbox = SandboxProcess(
                    rate_limit=args.scale_rate_limit, latency=args.scale_latency, log_dir=workdir
                )
                try:
                    scale(args, Stand(prefect, sandbox, workdir), report)
                finally:
                    sandbox.stop()
        finally:
            prefect.stop()
    report["machine"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
    text = table(report)
    report["table"] = text
    path = args.output or RESULTS / f"{stamp}-{args.mode}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    print()
    print(text)
    print(f"\nresults: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
