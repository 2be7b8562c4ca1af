"""chrono: routing telemetry and governance for Mixture-of-Experts models.

The core (schema, metrics, snapshots, store, reader, controller policy)
imports no torch; ``chrono.lens`` and anything touching tensors is loaded
lazily on first attribute access.
"""
from __future__ import annotations

from . import metrics, schema
from .reader import QueryError, connect, read, refresh
from .rules import InvalidInputError, InvalidRowsError
from .schema import SCHEMA_VERSION
from .store import RunWriter, StoreError, open_run, validate_run_id

__version__ = "0.1.0"

__all__ = [
    "open_run", "connect", "read", "refresh", "metrics", "schema", "RunWriter",
    "StoreError", "QueryError", "InvalidInputError", "InvalidRowsError", "SCHEMA_VERSION",
    "validate_run_id",
]


def __getattr__(name):
    # Submodules that import torch (lens, govern) or are heavy load on first use.
    import importlib

    if name in ("lens", "controller", "snapshots", "lifecycle", "exporters"):
        return importlib.import_module(f".{name}", __name__)
    if name == "govern":
        return importlib.import_module(".governance", __name__).govern
    raise AttributeError(f"module 'chrono' has no attribute {name!r}")
