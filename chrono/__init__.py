"""chrono: routing telemetry and governance for Mixture-of-Experts models.

``import chrono`` is cheap: every public name (``open_run``, ``connect``,
``read``, ``metrics``, ``lens``, ``govern``, ...) is loaded on first attribute
access, so a command that needs none of pyarrow, DuckDB or torch pays for none
of them. The core (schema, metrics, snapshots, store, reader, controller
policy) imports no torch; ``chrono.lens`` and anything touching tensors does.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> (submodule, attribute or None for the submodule itself)
_LAZY: dict[str, tuple[str, str | None]] = {
    "open_run": ("store", "open_run"),
    "RunWriter": ("store", "RunWriter"),
    "StoreError": ("store", "StoreError"),
    "validate_run_id": ("store", "validate_run_id"),
    "connect": ("reader", "connect"),
    "read": ("reader", "read"),
    "refresh": ("reader", "refresh"),
    "QueryError": ("reader", "QueryError"),
    "InvalidInputError": ("rules", "InvalidInputError"),
    "InvalidRowsError": ("rules", "InvalidRowsError"),
    "SCHEMA_VERSION": ("schema", "SCHEMA_VERSION"),
    "govern": ("governance", "govern"),
    **{m: (m, None) for m in ("metrics", "schema", "lens", "controller", "snapshots", "lifecycle",
                              "exporters")},
}

__all__ = [
    "open_run", "connect", "read", "refresh", "metrics", "schema", "RunWriter",
    "StoreError", "QueryError", "InvalidInputError", "InvalidRowsError", "SCHEMA_VERSION",
    "validate_run_id",
]


def __getattr__(name: str):
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'chrono' has no attribute {name!r}") from None
    mod = importlib.import_module(f".{module}", __name__)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value   # later accesses skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
