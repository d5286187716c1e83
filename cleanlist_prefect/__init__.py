"""Cleanlist for your own Prefect flows: `from cleanlist_prefect import enrich_dataframe`.

`enrich_dataframe(frame, enrichment_type=...)` is a Prefect flow: call it inside your flow (it runs as a
subflow) or on its own. It returns an `EnrichedFrame` (`.output`, `.rejects`, `.summary`).

The flows, tasks and deployments live in `cleanlist_prefect.flows`, `cleanlist_prefect.tasks` and
`cleanlist_prefect.deployments`. `import cleanlist_prefect` imports nothing else (no Prefect, no pandas):
the names below load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cleanlist.run.summary import RunSummary
    from cleanlist_prefect.flows.enrich_frame import EnrichedFrame, enrich_dataframe

__all__ = ["EnrichedFrame", "RunSummary", "enrich_dataframe"]

_LAZY = {
    "EnrichedFrame": "cleanlist_prefect.flows.enrich_frame",
    "enrich_dataframe": "cleanlist_prefect.flows.enrich_frame",
    "RunSummary": "cleanlist.run.summary",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
