"""Injected failures: which status, if any, the next request to an endpoint is answered with."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from cleanlist.sandbox.config import Endpoint, FaultSpec


@dataclass(frozen=True, slots=True)
class InjectedFault:
    """A status to answer instead of doing the work, and the Retry-After to send with a 429."""

    status: int
    retry_after: int | str | None


class FaultInjector:
    """Scripted sequences first, then a seeded random share, independently per endpoint."""

    def __init__(self, faults: Mapping[Endpoint, FaultSpec], seed: int) -> None:
        self._seed = seed
        self._specs: dict[Endpoint, FaultSpec] = {}
        self._pending: dict[Endpoint, deque[int]] = {}
        self._rngs: dict[Endpoint, random.Random] = {}
        self.replace(faults)

    def replace(self, faults: Mapping[Endpoint, FaultSpec]) -> None:
        """Install a new fault set; sequences and random streams start over."""
        self._specs = dict(faults)
        self._pending = {endpoint: deque(spec.sequence) for endpoint, spec in self._specs.items()}
        # One stream per endpoint (string seeds hash stably), so traffic on one endpoint does not
        # change which requests fail on another.
        self._rngs = {endpoint: random.Random(f"{self._seed}:{endpoint}") for endpoint in self._specs}

    def specs(self) -> dict[Endpoint, FaultSpec]:
        """The installed fault set."""
        return dict(self._specs)

    def draw(self, endpoint: Endpoint) -> InjectedFault | None:
        """Decide the fate of one request that has passed auth and the rate limit."""
        spec = self._specs.get(endpoint)
        if spec is None:
            return None
        pending = self._pending[endpoint]
        if pending:
            return InjectedFault(pending.popleft(), spec.retry_after)
        if spec.rate > 0 and self._rngs[endpoint].random() < spec.rate:
            return InjectedFault(spec.status, spec.retry_after)
        return None
