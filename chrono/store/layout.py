"""Where a run lives in the store: names, directories, manifests and the list of runs (DESIGN §3).

Layout::

    <root>/runs/run_id=<run_id>/              # the run's metadata directory (meta_dir)
        manifest.json                        #   written by rank 0's RunWriter
        .writer-<rank>.lock                  #   one writer per (run, rank), chrono.store.locks
        control_decisions.jsonl              #   the controller's decisions, ChronoMoE format
    <root>/<table>/run_id=<run_id>/part-<rank>-<seq>.parquet   # the run's partition of a table

Each table is a plain hive-partitioned Parquet dataset (``<root>/routing`` is
what Spark, Trino, DuckDB or Polars are pointed at; ``run_id`` is the
partition key and also a column inside every file). Stores written before
this layout (``<root>/<run_id>/<table>/...``, "legacy") stay readable;
``chrono migrate`` moves them, writers refuse them.

Imports neither pyarrow nor numpy: finding and listing runs costs a few
``stat`` calls and a JSON read per run.
"""
from __future__ import annotations

import contextlib
import json
import os
import itertools
import re
import sys
import threading
from pathlib import Path

# \A...\Z, not ^...$: "$" also matches before a trailing newline, which let "run\n" through.
RUN_ID_RE = re.compile(r"\A[A-Za-z0-9._-]{1,128}\Z")
PART_RE = re.compile(r"\Apart-(\d+)-(\d+)\.parquet\Z")
MANIFEST = "manifest.json"
DECISIONS_JSONL = "control_decisions.jsonl"
DEFAULT_ROOT = "chrono_runs"
RUNS_DIR = "runs"
PARTITION_KEY = "run_id"


class StoreError(Exception):
    """A user-facing store problem (bad run id, unknown run, run locked...)."""


def default_root() -> Path:
    """``$CHRONO_ROOT`` when set, else ``./chrono_runs``."""
    return Path(os.environ.get("CHRONO_ROOT") or DEFAULT_ROOT)


def validate_run_id(run_id: str) -> str:
    """Return ``run_id`` if it matches ``[A-Za-z0-9._-]{1,128}`` and is no path trick.

    Raises ``StoreError`` (one line naming the rule) otherwise.
    """
    if not isinstance(run_id, str) or not RUN_ID_RE.match(run_id) or run_id in (".", ".."):
        raise StoreError(
            f"invalid run id {run_id!r}: use 1-128 characters from A-Z a-z 0-9 . _ - (not '.' or '..')")
    return run_id


def meta_dir(root, run_id: str) -> Path:
    """The run's metadata directory in the current layout (it may not exist yet).

    Holds the manifest, the writer locks and ``control_decisions.jsonl``; parts
    live in ``table_dir``. ``run_meta_dir`` finds where an existing run's manifest is.
    """
    return Path(root) / RUNS_DIR / f"{PARTITION_KEY}={validate_run_id(run_id)}"


run_dir = meta_dir   # the former name (it never was the whole run: parts live in table_dir)


def table_dir(root, table: str, run_id: str) -> Path:
    """The run's partition of ``table``: where its part files live."""
    return Path(root) / table / f"{PARTITION_KEY}={validate_run_id(run_id)}"


def legacy_run_dir(root, run_id: str) -> Path:
    """Where the pre-hive layout kept a run (``<root>/<run_id>/``, tables inside)."""
    return Path(root) / validate_run_id(run_id)


def table_dirs(root, table: str, run_id: str) -> list[Path]:
    """Directories that may hold the run's parts of ``table``: its partition, then the legacy one."""
    return [table_dir(root, table, run_id), legacy_run_dir(root, run_id) / table]


def part_rank(path) -> int:
    """The writer rank in a part file's name (``part-<rank>-<seq>.parquet``)."""
    return int(PART_RE.match(os.path.basename(path)).group(1))


def is_legacy_run(root, run_id: str) -> bool:
    """True when ``run_id`` still lives (wholly or partly) in the pre-hive layout."""
    from ..schema import TABLES

    legacy = legacy_run_dir(root, run_id)
    if (legacy / MANIFEST).is_file():
        return True
    return any(_has_parts(legacy / t) for t in TABLES)


def _has_parts(d: Path) -> bool:
    try:
        return any(PART_RE.match(n) for n in os.listdir(d))
    except OSError:
        return False


def run_meta_dir(root, run_id: str) -> Path | None:
    """The directory holding the run's manifest (current layout first), or None if unknown."""
    for d in (meta_dir(root, run_id), legacy_run_dir(root, run_id)):
        if (d / MANIFEST).is_file():
            return d
    return None


def require_run(root, run: str) -> Path:
    """The run's metadata directory (see ``run_meta_dir``); a StoreError naming known runs if none."""
    p = run_meta_dir(root, validate_run_id(run))
    if p is None:
        known = list_runs(root)
        hint = f"; runs under {root}: {', '.join(known[:10])}" if known else f"; no runs under {root}"
        raise StoreError(f"unknown run {run!r}{hint}")
    return p


def list_runs(root) -> list[str]:
    """Run ids with a manifest under ``root`` (current layout and legacy), sorted."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = set()
    prefix = f"{PARTITION_KEY}="
    try:
        for p in (root / RUNS_DIR).iterdir():
            rid = p.name[len(prefix):]
            if p.name.startswith(prefix) and RUN_ID_RE.match(rid) and (p / MANIFEST).is_file():
                runs.add(rid)
    except OSError:
        pass
    runs.update(p.name for p in root.iterdir()
                if p.is_dir() and RUN_ID_RE.match(p.name) and (p / MANIFEST).is_file())
    return sorted(runs)


def store_note(root) -> str | None:
    """Why a reader of ``root`` finds no run, in one line, when that looks like a mistake:
    the directory does not exist, or holds no store but has stores inside it (the parent of
    the store was passed), or is some other non-empty directory. None for a store (even one
    without runs) and for an empty directory (a store a writer has not filled yet)."""
    root = Path(root)
    if not root.exists():
        return f"no chrono store at {root}: the directory does not exist"
    if not root.is_dir():
        return f"no chrono store at {root}: not a directory"
    if (root / RUNS_DIR).is_dir() or list_runs(root):
        return None
    try:
        entries = sorted(itertools.islice(root.iterdir(), 1000))
    except OSError:
        return None
    inside = [str(p) for p in entries if p.is_dir() and list_runs(p)]
    if inside:
        return (f"no runs under {root}; it holds the store{'s' if len(inside) > 1 else ''} "
                f"{', '.join(inside[:5])} (pass that as the root)")
    if entries:
        return f"no runs under {root}: not a chrono store (no {RUNS_DIR}/ directory)"
    return None


# ---------------------------------------------------------------- manifest files
def read_manifest(path: Path) -> dict | None:
    """The manifest in metadata directory ``path``; None when it is missing or not JSON."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def run_manifest(root, run_id: str) -> dict:
    """The run's manifest (current layout or legacy); ``{}`` when it has none (or it vanished)."""
    d = run_meta_dir(root, run_id)
    return (read_manifest(d) or {}) if d is not None else {}


def write_manifest(path: Path, manifest: dict) -> None:
    """Write ``manifest`` into metadata directory ``path`` atomically (numpy scalars, arrays and
    paths become JSON numbers, lists and strings; anything else its repr)."""
    atomic_write_bytes(Path(path) / MANIFEST, json.dumps(manifest, indent=2, default=_json_default).encode())


def _json_default(o):
    np = sys.modules.get("numpy")   # a numpy value in a manifest means numpy is loaded already
    if np is not None and isinstance(o, np.integer):
        return int(o)
    if np is not None and isinstance(o, np.floating):
        return float(o)
    if np is not None and isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return repr(o)


@contextlib.contextmanager
def replacing(path: Path, tmp: Path, fsync: bool = False):
    """Write ``tmp`` inside the block; then (``fsync`` and) ``os.replace`` it onto ``path``.

    On any error ``tmp`` is removed and the error propagates, so ``path`` holds
    the old content or the new, never a mix. ``tmp`` must be in ``path``'s directory.
    """
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def atomic_write_bytes(path: Path, data: bytes, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (``replacing``); raises ``OSError``."""
    with replacing(path, path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"),
                   fsync) as tmp:
        tmp.write_bytes(data)


