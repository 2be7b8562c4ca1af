"""The Parquet store: hive-style tables partitioned by run, plus one metadata directory per run.

Layout (DESIGN §3, §8)::

    <root>/runs/run_id=<run_id>/manifest.json                  # + locks, control_decisions.jsonl
    <root>/<table>/run_id=<run_id>/part-<rank>-<seq>.parquet

One concept per module:

- ``layout``: names and directories, run ids, manifests, the list of runs (no pyarrow);
- ``locks``: the one-writer-per-(run, rank) lock (``filelock``);
- ``buffers`` and ``writer``: ``RunWriter``, which buffers rows and writes parts atomically;
- ``ledger``: step identity across writer sessions (no key twice, truncation);
- ``catalog``: which part files make up a table (readable, not superseded);
- ``footers``: the same verdicts on parts read by DuckDB in one pass (no pyarrow), for one-shot readers;
- ``maintenance``: ``compact`` and ``delete_run``.

Every name other code imports is re-exported here. ``import chrono.store`` loads
only ``layout`` and ``catalog`` (standard library); the writer and maintenance
modules (pyarrow, numpy) load on first use of one of their names.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .catalog import REPLACES_KEY, part_columns, part_files
from .layout import (DECISIONS_JSONL, DEFAULT_ROOT, MANIFEST, PART_RE, PARTITION_KEY, RUN_ID_RE,
                     RUNS_DIR, StoreError, atomic_write_bytes, default_root,
                     is_legacy_run, legacy_run_dir, list_runs, meta_dir, part_rank, read_manifest,
                     require_run, store_note, run_dir, run_manifest, run_meta_dir, table_dir,
                     table_dirs, validate_run_id, write_manifest)

if TYPE_CHECKING:
    from .maintenance import compact, delete_run
    from .writer import RunWriter, WriterStats, open_run

_LAZY = {"RunWriter": "writer", "WriterStats": "writer", "open_run": "writer",
         "compact": "maintenance", "delete_run": "maintenance"}

__all__ = [
    "DECISIONS_JSONL", "DEFAULT_ROOT", "MANIFEST", "PART_RE", "PARTITION_KEY", "REPLACES_KEY",
    "RUN_ID_RE", "RUNS_DIR", "StoreError", "atomic_write_bytes", "default_root", "is_legacy_run",
    "legacy_run_dir", "list_runs", "meta_dir", "store_note", "part_columns", "part_files", "part_rank",
    "read_manifest", "require_run", "run_dir", "run_manifest", "run_meta_dir",
    "table_dir", "table_dirs", "validate_run_id", "write_manifest", *_LAZY,
]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
