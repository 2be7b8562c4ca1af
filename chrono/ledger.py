"""Step identity of a run across writer sessions: where a rank may continue, and truncation.

A key ``(run, rank, step, mode, layer, expert)`` of the ``routing`` table is
written at most once, across every writer session of a run (attach, detach,
re-attach, a resumed process). The rules, enforced by ``RunWriter``:

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

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .schema import TABLES, conform

DECISIONS_JSONL = "control_decisions.jsonl"


def _rank_parts(root, run: str, table: str, rank: int) -> list[str]:
    from .store import PART_RE, part_files
    return [f for f in part_files(root, table, run)
            if int(PART_RE.match(os.path.basename(f)).group(1)) == rank]


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
        from .store import _atomic_write_bytes
        _atomic_write_bytes(path, ("\n".join(kept) + ("\n" if kept else "")).encode())
