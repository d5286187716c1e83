"""`cleanlist-enrich demo`: the shipped sample CRM export, enriched against an in-process sandbox."""

from __future__ import annotations

import os
from pathlib import Path

SAMPLE = Path(__file__).parent / "data" / "sample-crm-export.csv"


def run_demo(*, output_dir: str = "output", as_json: bool = False) -> int:
    from cleanlist.sandbox import SandboxConfig, SandboxServer
    from cleanlist.store.database import make_private_dirs
    from cleanlist_prefect.deployments.local_run import run_enrichment

    out = Path(output_dir).resolve()
    make_private_dirs(out)  # contacts' personal data: owner-only
    config = SandboxConfig(credits=5_000.0, rate_limit=(60, 60.0), latency=(0.5, 1.5))
    with SandboxServer(config) as sandbox:
        os.environ["CLEANLIST_API_KEY"] = sandbox.api_key
        os.environ["CLEANLIST_BASE_URL"] = sandbox.base_url
        if not as_json:
            print(f"sandbox of the Cleanlist API on {sandbox.base_url}; enriching {SAMPLE.name}")
        code = run_enrichment(
            {
                "source": str(SAMPLE),
                "output": str(out / "enriched.csv"),
                "store": f"sqlite:///{out / 'store.db'}",
                # The first status probe goes out at a quarter of this: 1.5 s, when the slowest is done.
                "initial_poll_seconds": 6.0,
                "credit_recheck_seconds": 5.0,
            },
            as_json=as_json,
        )
        if not as_json:
            charged = sandbox.counters().get("credits_charged")
            print(
                f"the sandbox charged {charged} credits; output in {out}/enriched.csv, "
                f"rejects in {out}/enriched.rejects.csv"
            )
        return code
