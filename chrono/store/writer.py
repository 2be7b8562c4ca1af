"""``RunWriter``: writes one rank of one run into the store (DESIGN §3).

Writers buffer columns in memory (``chrono.store.buffers``) and on ``flush()``
write each table's buffer as one part: first to a hidden temporary name in the
same directory, then ``os.replace`` to its final name, so a reader never sees
half a file and a killed writer loses at most the unflushed buffer. One writer
per (run, rank) holds ``.writer-<rank>.lock`` (``chrono.store.locks``); the
kernel drops it when the process dies, so a crashed run can be reopened at once.
Step identity across sessions (no routing key written twice, truncation) is
``chrono.store.ledger``.

Write failures (disk full, permission, directory removed) never raise out of
``flush()`` when ``on_error="count"`` (what probes use): the batch stays
buffered (bounded by ``max_pending_rows``; beyond that the oldest rows are
dropped and counted), the error is counted and logged once per kind, and the
next flush retries. With ``on_error="raise"`` (the default) the error, like a
KeyboardInterrupt in the middle of a write, propagates and the batch stays
buffered too: the next ``flush()`` or ``close()`` writes it.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .. import declared, validate as V
from ..schema import SCHEMA_VERSION, TABLES, conform
from . import ledger, locks
from .buffers import (MODE_CODE, TableBuffer, internal_schema, routing_columns, row_columns,
                      token_columns)
from .catalog import REPLACES_KEY, SCHEMA_VERSION_KEY, TABLE_KEY
from .layout import (MANIFEST, PART_RE, StoreError, is_legacy_run, legacy_run_dir, meta_dir,
                     part_rank, read_manifest, replacing, table_dir, validate_run_id,
                     write_manifest)

log = logging.getLogger("chrono.store")


@dataclass
class WriterStats:
    """Counters a writer keeps; probes and the Prometheus exporter read them."""

    rows_written: dict = field(default_factory=lambda: {t: 0 for t in TABLES})
    parts_written: int = 0
    write_errors: int = 0
    rows_dropped: int = 0
    calls_refused: int = 0   # log_* calls refused by chrono.validate (on_error="count")
    last_error: str | None = None


class RunWriter:
    """Writes one run (one rank of it) into the store. Thread-safe; a context manager.

    Use ``chrono.open_run(root, run_id, model=..., config=...)`` to get one.
    Raises ``StoreError`` for an invalid run id, a run in the pre-hive layout,
    or a (run, rank) another writer holds.
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
        self._buffers = {t: TableBuffer(t, self.run_id) for t in TABLES}
        self._logged_errors: set[str] = set()
        self._closed = False
        if is_legacy_run(self.root, self.run_id):
            raise StoreError(f"run {self.run_id!r} is stored in the pre-hive layout "
                             f"({legacy_run_dir(self.root, self.run_id)}); move it first with "
                             f"'chrono migrate --root {self.root}'")
        self.path = meta_dir(self.root, self.run_id)   # metadata; parts go to table_dir()
        self.path.mkdir(parents=True, exist_ok=True)
        self._writer_lock = self._acquire_lock()
        self._remove_stale_temp_files()
        self._seq = self._next_seq()
        self.manifest = self._write_manifest(model, config)
        self.steps = ledger.StepLedger(self.root, self.run_id, self.rank)

    @property
    def next_step(self) -> int:
        """Where this rank continues: one past the last step stored (``chrono.store.ledger``)."""
        return self.steps.next_step

    # ------------------------------------------------------------------ setup
    def _acquire_lock(self):
        path = locks.lock_path(self.path, self.rank)
        lock = locks.try_lock(path)
        if lock is None:
            raise StoreError(
                f"run {self.run_id!r} (rank {self.rank}) is already being written by another "
                f"writer; use a different run id or stop the other writer")
        locks.write_holder(path)
        return lock

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
            write_manifest(self.path, manifest)
        return manifest

    def _restore_manifest(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_manifest(self.path, self.manifest)
        log.warning("chrono: manifest of run %r was missing (directory deleted?); rewrote it",
                    self.run_id)

    def update_manifest(self, **fields) -> None:
        """Merge ``fields`` into the manifest (rank 0 only writes it)."""
        with self._lock:
            self.manifest.update(fields)
            self.manifest["updated_at"] = time.time()
            if self.rank == 0:
                self._guarded(lambda: write_manifest(self.path, self.manifest))

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
        self.steps.check_floor(table, columns.get("step"))
        t = pa.Table.from_pydict(columns, schema=internal_schema(table))
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
        cols, steps, layers = routing_columns(step, layer, counts, mode, weight_sum,
                                              self.rank if rank is None else rank, dropped, expert_offset)
        with self._lock:   # check, append, then remember: one key can never pass twice
            last = self.steps.routing_order(MODE_CODE[mode], steps, layers)
            self._append("routing", cols)   # refuses steps stored by an earlier session
            self.steps.commit(last)

    def truncate(self, from_step: int) -> dict[str, int]:
        """Remove this rank's rows with ``step >= from_step`` from every table (``chrono.store.ledger``).

        Returns ``{table: rows removed}``; afterwards steps ``>= from_step`` may be written again.
        Raises ``ValueError`` for a negative step.
        """
        if isinstance(from_step, bool) or int(from_step) != from_step or from_step < 0:
            raise ValueError(f"truncate: from_step must be a non-negative integer, got {from_step!r}")
        with self._lock:
            removed = ledger.truncate(self, int(from_step))
            self.steps.truncated(int(from_step))
        return removed

    @V.door(V.check_tokens)
    def log_tokens(self, step, layer, expert, weight=None, batch_idx=None, position=None, k=None,
                   token_id=None, mode: str = "TRAIN", rank: int | None = None) -> None:
        """Append per-token routing facts; every argument is a scalar or an array of one length.

        ``token_id``: None (unknown: NULL), an int array, or a ``pyarrow.Array`` with nulls
        for the unknown ones. Checked first (``chrono.validate``): a bad call raises
        ``InvalidInputError`` (a ValueError) and writes nothing.
        """
        self._append("tokens", token_columns(step, layer, expert, weight, batch_idx, position, k,
                                             token_id, mode, self.rank if rank is None else rank))

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
        if rows:
            self._append(table, row_columns(table, rows, self.rank))

    # ---------------------------------------------------------------- flushing
    def pending_rows(self) -> int:
        """Rows buffered and not yet written."""
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
                try:
                    ok = self._guarded(lambda: self._write_part(name, buf.finalize(t)))
                except BaseException:   # on_error="raise", or Ctrl-C mid-write: rows stay pending
                    self.stats.rows_dropped += buf.put_back(t, self.max_pending_rows)
                    raise
                if ok:
                    written += t.num_rows
                    self.stats.rows_written[name] += t.num_rows
                    self.stats.parts_written += 1
                else:
                    self.stats.rows_dropped += buf.put_back(t, self.max_pending_rows)
        return written

    def table_dir(self, table: str) -> Path:
        """This run's partition of ``table``."""
        return table_dir(self.root, table, self.run_id)

    def _write_part(self, table: str, t: pa.Table, replaces: list[str] | None = None) -> str:
        d = self.table_dir(table)
        d.mkdir(parents=True, exist_ok=True)
        name = f"part-{self.rank:05d}-{self._seq:08d}.parquet"
        meta = {SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode(), TABLE_KEY: table.encode()}
        if replaces:
            meta[REPLACES_KEY] = json.dumps(replaces).encode()
        t = t.replace_schema_metadata(meta)
        with replacing(d / name, d / f".{name}.tmp", self.fsync) as tmp:
            pq.write_table(t, tmp, compression=self.compression)
        self._seq += 1
        return name

    def replace_table(self, table: str, new: pa.Table, only_rank: int | None = None,
                      parts: list[str] | None = None) -> int:
        """Atomically replace the visible contents of ``table`` in this run by ``new``.

        Superseded: the part files named in ``parts`` when given, else every
        part of ``only_rank`` (every part when ``only_rank`` is None).

        The new part names the parts it supersedes in its metadata
        (``chrono.store.catalog``); readers ignore superseded parts from the
        moment the new part appears, so a crash between writing it and deleting
        the old files shows no duplicates. Returns the number of parts superseded.
        """
        with self._lock:
            d = self.table_dir(table)
            if parts is not None:
                # only the named parts (compaction of one rank must not supersede other ranks' parts)
                old = sorted(n for n in parts if PART_RE.match(n))
            else:
                old = [n for n in (sorted(os.listdir(d)) if d.is_dir() else [])
                       if PART_RE.match(n) and (only_rank is None or part_rank(n) == only_rank)]
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
        """Flush, update the manifest and release the writer lock (also when the flush raises).

        A KeyboardInterrupt during the flush finishes the write first, then propagates."""
        if self._closed:
            return
        interrupted = None
        try:
            try:
                self.flush()
            except KeyboardInterrupt as e:   # Ctrl-C mid-write: the rows went back to the buffer;
                interrupted = e              # write them (milliseconds) before the lock goes
                self.flush()
            self.update_manifest()
        finally:
            self._closed = True
            self._writer_lock.release()
        if interrupted is not None:
            raise interrupted

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_run(root, run_id: str, model: dict | None = None, config: dict | None = None,
             **kwargs) -> RunWriter:
    """Open (create or resume) run ``run_id`` under ``root`` for writing (see ``RunWriter``)."""
    return RunWriter(root, run_id, model=model, config=config, **kwargs)
