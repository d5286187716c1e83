"""A local, deterministic imitation of the Cleanlist Public API (v1) for tests, demos and benchmarks.

The names below are loaded when first used: `cleanlist-enrich` registers the `sandbox` subcommand's
options (cleanlist/sandbox/cli.py, which reads only `config`) on every start, and commands that serve
nothing (`report`, `limits`) should not pay for FastAPI, uvicorn and httpx.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

# Each exported name and the module that defines it.
_WHERE = {
    "create_app": "app",
    "DEFAULT_SANDBOX_KEY": "config",
    "ENDPOINTS": "config",
    "ENRICHMENT_TYPES": "config",
    "Endpoint": "config",
    "EnrichmentType": "config",
    "FaultSpec": "config",
    "SandboxConfig": "config",
    "SandboxServer": "server",
    "SandboxState": "state",
}

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


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
