"""Every tunable number of the client in one place (delays in seconds)."""

from __future__ import annotations

DEFAULT_BASE_URL = "https://api.cleanlist.ai"
API_PREFIX = "/api/v1/public"
DEFAULT_RATE_LIMIT = "60/60"

CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
WRITE_TIMEOUT = 30.0
POOL_TIMEOUT = 30.0

MAX_CONTACTS_PER_REQUEST = 250

# Retry-After values above this are treated as "no hint"; a server asking for an hour is broken or
# hostile, and the task's own backoff is the better guide then.
RETRY_AFTER_CAP = 300.0
INITIAL_RETRY_DELAY = 1.0
MAX_RETRY_DELAY = 60.0

# The client-side limiter spaces requests over a window slightly longer than the server's: a request's
# arrival lags its send by a little network and scheduling jitter, and a fixed-window server counts
# arrivals. 2 % of the window (capped at 1 s) absorbs that at a 2 % throughput cost.
RATE_WINDOW_MARGIN_FRACTION = 0.02
RATE_WINDOW_MARGIN_CAP = 1.0
