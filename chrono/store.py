"""The Parquet store: hive-style tables partitioned by run, plus one metadata directory per run.

Layout (DESIGN §3, §8)::

    <root>/runs/run_id=<run_id>/manifest.json                  # + locks, control_decisions.jsonl
    <root>/<table>/run_id=<run_id>/part-<rank>-<seq>.parquet

Each table is a plain hive-partitioned Parquet dataset (``<root>/routing`` is
what Spark, Trino, DuckDB or Polars are pointed at; ``run_id`` is the
partition key and also a column inside every file). Stores written before
this layout (``<root>/<run_id>/<table>/...``, "legacy") stay readable;
``chrono migrate`` moves them, writers refuse them.

Writers buffer columns in memory and on ``flush()`` write each table's buffer
as one part: first to a hidden temporary name in the same directory, then
``os.replace`` to its final name, so a reader never sees half a file and a
killed writer loses at most the unflushed buffer. One writer per (run, rank)
holds an ``flock`` on ``.writer-<rank>.lock``; the kernel drops it when the
process dies, so a crashed run can be reopened at once.

Write failures (disk full, permission, directory removed) never raise out of
``flush()`` when ``on_error="count"`` (what probes use): the batch stays
buffered (bounded by ``max_pending_rows``; beyond that the oldest rows are
dropped and counted), the error is counted and logged once per kind, and the
next flush retries.
"""
from __future__ import annotations

import errno
import fcntl
import functools
import json
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import declared, ledger, validate as V
from .schema import COLUMN_DEFAULTS, MODES, SCHEMA_VERSION, TABLES, conform, table_schema

log = logging.getLogger("chrono.store")

# \A...\Z, not ^...$: "$" also matches before a trailing newline, which let "run\n" through.
RUN_ID_RE = re.compile(r"\A[A-Za-z0-9._-]{1,128}\Z")
PART_RE = re.compile(r"\Apart-(\d+)-(\d+)\.parquet\Z")
MANIFEST = "manifest.json"
REPLACES_KEY = b"chrono.replaces"
DEFAULT_ROOT = "chrono_runs"


class StoreError(Exception):
    """A user-facing store problem (bad run id, unknown run, run locked...)."""


def default_root() -> Path:
    return Path(os.environ.get("CHRONO_ROOT") or DEFAULT_ROOT)


def validate_run_id(run_id: str) -> str:
    """Return ``run_id`` if it matches ``[A-Za-z0-9._-]{1,128}`` and is no path trick."""
    if not isinstance(run_id, str) or not RUN_ID_RE.match(run_id) or run_id in (".", ".."):
        raise StoreError(
            f"invalid run id {run_id!r}: use 1-128 characters from A-Z a-z 0-9 . _ - (not '.' or '..')")
    return run_id


RUNS_DIR = "runs"
PARTITION_KEY = "run_id"


def run_dir(root, run_id: str) -> Path:
    """The run's metadata directory: manifest, writer locks, ``control_decisions.jsonl``."""
    return Path(root) / RUNS_DIR / f"{PARTITION_KEY}={validate_run_id(run_id)}"


def table_dir(root, table: str, run_id: str) -> Path:
    """The run's partition of ``table``: where its part files live."""
    return Path(root) / table / f"{PARTITION_KEY}={validate_run_id(run_id)}"


def legacy_run_dir(root, run_id: str) -> Path:
    """Where the pre-hive layout kept a run (``<root>/<run_id>/``, tables inside)."""
    return Path(root) / validate_run_id(run_id)


def is_legacy_run(root, run_id: str) -> bool:
    """True when ``run_id`` still lives (wholly or partly) in the pre-hive layout."""
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
    for d in (run_dir(root, run_id), legacy_run_dir(root, run_id)):
        if (d / MANIFEST).is_file():
            return d
    return None


def run_manifest(root, run_id: str) -> dict:
    """The run's manifest (current layout or legacy); ``{}`` when it has none (or it vanished)."""
    d = run_meta_dir(root, run_id)
    return (read_manifest(d) or {}) if d is not None else {}


def table_dirs(root, table: str, run_id: str) -> list[Path]:
    """Directories that may hold the run's parts of ``table``: its partition, then the legacy one."""
    return [table_dir(root, table, run_id), legacy_run_dir(root, run_id) / table]


def run_stamps(root, run_id: str, tables=TABLES) -> tuple:
    """Modification times of the run's manifest and table directories (None where missing).

    A new part is a rename into its table directory, which moves that
    directory's mtime: live readers (dashboard, exporter) compare stamps to
    notice new data with a few ``stat`` calls and no listing.
    """
    paths = [run_dir(root, run_id) / MANIFEST] + [table_dir(root, t, run_id) for t in tables]
    legacy = legacy_run_dir(root, run_id)
    if legacy.is_dir():   # a store from before the hive layout (or a half-finished migrate)
        paths += [legacy / MANIFEST] + [legacy / t for t in tables]
    out = []
    for p in paths:
        try:
            out.append(os.stat(p).st_mtime_ns)
        except OSError:
            out.append(None)
    return tuple(out)


def delete_run(root, run_id: str) -> None:
    """Remove a run everywhere (manifest first, so it disappears from listings at once)."""
    import shutil

    for d in [run_dir(root, run_id)] + [p for t in TABLES for p in table_dirs(root, t, run_id)]:
        shutil.rmtree(d, ignore_errors=True)
    legacy = legacy_run_dir(root, run_id)
    if (legacy / MANIFEST).is_file():
        # a legacy run may be named like a table ("routing") or "runs": keep other runs' partitions
        for entry in os.scandir(legacy):
            if not entry.name.startswith(f"{PARTITION_KEY}="):
                shutil.rmtree(entry.path, ignore_errors=True) if entry.is_dir(follow_symlinks=False) \
                    else os.unlink(entry.path)
        try:
            legacy.rmdir()
        except OSError:
            pass


def _atomic_write_bytes(path: Path, data: bytes, fsync: bool = False) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def read_manifest(path: Path) -> dict | None:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


@dataclass
class WriterStats:
    """Counters a writer keeps; probes and the Prometheus exporter read them."""

    rows_written: dict = field(default_factory=lambda: {t: 0 for t in TABLES})
    parts_written: int = 0
    write_errors: int = 0
    rows_dropped: int = 0
    calls_refused: int = 0   # log_* calls refused by chrono.validate (on_error="count")
    last_error: str | None = None


class _Buffer:
    """Chunks of one table in the writer's internal layout, finalised on ``take``.

    Internally a chunk has no ``run_id`` column and stores ``mode`` as an
    int8 code: both are constant or tiny-cardinality, and building string
    columns per call would cost more than everything else. ``take`` adds
    them back once per part, in C.
    """

    def __init__(self, table: str, run_id: str):
        self.table = table
        self.run_id = run_id
        self.chunks: list[pa.Table] = []
        self.rows = 0

    def add(self, t: pa.Table) -> None:
        if t.num_rows:
            self.chunks.append(t)
            self.rows += t.num_rows

    def take(self) -> pa.Table | None:
        if not self.rows:
            return None
        t = pa.concat_tables(self.chunks) if len(self.chunks) > 1 else self.chunks[0]
        self.chunks, self.rows = [], 0
        return t

    def finalize(self, t: pa.Table) -> pa.Table:
        """Internal chunk layout -> the table's public schema."""
        schema = table_schema(self.table)
        cols = []
        for f in schema:
            if f.name == "run_id":
                cols.append(_const_str(self.run_id, t.num_rows))
            elif f.name == "mode":
                codes = t.column("mode").combine_chunks()
                cols.append(pa.DictionaryArray.from_arrays(codes, _mode_dict()).cast(pa.string()))
            else:
                cols.append(t.column(f.name))
        return pa.Table.from_arrays(cols, schema=schema)


@functools.cache
def _mode_dict() -> pa.Array:  # built on first use: pa.array imports pandas (CLI start-up, issue 17)
    return pa.array(list(MODES))


_MODE_CODE = {m: i for i, m in enumerate(MODES)}


def _internal_schema(table: str) -> pa.Schema:
    out = []
    for f in table_schema(table):
        if f.name == "run_id":
            continue
        out.append(pa.field("mode", pa.int8(), nullable=False) if f.name == "mode" else f)
    return pa.schema(out)


_INTERNAL = {t: _internal_schema(t) for t in TABLES}


class RunWriter:
    """Writes one run (one rank of it) into the store. Thread-safe; a context manager.

    Use ``chrono.open_run(root, run_id, model=..., config=...)`` to get one.
    """

    def __init__(self, root, run_id: str, model: dict | None = None, config: dict | None = None,
                 rank: int = 0, world_size: int = 1, on_error: str = "raise",
                 max_pending_rows: int = 5_000_000, auto_flush_rows: int = 2_000_000,
                 compression: str = "snappy", fsync: bool = False):
        if on_error not in ("raise", "count"):
            raise ValueError("on_error must be 'raise' or 'count'")
        self.root = Path(root)
        self.run_id = validate_run_id(run_id)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.on_error = on_error
        self.max_pending_rows = max_pending_rows
        self.auto_flush_rows = auto_flush_rows
        self.compression = compression
        self.fsync = fsync
        self.stats = WriterStats()
        self._lock = threading.RLock()
        self._buffers = {t: _Buffer(t, self.run_id) for t in TABLES}
        self._logged_errors: set[str] = set()
        self._closed = False
        if is_legacy_run(self.root, self.run_id):
            raise StoreError(f"run {self.run_id!r} is stored in the pre-hive layout "
                             f"({legacy_run_dir(self.root, self.run_id)}); move it first with "
                             f"'chrono migrate --root {self.root}'")
        self.path = run_dir(self.root, self.run_id)   # metadata; parts go to table_dir()
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_file = self._acquire_lock()
        self._remove_stale_temp_files()
        self._seq = self._next_seq()
        self.manifest = self._write_manifest(model, config)
        # step identity across sessions (chrono.ledger): rows below the floor are already stored
        self.next_step = ledger.next_step(self.root, self.run_id, self.rank)
        self._floor = self.next_step
        self._last_routing: dict[tuple[int, int], int] = {}   # (mode code, layer) -> last step

    # ------------------------------------------------------------------ setup
    def _acquire_lock(self):
        lock_path = self.path / f".writer-{self.rank}.lock"
        f = open(lock_path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.close()
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise StoreError(
                    f"run {self.run_id!r} (rank {self.rank}) is already being written by another "
                    f"writer; use a different run id or stop the other writer") from None
            raise
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}@{socket.gethostname()}\n")
        f.flush()
        return f

    def _remove_stale_temp_files(self) -> None:
        """Delete temporary part files this rank left behind when it was killed mid-write.

        Safe: we hold this rank's lock, so no live writer owns them. Readers
        never read them anyway (they do not match ``PART_RE``).
        """
        prefix = f".part-{self.rank:05d}-"
        for t in TABLES:
            d = self.table_dir(t)
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for name in names:
                if name.startswith(prefix) and name.endswith(".parquet.tmp"):
                    try:
                        os.unlink(d / name)
                    except OSError:
                        pass

    def _next_seq(self) -> int:
        seq = 0
        for t in TABLES:
            d = self.table_dir(t)
            if not d.is_dir():
                continue
            for name in os.listdir(d):
                m = PART_RE.match(name)
                if m and int(m.group(1)) == self.rank:
                    seq = max(seq, int(m.group(2)) + 1)
        return seq

    def _write_manifest(self, model, config) -> dict:
        old = read_manifest(self.path) or {}
        now = time.time()
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "run_id": self.run_id,
            "created_at": old.get("created_at", now),
            "updated_at": now,
            "model": (declared.merge_declarations(old.get("model"), model) if model is not None
                      else old.get("model")),
            "config": config if config is not None else old.get("config"),
            "host": socket.gethostname(),
            "world_size": self.world_size,
        }
        if self.rank == 0:
            _atomic_write_bytes(self.path / MANIFEST,
                                json.dumps(manifest, indent=2, default=_json_default).encode())
        return manifest

    def _restore_manifest(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(self.path / MANIFEST,
                            json.dumps(self.manifest, indent=2, default=_json_default).encode())
        log.warning("chrono: manifest of run %r was missing (directory deleted?); rewrote it",
                    self.run_id)

    def update_manifest(self, **fields) -> None:
        """Merge ``fields`` into the manifest (rank 0 only writes it)."""
        with self._lock:
            self.manifest.update(fields)
            self.manifest["updated_at"] = time.time()
            if self.rank == 0:
                self._guarded(lambda: _atomic_write_bytes(
                    self.path / MANIFEST, json.dumps(self.manifest, indent=2,
                                                     default=_json_default).encode()))

    def declare_experts(self, layer: int, n_experts: int) -> None:
        """Declare that ``layer`` now has ``n_experts`` experts (lifecycle growth / shrinkage).

        Updates the manifest's ``model.experts_per_layer`` (and ``layers``); every
        count ever declared stays valid for that layer's rows (``declared_experts``).
        Raises ``InvalidInputError`` (a ValueError) for a negative layer or n < 1.
        """
        with self._lock:
            model = declared.declare(self.manifest.get("model"), layer, n_experts)
            if model is not None:
                self.update_manifest(model=model)

    # ---------------------------------------------------------------- logging
    def _append(self, table: str, columns: dict) -> None:
        if self._closed:
            raise StoreError(f"run {self.run_id!r}: writer is closed")
        self._check_floor(table, columns.get("step"))
        t = pa.Table.from_pydict(columns, schema=_INTERNAL[table])
        with self._lock:
            self._buffers[table].add(t)
            pending = sum(b.rows for b in self._buffers.values())
        if pending >= self.auto_flush_rows:
            self.flush()

    @V.door(V.check_routing)
    def log_routing(self, step, layer, counts, mode: str = "TRAIN", weight_sum=None,
                    rank: int | None = None, dropped=None, expert_offset=None) -> None:
        """Append aggregated routing counts.

        ``counts``: ``[..., n_experts]`` tokens dispatched per expert; ``step`` and
        ``layer`` broadcast against ``counts.shape[:-1]`` (so a whole flush
        interval ``[steps, layers, experts]`` is one call). ``weight_sum`` and
        ``dropped`` have the shape of ``counts``. ``expert_offset`` (broadcast like
        ``layer``) is added to the expert ids: a rank holding experts
        ``[offset, offset + n)`` of an expert-parallel layer logs global ids.
        Checked first (``chrono.validate``): a bad call raises ``InvalidInputError``
        (a ValueError naming argument, run, step and layer) and writes nothing.
        """
        c = np.asarray(counts)
        if c.ndim == 0:
            raise ValueError("counts must have a trailing expert dimension")
        lead, n = c.shape[:-1], c.shape[-1]
        _check_mode(mode)
        try:
            step_a = np.broadcast_to(np.asarray(step, dtype=np.int64), lead)
            layer_a = np.broadcast_to(np.asarray(layer, dtype=np.int32), lead)
            offset_a = np.broadcast_to(np.asarray(0 if expert_offset is None else expert_offset, dtype=np.int32), lead)
        except ValueError:
            raise ValueError(f"step {np.shape(step)}, layer {np.shape(layer)} and expert_offset "
                             f"{np.shape(expert_offset)} must broadcast to counts' leading shape "
                             f"{lead}") from None
        rows = int(np.prod(lead, dtype=np.int64)) * n
        cols = {
            "step": np.repeat(step_a.reshape(-1), n),
            "mode": np.full(rows, _MODE_CODE[mode], dtype=np.int8),
            "layer": np.repeat(layer_a.reshape(-1), n),
            "expert": (np.tile(np.arange(n, dtype=np.int32), rows // n if n else 0)
                       + np.repeat(offset_a.reshape(-1), n)),
            "tokens": c.reshape(-1).astype(np.int64),
            "weight_sum": (None if weight_sum is None
                           else np.asarray(weight_sum, dtype=np.float32).reshape(-1)),
            "dropped": (np.zeros(rows, dtype=np.int64) if dropped is None
                        else np.asarray(dropped, dtype=np.int64).reshape(-1)),
            "rank": np.full(rows, self.rank if rank is None else rank, dtype=np.int32),
        }
        if cols["weight_sum"] is None:
            cols["weight_sum"] = pa.nulls(rows, pa.float32())
        with self._lock:   # check, append, then remember: one key can never pass twice
            last = self._routing_order(_MODE_CODE[mode], step_a.reshape(-1), layer_a.reshape(-1))
            self._append("routing", cols)   # refuses steps stored by an earlier session
            self._last_routing.update(last)

    def _check_floor(self, table: str, steps) -> None:
        """Refuse rows whose step this rank stored in an earlier session (``chrono.ledger``)."""
        if steps is None or not len(steps) or self._floor <= 0:
            return
        low = int(np.min(np.asarray(steps, dtype=np.int64)))
        if low < self._floor:
            raise StoreError(
                f"run {self.run_id!r} rank {self.rank}: {table} rows for step {low} would duplicate "
                f"steps already stored (this rank's steps end at {self._floor - 1}); continue at step "
                f">= {self._floor}, or truncate first (RunWriter.truncate(N), or probes.attach(..., "
                f"start_step=N, overwrite=True))")

    def _routing_order(self, mode: int, steps: np.ndarray, layers: np.ndarray) -> dict:
        """Routing steps of one (mode, layer) strictly increase across calls (no key twice).

        Raises ``StoreError``; returns the ``{(mode, layer): last step}`` this call would leave.
        """
        if not len(steps):
            return {}
        order = np.lexsort((steps, layers))
        s, l = steps[order], layers[order]
        same = l[1:] == l[:-1]
        if np.any(same & (s[1:] <= s[:-1])):
            i = int(np.flatnonzero(same & (s[1:] <= s[:-1]))[0])
            raise StoreError(f"run {self.run_id!r}: routing for step {int(s[i])} layer {int(l[i])} "
                             f"given twice in one call")
        firsts = np.flatnonzero(np.r_[True, ~same])
        lasts = np.r_[firsts[1:] - 1, len(l) - 1]
        for i in firsts:
            prev = self._last_routing.get((mode, int(l[i])))
            if prev is not None and s[i] <= prev:
                raise StoreError(
                    f"run {self.run_id!r} rank {self.rank}: routing for step {int(s[i])} layer "
                    f"{int(l[i])} mode {MODES[mode]} comes after step {prev} was written; steps of "
                    f"one (mode, layer) must increase (each key is written once)")
        return {(mode, int(l[i])): int(s[j]) for i, j in zip(firsts, lasts)}

    def truncate(self, from_step: int) -> dict[str, int]:
        """Remove this rank's rows with ``step >= from_step`` from every table (see chrono.ledger).

        Returns ``{table: rows removed}``; afterwards steps ``>= from_step`` may be written again.
        Raises ``ValueError`` for a negative step.
        """
        if isinstance(from_step, bool) or int(from_step) != from_step or from_step < 0:
            raise ValueError(f"truncate: from_step must be a non-negative integer, got {from_step!r}")
        with self._lock:
            removed = ledger.truncate(self, int(from_step))
            self._floor = min(self._floor, int(from_step))
            self.next_step = self._floor
            self._last_routing = {k: min(v, int(from_step) - 1) for k, v in self._last_routing.items()}
        return removed

    @V.door(V.check_tokens)
    def log_tokens(self, step, layer, expert, weight=None, batch_idx=None, position=None, k=None,
                   token_id=None, mode: str = "TRAIN", rank: int | None = None) -> None:
        """Append per-token routing facts; every argument is a scalar or an array of one length.

        ``token_id``: None (unknown: NULL), an int array, or a ``pyarrow.Array`` with nulls
        for the unknown ones. Checked first (``chrono.validate``): a bad call raises
        ``InvalidInputError`` (a ValueError) and writes nothing.
        """
        expert_a = np.asarray(expert, dtype=np.int32).reshape(-1)
        rows = expert_a.shape[0]
        _check_mode(mode)

        def col(v, dtype, default=0):
            if v is None:
                return np.full(rows, default, dtype=dtype)
            return np.broadcast_to(np.asarray(v, dtype=dtype).reshape(-1) if np.ndim(v) else
                                   np.asarray(v, dtype=dtype), (rows,))

        cols = {
            "step": col(step, np.int64),
            "mode": np.full(rows, _MODE_CODE[mode], dtype=np.int8),
            "layer": col(layer, np.int32),
            "batch_idx": col(batch_idx, np.int32),
            "position": col(position, np.int32),
            "k": col(k, np.int16),
            "expert": expert_a,
            "weight": pa.nulls(rows, pa.float32()) if weight is None else col(weight, np.float32),
            # a pyarrow array may carry nulls: unknown token ids are NULL, never a sentinel
            "token_id": (pa.nulls(rows, pa.int64()) if token_id is None
                         else token_id.cast(pa.int64()) if isinstance(token_id, pa.Array)
                         else col(token_id, np.int64)),
            "rank": np.full(rows, self.rank if rank is None else rank, dtype=np.int32),
        }
        self._append("tokens", cols)

    @V.door(V.check_signal)
    def log_signal(self, step: int, name: str, value, layer: int | None = None,
                   rank: int | None = None) -> None:
        """Append one scalar signal (loss, accuracy, a model-specific state probe).

        ``value`` is finite (NaN/Inf only for loss-like names, ``chrono.rules``) or None;
        a bad call raises ``InvalidInputError`` (a ValueError) and writes nothing.
        """
        if not isinstance(name, str) or not name:
            raise ValueError("signal name must be a non-empty string")
        self._append("signals", {
            "step": [int(step)], "name": [name],
            "layer": [None if layer is None else int(layer)],
            "value": [None if value is None else float(value)],
            "rank": [self.rank if rank is None else int(rank)],
        })

    @V.door(V.check_rows)
    def log_rows(self, table: str, rows: list[dict]) -> None:
        """Append whole rows (dicts) to ``table``; ``run_id`` is filled in.

        Every row is checked (``chrono.validate``); one bad row refuses the whole call
        with ``InvalidInputError`` (a ValueError) and nothing is written.
        """
        if not rows:
            return
        schema = _INTERNAL[table]
        cols = {f.name: [r.get(f.name) for r in rows] for f in schema}
        if "mode" in cols:
            cols["mode"] = [_MODE_CODE[m or "TRAIN"] for m in cols["mode"]]
        if "rank" in cols:
            cols["rank"] = [self.rank if v is None else v for v in cols["rank"]]
        self._append(table, cols)

    # ---------------------------------------------------------------- flushing
    def pending_rows(self) -> int:
        with self._lock:
            return sum(b.rows for b in self._buffers.values())

    def flush(self) -> int:
        """Write every buffered table as one part each. Returns rows written."""
        written = 0
        with self._lock:
            if self.rank == 0 and any(b.rows for b in self._buffers.values()) \
                    and not (self.path / MANIFEST).is_file():
                # the run directory was deleted (or emptied) under us: without a manifest
                # readers would not list the run, so the parts written next would be invisible
                self._guarded(self._restore_manifest)
            for name, buf in self._buffers.items():
                t = buf.take()
                if t is None:
                    continue
                ok = self._guarded(lambda: self._write_part(name, buf.finalize(t)))
                if ok:
                    written += t.num_rows
                    self.stats.rows_written[name] += t.num_rows
                    self.stats.parts_written += 1
                else:
                    self._keep_pending(buf, t)
        return written

    def _keep_pending(self, buf: _Buffer, t: pa.Table) -> None:
        buf.chunks.insert(0, t)
        buf.rows += t.num_rows
        excess = buf.rows - self.max_pending_rows
        if excess > 0:
            whole = buf.take()
            self.stats.rows_dropped += excess
            buf.add(whole.slice(excess))

    def table_dir(self, table: str) -> Path:
        """This run's partition of ``table``."""
        return table_dir(self.root, table, self.run_id)

    def _write_part(self, table: str, t: pa.Table, replaces: list[str] | None = None) -> str:
        d = self.table_dir(table)
        d.mkdir(parents=True, exist_ok=True)
        name = f"part-{self.rank:05d}-{self._seq:08d}.parquet"
        final = d / name
        tmp = d / f".{name}.tmp"
        meta = {b"chrono.schema_version": str(SCHEMA_VERSION).encode(), b"chrono.table": table.encode()}
        if replaces:
            meta[REPLACES_KEY] = json.dumps(replaces).encode()
        t = t.replace_schema_metadata(meta)
        try:
            pq.write_table(t, tmp, compression=self.compression)
            if self.fsync:
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.replace(tmp, final)
        except BaseException:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise
        self._seq += 1
        return name

    def replace_table(self, table: str, new: pa.Table, only_rank: int | None = None,
                      parts: list[str] | None = None) -> int:
        """Atomically replace the visible contents of ``table`` in this run by ``new``.

        Superseded: the part files named in ``parts`` when given, else every
        part of ``only_rank`` (every part when ``only_rank`` is None).

        The new part names the parts it supersedes in its metadata; readers
        ignore superseded parts from the moment the new part appears, so a
        crash between writing it and deleting the old files shows no
        duplicates. Returns the number of parts superseded.
        """
        with self._lock:
            d = self.table_dir(table)
            if parts is not None:
                # only the named parts (compaction of one rank must not supersede other ranks' parts)
                old = sorted(n for n in parts if PART_RE.match(n))
            else:
                old = [n for n in (sorted(os.listdir(d)) if d.is_dir() else [])
                       if PART_RE.match(n) and (only_rank is None or int(PART_RE.match(n).group(1)) == only_rank)]
            new = conform(table, new)
            self._write_part(table, new, replaces=old)
            for n in old:
                try:
                    os.unlink(d / n)
                except FileNotFoundError:
                    pass
            return len(old)

    def _guarded(self, fn) -> bool:
        if self.on_error == "raise":
            fn()
            return True
        try:
            fn()
            return True
        except Exception as e:  # a telemetry fault must never reach the training loop
            self.stats.write_errors += 1
            self.stats.last_error = f"{type(e).__name__}: {e}"
            kind = f"{type(e).__name__}:{getattr(e, 'errno', '')}"
            if kind not in self._logged_errors:
                self._logged_errors.add(kind)
                log.error("chrono: telemetry write failed for run %r (%s); training continues, "
                          "rows stay buffered and are retried", self.run_id, self.stats.last_error)
            return False

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush()
            self.update_manifest()
        finally:
            self._closed = True
            try:
                fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            finally:
                self._lock_file.close()

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _const_str(value: str, rows: int) -> pa.Array:
    """A string column holding one value, built in C (no Python list of ``rows`` items)."""
    idx = pa.array(np.zeros(rows, dtype=np.int32))
    return pa.DictionaryArray.from_arrays(idx, pa.array([value])).cast(pa.string())


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def open_run(root, run_id: str, model: dict | None = None, config: dict | None = None,
             **kwargs) -> RunWriter:
    """Open (create or resume) run ``run_id`` under ``root`` for writing."""
    return RunWriter(root, run_id, model=model, config=config, **kwargs)


# ====================================================================== reading
_part_cache: dict[tuple, tuple[bool, tuple[str, ...], frozenset]] = {}
_warned: set[str] = set()


def _part_info(path: str, table: str) -> tuple[bool, tuple[str, ...], frozenset]:
    """(readable, names of parts it supersedes, its column names) for one part file of ``table``.

    Readable means the Parquet footer parses and the file's columns fit the
    table (see ``_schema_problem``): a truncated, foreign or mis-filed file is
    skipped with one warning instead of failing every query over the table.
    Cached by (path, size, mtime) so repeated connects cost one ``stat`` per part.
    """
    try:
        st = os.stat(path)
    except OSError:
        return False, (), frozenset()
    key = (path, table, st.st_size, st.st_mtime_ns)
    info = _part_cache.get(key)
    if info is None:
        try:
            md = pq.read_metadata(path)
            kv = md.metadata or {}
            problem = _schema_problem(table, md.schema.to_arrow_schema(), kv)
            if problem:
                raise ValueError(problem)
            replaces = tuple(json.loads(kv[REPLACES_KEY])) if REPLACES_KEY in kv else ()
            if not all(isinstance(n, str) for n in replaces):
                raise ValueError("malformed chrono.replaces metadata")
            info = (True, replaces, frozenset(md.schema.names))
        except Exception as e:
            info = (False, (), frozenset())
            if path not in _warned:
                _warned.add(path)
                log.warning("chrono: skipping unreadable part file %s (%s: %s)", path,
                            type(e).__name__, str(e)[:200])
        if len(_part_cache) > 200_000:
            _part_cache.clear()
        _part_cache[key] = info
    return info


_STRINGS = (pa.string(), pa.large_string(), pa.string_view())


def _schema_problem(table: str, schema: pa.Schema, kv: dict) -> str | None:
    """Why a part file with this Arrow schema cannot be read as ``table`` (None if it can).

    Every current column must be present with its exact type (any string
    flavour for strings), or absent and have a default (older schema
    versions); a part labelled as another table is refused. Exact types keep
    the readers' CASTs infallible, so one foreign file cannot break a query.
    """
    labelled = kv.get(b"chrono.table")
    if labelled is not None and labelled != table.encode():
        return f"part of table {labelled.decode(errors='replace')!r}, not {table!r}"
    defaults = COLUMN_DEFAULTS.get(table, {})
    for f in table_schema(table):
        idx = schema.get_field_index(f.name)
        if idx < 0:
            if f.name not in defaults:
                return f"column {f.name!r} missing"
            continue
        t = schema.field(idx).type
        if pa.types.is_dictionary(t):
            t = t.value_type
        ok = t in _STRINGS if f.type in _STRINGS else t == f.type
        if not ok:
            return f"column {f.name!r} is {t}, expected {f.type}"
    return None


def list_runs(root) -> list[str]:
    """Run ids with a manifest under ``root`` (current layout and legacy)."""
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


def part_files(root, table: str, run: str | None = None) -> list[str]:
    """Readable part files of ``table`` (one run or all), temporary and superseded parts excluded.

    A run's parts are read from its partition and, if any are left there, from
    the legacy location (a store written before the hive layout, or one whose
    ``chrono migrate`` was interrupted): a part is in exactly one place, since
    migration moves files with ``os.replace``.
    """
    table_schema(table)
    runs = [validate_run_id(run)] if run is not None else list_runs(root)
    out = []
    for r in runs:
        good, superseded = [], set()
        for d in table_dirs(root, table, r):
            try:
                names = sorted(n for n in os.listdir(d) if PART_RE.match(n))
            except OSError:
                continue
            for name in names:
                ok, replaces, _ = _part_info(str(d / name), table)
                if ok:
                    good.append((name, d))
                    superseded.update(replaces)
        out.extend(str(d / n) for n, d in good if n not in superseded)
    return out


def part_columns(files: list[str], table: str) -> set[str]:
    """Union of the column names of these (readable) part files of ``table``."""
    cols: set[str] = set()
    for f in files:
        cols |= _part_info(f, table)[2]
    return cols


def compact(root, run: str, tables=None) -> dict[str, int]:
    """Merge each table's parts (per rank) into one part. Returns parts merged per table.

    Takes the run's writer lock for each rank it touches, so it refuses to run
    while that rank is being written.
    """
    path = require_run(root, run)
    merged: dict[str, int] = {}
    ranks = sorted({int(PART_RE.match(os.path.basename(f)).group(1))
                    for t in TABLES for f in part_files(root, t, run)})
    # keep the run's world size in the manifest (RunWriter would write its default, 1)
    world_size = (read_manifest(path) or {}).get("world_size") or 1
    for rank in ranks:
        with RunWriter(root, run, rank=rank, world_size=world_size) as w:
            for table in (tables or TABLES):
                files = [f for f in part_files(root, table, run)
                         if int(PART_RE.match(os.path.basename(f)).group(1)) == rank]
                if len(files) < 2:
                    continue
                data = pa.concat_tables([conform(table, pq.read_table(f)) for f in files])
                w.replace_table(table, data, parts=[os.path.basename(f) for f in files])
                merged[table] = merged.get(table, 0) + len(files)
    return merged


def require_run(root, run: str) -> Path:
    """The run's metadata directory (see ``run_meta_dir``); a StoreError naming known runs if none."""
    p = run_meta_dir(root, validate_run_id(run))
    if p is None:
        known = list_runs(root)
        hint = f"; runs under {root}: {', '.join(known[:10])}" if known else f"; no runs under {root}"
        raise StoreError(f"unknown run {run!r}{hint}")
    return p
