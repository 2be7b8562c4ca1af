"""Per-part summaries the store source keeps: each immutable part file is read once.

A summary holds what a scrape needs from one part (latest snapshot rows,
alert transitions, newest decisions, tokens per layer, row count), so a
scrape after a new part arrives reads that part only. Rows the write API
would refuse (``chrono.rules``) are left out, with one warning per part.
"""
from __future__ import annotations

import logging
import os

from .state import latest_decisions

log = logging.getLogger("chrono.exporters.prometheus")   # one logger for the whole exporter

_warned_invalid: set[str] = set()


def _valid_rows(table: str, t, path: str):
    """``t`` without rows the write API would refuse (``chrono.rules``); one warning line per part."""
    from ..rules import invalid_mask

    bad, first = invalid_mask(table, t)
    if first is None:
        return t
    if path not in _warned_invalid:
        _warned_invalid.add(path)
        run = os.path.basename(os.path.dirname(path)).removeprefix("run_id=")
        log.warning("chrono exporter: run %r, table %s, %s; %d invalid rows of %s left out",
                    run, table, first, int(bad.sum()), os.path.basename(path))
    import pyarrow as pa

    return t.filter(pa.array(~bad))


def _read_part(path: str, table: str, columns=None):
    import pyarrow.parquet as pq

    from ..schema import conform

    # ParquetFile.read: a single known file, without read_table's dataset discovery (~5x less overhead)
    with pq.ParquetFile(path) as f:
        t = f.read()
    t = _valid_rows(table, conform(table, t), path)
    return t if columns is None else t.select(columns)


def _summarise_snapshots(path: str) -> dict:
    import pyarrow.compute as pc

    t = _read_part(path, "snapshots")
    if not t.num_rows:
        return {"max_step": -1, "latest": [], "mtime": os.stat(path).st_mtime, "rows": 0}
    step = int(pc.max(t["step"]).as_py())
    latest = t.filter(pc.equal(t["step"], step)).to_pylist()
    return {"max_step": step, "latest": latest, "mtime": os.stat(path).st_mtime, "rows": t.num_rows}


def _summarise_alerts(path: str) -> dict:
    t = _read_part(path, "alerts", ["step", "layer", "alert", "transition"])
    rows = zip(t["step"].to_pylist(), t["layer"].to_pylist(), t["alert"].to_pylist(),
               t["transition"].to_pylist())
    return {"transitions": [(int(s), int(l), a, k) for s, l, a, k in rows], "rows": t.num_rows}


def _summarise_decisions(path: str) -> dict:
    t = _read_part(path, "decisions")
    return {"latest": latest_decisions(t.to_pylist()), "rows": t.num_rows}


def _summarise_routing(path: str) -> dict:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as f:
        t = _valid_rows("routing", f.read(columns=["step", "layer", "tokens", "mode"]), path)
    if not t.num_rows:
        return {"tokens": {}, "rows": 0, "min_step": 0, "max_step": -1}
    g = t.group_by("layer").aggregate([("tokens", "sum")])
    tokens = {int(l): int(n or 0) for l, n in zip(g["layer"].to_pylist(), g["tokens_sum"].to_pylist())}
    mm = pc.min_max(t["step"]).as_py()
    return {"tokens": tokens, "rows": t.num_rows, "min_step": int(mm["min"]), "max_step": int(mm["max"])}


def _summarise_count(path: str) -> dict:
    import pyarrow.parquet as pq

    return {"rows": pq.read_metadata(path).num_rows}


SUMMARISE = {"snapshots": _summarise_snapshots, "alerts": _summarise_alerts,
             "decisions": _summarise_decisions, "routing": _summarise_routing,
             "tokens": _summarise_count, "signals": _summarise_count, "lifecycle": _summarise_count}


def window_counts(paths, summaries: dict, snapshot: list[dict]) -> dict[int, list[int]]:
    """Per-expert counts ``{layer: [tokens per expert]}`` of the latest window.

    ``paths``: the run's visible routing parts; ``summaries``: ``{path: routing summary}``
    (parts whose step range misses the window are skipped unread); ``snapshot``: the
    window's per-layer rows (window_start, window_end, layer, n_experts).
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    lo, hi = int(snapshot[0]["window_start"]), int(snapshot[0]["window_end"])
    counts = {int(r["layer"]): [0] * int(r["n_experts"]) for r in snapshot}
    for p in paths:
        s = summaries.get(p)
        if s is not None and (s["max_step"] < lo or s["min_step"] > hi):
            continue
        with pq.ParquetFile(p) as f:
            t = _valid_rows("routing", f.read(columns=["step", "layer", "expert", "tokens"]), p)
        t = t.filter(pc.and_(pc.greater_equal(t["step"], lo), pc.less_equal(t["step"], hi)))
        if not t.num_rows:
            continue
        g = t.group_by(["layer", "expert"]).aggregate([("tokens", "sum")])
        for layer, e, n in zip(g["layer"].to_pylist(), g["expert"].to_pylist(),
                               g["tokens_sum"].to_pylist()):
            c = counts.setdefault(int(layer), [])
            if e >= len(c):
                c.extend([0] * (e + 1 - len(c)))
            c[e] += int(n or 0)
    return counts
