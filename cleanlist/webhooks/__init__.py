"""The webhook receiver: results pushed by the API on completion, written to the store for runs to pick up.

`payload.py` is the `enrichment.completed` body; `delivery.py` judges and records one delivery (no
network, store writes only); `app.py` is the FastAPI app; `server.py` serves it in a thread (a run's own
receiver) or in the foreground (`cleanlist-enrich receiver`). No Prefect here: the flow emits events.
"""

from cleanlist.webhooks.delivery import DeliveryOutcome, apply_delivery, hook_url, new_token, register_run
from cleanlist.webhooks.payload import WebhookPayload

__all__ = ["DeliveryOutcome", "WebhookPayload", "apply_delivery", "hook_url", "new_token", "register_run"]
