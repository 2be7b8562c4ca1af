"""Step identity of a run across writer sessions: where a rank may continue, and truncation.

A key ``(run, rank, step, mode, layer, expert)`` of the ``routing`` table is
written at most once, across every writer session of a run (attach, detach,
re-attach, a resumed process). The rules, kept by each ``RunWriter``'s
``StepLedger``:

* When a writer opens, ``next_step(root, run, rank)`` is one past the largest
  ``step`` this rank has stored in any table (0 for a new run or rank). Rows
  with a smaller step are refused (``StoreError``), so a second session
  cannot silently append a second copy of steps already stored.
* Within a session, routing steps of one ``(mode, layer)`` strictly increase.
* ``truncate(writer, from_step)`` removes this rank's rows with ``step >=
  from_step`` from every table (what a resume from an earlier checkpoint
  needs: the steps after it are redone). A snapshot row is keyed by its
  window end, so a window that ends at or after ``from_step`` goes with it.
  Parts are rewritten with the store's supersede mechanism, so a crash in
  the middle never shows duplicates or half a table.

Reads only Parquet footers (column statistics) to find the largest step.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..schema import MODES, TABLES, conform
from .catalog import part_files
from .layout import DECISIONS_JSONL, StoreError, atomic_write_bytes, part_rank


class StepLedger:
    """One writer session's step bookkeeping for one (run, rank).

    ``floor``: steps below it were stored by an earlier session and are refused;
    ``next_step``: where this rank may continue (public as ``RunWriter.next_step``).
    """

    def __init__(self, root, run: str, rank: int):
        self.run, self.rank = run, rank
        self.floor = self.next_step = next_step(root, run, rank)
        self._last_routing: dict[tuple[int, int], int] = {}   # (mode code, layer) -> last step

    def check_floor(self, table: str, steps) -> None:
        """Refuse rows whose step this rank stored in an earlier session (``StoreError``)."""
        if steps is None or not len(steps) or self.floor <= 0:
            return
        low = int(np.min(np.asarray(steps, dtype=np.int64)))
        if low < self.floor:
            raise StoreError(
                f"run {self.run!r} rank {self.rank}: {table} rows for step {low} would duplicate "
                f"steps already stored (this rank's steps end at {self.floor - 1}); continue at step "
                f">= {self.floor}, or truncate first (RunWriter.truncate(N), or probes.attach(..., "
                f"start_step=N, overwrite=True))")

    def routing_order(self, mode: int, steps: np.ndarray, layers: np.ndarray) -> dict:
        """Routing steps of one (mode, layer) strictly increase across calls (no key twice).

        Raises ``StoreError``; returns the ``{(mode, layer): last step}`` this call
        would leave, for ``commit`` once its rows are appended.
        """
        if not len(steps):
            return {}
        order = np.lexsort((steps, layers))
        s, l = steps[order], layers[order]
        same = l[1:] == l[:-1]
        if np.any(same & (s[1:] <= s[:-1])):
            i = int(np.flatnonzero(same & (s[1:] <= s[:-1]))[0])
            raise StoreError(f"run {self.run!r}: routing for step {int(s[i])} layer {int(l[i])} "
                             f"given twice in one call")
        firsts = np.flatnonzero(np.r_[True, ~same])
        lasts = np.r_[firsts[1:] - 1, len(l) - 1]
        for i in firsts:
            prev = self._last_routing.get((mode, int(l[i])))
            if prev is not None and s[i] <= prev:
                raise StoreError(
                    f"run {self.run!r} rank {self.rank}: routing for step {int(s[i])} layer "
                    f"{int(l[i])} mode {MODES[mode]} comes after step {prev} was written; steps of "
                    f"one (mode, layer) must increase (each key is written once)")
        return {(mode, int(l[i])): int(s[j]) for i, j in zip(firsts, lasts)}

    def commit(self, last: dict) -> None:
        """Remember what ``routing_order`` returned, once the call's rows were appended."""
        self._last_routing.update(last)

    def truncated(self, from_step: int) -> None:
        """Steps ``>= from_step`` were removed: they may be written again."""
        self.floor = min(self.floor, from_step)
        self.next_step = self.floor
        self._last_routing = {k: min(v, from_step - 1) for k, v in self._last_routing.items()}


def _rank_parts(root, run: str, table: str, rank: int) -> list[str]:
    return [f for f in part_files(root, table, run) if part_rank(f) == rank]


def _part_max_step(path: str) -> int | None:
    """Largest ``step`` in one part from its footer statistics (reads the column if they are missing)."""
    md = pq.ParquetFile(path).metadata
    names = [md.schema.column(i).name for i in range(md.num_columns)]
    if "step" not in names or md.num_rows == 0:
        return None
    j = names.index("step")
    stats = [md.row_group(g).column(j).statistics for g in range(md.num_row_groups)]
    if all(st is not None and st.has_min_max for st in stats):
        return int(max(st.max for st in stats))
    import pyarrow.compute as pc   # ~0.1 s to import; only footers without statistics need it

    v = pc.max(pq.read_table(path, columns=["step"])["step"]).as_py()
    return None if v is None else int(v)


def _reaches(path: str, step: int) -> bool:
    """Whether the part holds a row with ``step`` or later (a part of step 0 only holds step 0)."""
    top = _part_max_step(path)
    return top is not None and top >= step


def next_step(root, run: str, rank: int) -> int:
    """One past the largest step rank ``rank`` of ``run`` stored in any table; 0 if none."""
    best = -1
    for table in TABLES:
        for f in _rank_parts(root, run, table, rank):
            try:
                v = _part_max_step(f)
            except (OSError, pa.ArrowInvalid):
                continue
            if v is not None and v > best:
                best = v
    return best + 1


def truncate(writer, from_step: int) -> dict[str, int]:
    """Remove ``writer``'s rank's rows with ``step >= from_step`` from every table of its run.

    Returns ``{table: rows removed}``. Pending (unflushed) rows of the writer
    are flushed first so they are truncated too. Rank 0 also filters the
    ``control_decisions.jsonl`` mirror.
    """
    import pyarrow.compute as pc

    from_step = int(from_step)
    writer.flush()
    removed: dict[str, int] = {}
    for table in TABLES:
        files = _rank_parts(writer.root, writer.run_id, table, writer.rank)
        hit = [f for f in files if _reaches(f, from_step)]
        if not hit:
            continue
        data = pa.concat_tables([conform(table, pq.read_table(f)) for f in hit])
        keep = data.filter(pc.less(data["step"], from_step))
        removed[table] = data.num_rows - keep.num_rows
        writer.replace_table(table, keep, parts=[os.path.basename(f) for f in hit])
    if writer.rank == 0:
        _truncate_jsonl(writer.path / DECISIONS_JSONL, from_step)
    return removed


def _truncate_jsonl(path, from_step: int) -> None:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return
    kept = []
    for line in lines:
        try:
            if int(json.loads(line).get("step", -1)) >= from_step:
                continue
        except (ValueError, AttributeError, TypeError):
            pass
        kept.append(line)
    if len(kept) != len(lines):
        atomic_write_bytes(path, ("\n".join(kept) + ("\n" if kept else "")).encode())
