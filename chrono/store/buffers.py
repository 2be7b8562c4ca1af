"""A writer's pending rows: one ``TableBuffer`` per table, in an internal column layout.

Internally a chunk has no ``run_id`` column and stores ``mode`` as an int8
code (``MODE_CODE``): both are constant or tiny-cardinality, and building
string columns per ``log_*`` call would cost more than everything else.
``TableBuffer.finalize`` adds them back once per part, in C. The column
builders turn one ``log_routing`` / ``log_tokens`` call (arrays, already
checked by ``chrono.validate``) into such a chunk without Python loops.
"""
from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa

from ..schema import MODES, table_schema

MODE_CODE = {m: i for i, m in enumerate(MODES)}


@functools.cache
def internal_schema(table: str) -> pa.Schema:
    """``table``'s schema without ``run_id`` and with ``mode`` as an int8 code."""
    out = []
    for f in table_schema(table):
        if f.name == "run_id":
            continue
        out.append(pa.field("mode", pa.int8(), nullable=False) if f.name == "mode" else f)
    return pa.schema(out)


@functools.cache
def _mode_names() -> pa.Array:
    return pa.array(list(MODES), pa.string())   # built on first use: pa.array of a list imports pandas


class TableBuffer:
    """Pending chunks of one table; not thread-safe (the writer holds its lock around every call)."""

    def __init__(self, table: str, run_id: str):
        self.table = table
        self.run_id = run_id
        self.chunks: list[pa.Table] = []
        self.rows = 0

    def add(self, t: pa.Table) -> None:
        """Append a chunk in the internal layout."""
        if t.num_rows:
            self.chunks.append(t)
            self.rows += t.num_rows

    def take(self) -> pa.Table | None:
        """Remove and return every pending row as one table (None when empty)."""
        if not self.rows:
            return None
        t = pa.concat_tables(self.chunks) if len(self.chunks) > 1 else self.chunks[0]
        self.chunks, self.rows = [], 0
        return t

    def put_back(self, t: pa.Table, max_rows: int) -> int:
        """Return ``t`` (what ``take`` gave, not written) to the front, keeping at most ``max_rows``
        pending rows: the oldest beyond that are dropped. Returns the number of rows dropped."""
        self.chunks.insert(0, t)
        self.rows += t.num_rows
        excess = self.rows - max_rows
        if excess <= 0:
            return 0
        whole = self.take()
        self.add(whole.slice(excess))
        return excess

    def finalize(self, t: pa.Table) -> pa.Table:
        """Internal chunk layout -> the table's public schema."""
        schema = table_schema(self.table)
        cols = []
        for f in schema:
            if f.name == "run_id":
                cols.append(const_str(self.run_id, t.num_rows))
            elif f.name == "mode":
                codes = t.column("mode").combine_chunks()
                cols.append(pa.DictionaryArray.from_arrays(codes, _mode_names()).cast(pa.string()))
            else:
                cols.append(t.column(f.name))
        return pa.Table.from_arrays(cols, schema=schema)


def const_str(value: str, rows: int) -> pa.Array:
    """A string column holding one value, built in C (no Python list of ``rows`` items)."""
    idx = pa.array(np.zeros(rows, dtype=np.int32))
    return pa.DictionaryArray.from_arrays(idx, pa.array([value], pa.string())).cast(pa.string())


def check_mode(mode: str) -> None:
    """Raise ``ValueError`` unless ``mode`` is one of ``chrono.schema.MODES``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def routing_columns(step, layer, counts, mode: str, weight_sum, rank: int, dropped,
                    expert_offset) -> tuple[dict, np.ndarray, np.ndarray]:
    """Internal-layout columns of one ``log_routing`` call, plus its (step, layer) per leading row.

    ``counts`` ``[..., n_experts]``; ``step``, ``layer`` and ``expert_offset`` broadcast
    against ``counts.shape[:-1]``; ``weight_sum`` and ``dropped`` have the shape of
    ``counts`` (or are None). Raises ``ValueError`` when the shapes do not fit.
    """
    c = np.asarray(counts)
    if c.ndim == 0:
        raise ValueError("counts must have a trailing expert dimension")
    lead, n = c.shape[:-1], c.shape[-1]
    check_mode(mode)
    try:
        step_a = np.broadcast_to(np.asarray(step, dtype=np.int64), lead)
        layer_a = np.broadcast_to(np.asarray(layer, dtype=np.int32), lead)
        offset_a = np.broadcast_to(np.asarray(0 if expert_offset is None else expert_offset,
                                              dtype=np.int32), lead)
    except ValueError:
        raise ValueError(f"step {np.shape(step)}, layer {np.shape(layer)} and expert_offset "
                         f"{np.shape(expert_offset)} must broadcast to counts' leading shape "
                         f"{lead}") from None
    rows = int(np.prod(lead, dtype=np.int64)) * n
    cols = {
        "step": np.repeat(step_a.reshape(-1), n),
        "mode": np.full(rows, MODE_CODE[mode], dtype=np.int8),
        "layer": np.repeat(layer_a.reshape(-1), n),
        "expert": (np.tile(np.arange(n, dtype=np.int32), rows // n if n else 0)
                   + np.repeat(offset_a.reshape(-1), n)),
        "tokens": c.reshape(-1).astype(np.int64),
        "weight_sum": (pa.nulls(rows, pa.float32()) if weight_sum is None
                       else np.asarray(weight_sum, dtype=np.float32).reshape(-1)),
        "dropped": (np.zeros(rows, dtype=np.int64) if dropped is None
                    else np.asarray(dropped, dtype=np.int64).reshape(-1)),
        "rank": np.full(rows, rank, dtype=np.int32),
    }
    return cols, step_a.reshape(-1), layer_a.reshape(-1)


def token_columns(step, layer, expert, weight, batch_idx, position, k, token_id, mode: str,
                  rank: int) -> dict:
    """Internal-layout columns of one ``log_tokens`` call: every argument a scalar or an array
    as long as ``expert``; ``token_id`` None (NULL), ints, or a ``pyarrow.Array`` with nulls."""
    expert_a = np.asarray(expert, dtype=np.int32).reshape(-1)
    rows = expert_a.shape[0]
    check_mode(mode)

    def col(v, dtype, default=0):
        if v is None:
            return np.full(rows, default, dtype=dtype)
        return np.broadcast_to(np.asarray(v, dtype=dtype).reshape(-1) if np.ndim(v) else
                               np.asarray(v, dtype=dtype), (rows,))

    return {
        "step": col(step, np.int64),
        "mode": np.full(rows, MODE_CODE[mode], dtype=np.int8),
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
        "rank": np.full(rows, rank, dtype=np.int32),
    }


def row_columns(table: str, rows: list[dict], rank: int) -> dict:
    """Internal-layout columns of whole rows (dicts) for ``log_rows``; a missing ``mode`` is TRAIN,
    a missing ``rank`` the writer's."""
    cols = {f.name: [r.get(f.name) for r in rows] for f in internal_schema(table)}
    if "mode" in cols:
        cols["mode"] = [MODE_CODE[m or "TRAIN"] for m in cols["mode"]]
    if "rank" in cols:
        cols["rank"] = [rank if v is None else v for v in cols["rank"]]
    return cols
