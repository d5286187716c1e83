"""The API's fixed-window rate limit, per organization and endpoint, on a monotonic clock."""

from __future__ import annotations

import math


class FixedWindowLimiter:
    """At most `limit` requests per window; windows are aligned to multiples of `window` seconds.

    Alignment (window k covers [k*window, (k+1)*window)) is what a fixed window means; it also lets a
    test predict exactly when the next window opens. Rejected requests are not counted, so a client
    that waits Retry-After always gets through.
    """

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        # (organization, endpoint) -> (window index, requests counted in it); one entry per pair.
        self._counts: dict[tuple[str, str], tuple[int, int]] = {}

    def admit(self, organization_id: str, endpoint: str, now: float) -> int | None:
        """Count the request and return None, or return Retry-After seconds (>= 1) for a refused one."""
        index = math.floor(now / self.window)
        key = (organization_id, endpoint)
        counted_index, count = self._counts.get(key, (index, 0))
        if counted_index != index:
            count = 0
        if count >= self.limit:
            resets_at = (index + 1) * self.window
            # Rounded up, so a client that waits exactly this long lands in the next window.
            return max(1, math.ceil(resets_at - now))
        self._counts[key] = (index, count + 1)
        return None
