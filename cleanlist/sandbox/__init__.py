"""A local, deterministic imitation of the Cleanlist Public API (v1) for tests, demos and benchmarks."""

from cleanlist.sandbox.app import create_app
from cleanlist.sandbox.config import (
    DEFAULT_SANDBOX_KEY,
    ENDPOINTS,
    ENRICHMENT_TYPES,
    Endpoint,
    EnrichmentType,
    FaultSpec,
    SandboxConfig,
)
from cleanlist.sandbox.server import SandboxServer
from cleanlist.sandbox.state import SandboxState

__all__ = [
    "DEFAULT_SANDBOX_KEY",
    "ENDPOINTS",
    "ENRICHMENT_TYPES",
    "Endpoint",
    "EnrichmentType",
    "FaultSpec",
    "SandboxConfig",
    "SandboxServer",
    "SandboxState",
    "create_app",
]
