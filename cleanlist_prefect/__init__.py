"""Cleanlist for your own Prefect flows: `from cleanlist_prefect import enrich_dataframe`.

`enrich_dataframe(frame, enrichment_type=...)` is a Prefect flow: call it inside your flow (it runs as a
subflow) or on its own. It returns an `EnrichedFrame` (`.output`, `.rejects`, `.summary`).
"""

from cleanlist.run.summary import RunSummary
from cleanlist_prefect.flows.enrich_frame import EnrichedFrame, enrich_dataframe

__all__ = ["EnrichedFrame", "RunSummary", "enrich_dataframe"]
