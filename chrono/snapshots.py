"""Snapshots (routing counts -> health metrics per window) and the alert state machine.

A snapshot summarises one layer over a window of K steps ``[w*K, w*K+K-1]``;
its ``step`` is the window end. The global row (layer -1) covers all layers:
token_count, n_experts, dead and nearly_dead are sums; the other metrics are
the mean over layers that had traffic in the window (an all-idle window gets
the zero-traffic values). Alerts are per layer only.

Alert rules (DESIGN §4), per layer, over consecutive snapshots of that layer:

* PRE_COLLAPSE: Neff < 0.6·n or Top2 > 0.75, raised when it has held for 3
  consecutive snapshots.
* COLLAPSE_CONFIRMED: dead ≥ 1 and Top2 > 0.85, raised at 5 consecutive.
* A counter resets when its condition is false; an active alert is then
  ``cleared``. A window with no traffic for a layer (or a layer missing from
  a window) is idle: no alert, counters reset (ChronoMoE let counters span
  such gaps; we do not, see DESIGN §4).
* A layer with fewer than ``MIN_EXPERTS_TO_ALERT`` (2) experts never alerts:
  with one expert Top2 = 1.0 and Neff = 1 by definition, yet nothing can be
  imbalanced (a Bio-MoE layer before its first growth). Its counters reset
  and an active alert is cleared, as for a healthy window.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa

from . import metrics as M
from .schema import ALERTS, GLOBAL_LAYER, SNAPSHOTS

PRE_NEFF_FRACTION = 0.6
PRE_TOP2 = 0.75
PRE_PERSIST = 3
CONFIRMED_TOP2 = 0.85
CONFIRMED_PERSIST = 5
MIN_EXPERTS_TO_ALERT = 2  # fewer experts than this: routing cannot be imbalanced, no alert


def _pre_collapse(row: dict) -> bool:
    """Neff < 0.6 n or Top2 > 0.75 (DESIGN §4, ChronoMoE)."""
    return row["neff"] < PRE_NEFF_FRACTION * row["n_experts"] or row["top2_share"] > PRE_TOP2


def _collapse_confirmed(row: dict) -> bool:
    """dead >= 1 and Top2 > 0.85 (DESIGN §4, ChronoMoE)."""
    return row["dead"] >= 1 and row["top2_share"] > CONFIRMED_TOP2


@dataclass(frozen=True)
class AlertRule:
    name: str
    persist: int
    condition: Callable[[dict], bool]

    def holds(self, row: dict) -> bool:
        """Whether the rule's condition holds for one snapshot row (never when n < 2)."""
        return row["n_experts"] >= MIN_EXPERTS_TO_ALERT and self.condition(row)


RULES = (AlertRule("PRE_COLLAPSE", PRE_PERSIST, _pre_collapse),
         AlertRule("COLLAPSE_CONFIRMED", CONFIRMED_PERSIST, _collapse_confirmed))

# Each rule in words, from the constants above (what pages and help texts print).
RULE_TEXT = {
    "PRE_COLLAPSE": f"Neff < {PRE_NEFF_FRACTION:g}·n or Top-2 > {PRE_TOP2:g} "
                    f"for {PRE_PERSIST} consecutive snapshots",
    "COLLAPSE_CONFIRMED": f"≥ 1 dead expert and Top-2 > {CONFIRMED_TOP2:g} "
                          f"for {CONFIRMED_PERSIST} consecutive snapshots",
}


def window_bounds(step: int, every: int) -> tuple[int, int]:
    """Window ``[start, end]`` of K=every steps containing ``step``."""
    if every < 1:
        raise ValueError(f"window length `every` must be >= 1 step, got {every!r}")
    start = (step // every) * every
    return start, start + every - 1


def layer_rows(run_id: str, start: int, end: int, layer_counts: dict[int, np.ndarray],
               layer_dropped: dict[int, np.ndarray] | None = None) -> list[dict]:
    """Snapshot rows (per layer, then the global row) for one window.

    Layers with the same expert count are summarised in one batched ``metrics.summarize``
    call (61 layers of DeepSeek-V3: one call, not 61); the values are those of one call per
    layer (tested)."""
    layers = sorted(layer_counts)
    counts = {layer: np.asarray(layer_counts[layer]) for layer in layers}
    by_width: dict[int, list] = {}
    for layer in layers:
        by_width.setdefault(counts[layer].shape[-1], []).append(layer)
    metrics = {}
    for group in by_width.values():
        c = np.stack([counts[layer] for layer in group])
        d = None
        if layer_dropped is not None and any(layer_dropped.get(layer) is not None for layer in group):
            d = np.stack([np.zeros_like(counts[layer]) if layer_dropped.get(layer) is None
                          else np.asarray(layer_dropped[layer]) for layer in group])
        m = M.summarize(c, d)
        for j, layer in enumerate(group):
            metrics[layer] = _pick(m, j)
    rows = [_row(run_id, start, end, layer, metrics[layer]) for layer in layers]
    if rows:
        rows.append(_global_row(run_id, start, end, rows))
    return rows


def _row(run_id, start, end, layer, m: M.LayerMetrics) -> dict:
    return {
        "run_id": run_id, "step": end, "window_start": start, "window_end": end,
        "layer": int(layer), "n_experts": m.n_experts, "token_count": int(m.token_count),
        "entropy": float(m.entropy), "neff": float(m.neff), "top2_share": float(m.top2_share),
        "dead": int(m.dead), "nearly_dead": int(m.nearly_dead), "cv": float(m.cv),
        "max_violation": float(m.max_violation), "gini": float(m.gini), "jain": float(m.jain),
        "drop_fraction": float(m.drop_fraction),
    }


_MEAN_FIELDS = ("entropy", "neff", "top2_share", "cv", "max_violation", "gini", "jain", "drop_fraction")


def _global_row(run_id, start, end, rows: list[dict]) -> dict:
    active = [r for r in rows if r["token_count"] > 0]
    g = {
        "run_id": run_id, "step": end, "window_start": start, "window_end": end,
        "layer": GLOBAL_LAYER,
        "n_experts": sum(r["n_experts"] for r in rows),
        "token_count": sum(r["token_count"] for r in rows),
        "dead": sum(r["dead"] for r in rows),
        "nearly_dead": sum(r["nearly_dead"] for r in rows),
    }
    if active:
        for f in _MEAN_FIELDS:
            g[f] = float(np.mean([r[f] for r in active]))
    else:
        idle = _row(run_id, start, end, 0, M.summarize(np.zeros(1)))
        g.update({f: idle[f] for f in _MEAN_FIELDS})
    return g


def build_snapshots(run_id: str, routing: pa.Table, every: int) -> pa.Table:
    """Snapshots for a whole run from its routing rows (any order), windows of ``every`` steps.

    ``routing`` needs columns step, layer, expert, tokens (dropped optional). Windows are
    aligned to multiples of ``every`` (steps kK .. kK+K-1); the last one ends at the largest
    step in ``routing`` (its snapshot step), as the probes' last window does.
    A layer's expert count is 1 + the largest expert index it ever reported.
    Vectorised: counts are scattered into a [window, layer, expert] array and
    summarised in one batched call per distinct expert count.
    """
    if every < 1:
        raise ValueError(f"window length `every` must be >= 1 step, got {every!r}")
    if routing.num_rows == 0:
        return SNAPSHOTS.empty_table()
    step = routing.column("step").to_numpy()
    layer = routing.column("layer").to_numpy().astype(np.int64)
    expert = routing.column("expert").to_numpy().astype(np.int64)
    tokens = routing.column("tokens").to_numpy().astype(np.int64)
    dropped = (routing.column("dropped").fill_null(0).to_numpy().astype(np.int64)
               if "dropped" in routing.column_names else np.zeros_like(tokens))
    windows, w_idx = np.unique(step // every, return_inverse=True)
    last = int(step.max())   # the last window ends at the run's last step, not past it
    layers, l_idx = np.unique(layer, return_inverse=True)
    n_exp = np.zeros(len(layers), dtype=np.int64)
    np.maximum.at(n_exp, l_idx, expert + 1)
    shape = (len(windows), len(layers), int(n_exp.max()))
    counts = np.zeros(shape, dtype=np.int64)
    drops = np.zeros(shape, dtype=np.int64)
    present = np.zeros(shape[:2], dtype=bool)
    np.add.at(counts, (w_idx, l_idx, expert), tokens)
    np.add.at(drops, (w_idx, l_idx, expert), dropped)
    present[w_idx, l_idx] = True
    per_layer: dict[tuple[int, int], dict] = {}
    for n in np.unique(n_exp):
        cols = np.flatnonzero(n_exp == n)
        m = M.summarize(counts[:, cols, :n], drops[:, cols, :n])
        for wi in range(len(windows)):
            for j, li in enumerate(cols):
                if present[wi, li]:
                    start = int(windows[wi]) * every
                    per_layer[(wi, li)] = _row(run_id, start, min(start + every - 1, last),
                                               int(layers[li]), _pick(m, (wi, j)))
    rows: list[dict] = []
    for wi in range(len(windows)):
        window_rows = [per_layer[(wi, li)] for li in range(len(layers)) if (wi, li) in per_layer]
        start = int(windows[wi]) * every
        rows.extend(window_rows)
        rows.append(_global_row(run_id, start, min(start + every - 1, last), window_rows))
    return pa.Table.from_pylist(rows, schema=SNAPSHOTS)


def _pick(m: M.LayerMetrics, idx) -> M.LayerMetrics:
    """One element of a batched LayerMetrics."""
    d = {k: (v[idx] if isinstance(v, np.ndarray) else v) for k, v in m.as_dict().items()}
    return M.LayerMetrics(**d)


@dataclass
class _LayerState:
    counters: dict = field(default_factory=lambda: {r.name: 0 for r in RULES})
    active: dict = field(default_factory=lambda: {r.name: False for r in RULES})


class AlertTracker:
    """Persistence state machine over successive snapshot windows.

    ``update(rows)`` takes the snapshot rows of one window (any layers; the
    global row is ignored) and returns the alert transitions it caused.
    Deterministic: the same rows in the same order give the same transitions.
    """

    def __init__(self):
        self._layers: dict[int, _LayerState] = {}

    def active(self) -> dict[int, set[str]]:
        """``{layer: {alert, ...}}`` raised and not cleared since (layers without one left out)."""
        return {l: {k for k, v in s.active.items() if v} for l, s in self._layers.items()
                if any(s.active.values())}

    @classmethod
    def from_transitions(cls, transitions) -> "AlertTracker":
        """A tracker whose ``active()`` is what the stored ``transitions`` left raised.

        ``transitions``: alerts-table rows (dicts with step, layer, alert,
        transition) or ``(step, layer, alert, transition)`` tuples, any order;
        identical rows (ranks repeat them) count once. Applied in (step, layer,
        alert, transition) order, so the last transition of each (layer, alert)
        decides. Persistence counters are not stored and restart at 0: a
        restored tracker raises an inactive alert again only after ``persist``
        more windows, and clears an active one at the first healthy window.
        """
        rows = {(int(t["step"]), int(t["layer"]), str(t["alert"]), str(t["transition"]))
                if isinstance(t, dict) else (int(t[0]), int(t[1]), str(t[2]), str(t[3]))
                for t in transitions}
        tracker = cls()
        for _step, layer, alert, kind in sorted(rows):
            state = tracker._layers.setdefault(layer, _LayerState())
            if alert in state.active:
                state.active[alert] = kind == "raised"
        return tracker

    def update(self, rows: list[dict]) -> list[dict]:
        by_layer = {r["layer"]: r for r in rows if r["layer"] != GLOBAL_LAYER}
        out: list[dict] = []
        for layer in sorted(set(self._layers) | set(by_layer)):
            state = self._layers.setdefault(layer, _LayerState())
            row = by_layer.get(layer)
            idle = row is None or row["token_count"] == 0
            for rule in RULES:
                if not idle and rule.holds(row):
                    state.counters[rule.name] += 1
                    if state.counters[rule.name] == rule.persist and not state.active[rule.name]:
                        state.active[rule.name] = True
                        out.append(_transition(row, rule, "raised", state.counters[rule.name]))
                else:
                    state.counters[rule.name] = 0
                    if state.active[rule.name]:
                        state.active[rule.name] = False
                        ref = row if row is not None else _idle_row(layer, rows)
                        out.append(_transition(ref, rule, "cleared", 0))
        return out


def _idle_row(layer: int, rows: list[dict]) -> dict:
    step = max((r["step"] for r in rows), default=0)
    run_id = rows[0]["run_id"] if rows else ""
    return {"run_id": run_id, "step": step, "layer": layer, "n_experts": 0, "token_count": 0,
            "neff": 1.0, "top2_share": 0.0, "dead": 0}


def _transition(row: dict, rule: AlertRule, kind: str, consecutive: int) -> dict:
    return {
        "run_id": row["run_id"], "step": int(row["step"]), "layer": int(row["layer"]),
        "alert": rule.name, "transition": kind, "consecutive": int(consecutive),
        "n_experts": int(row["n_experts"]), "token_count": int(row["token_count"]),
        "neff": float(row["neff"]), "top2_share": float(row["top2_share"]), "dead": int(row["dead"]),
    }


def windows(rows: list[dict]):
    """Yield the snapshot rows of each window (same ``step``), in step order, layers sorted."""
    rows = sorted(rows, key=lambda r: (int(r["step"]), int(r["layer"])))
    i = 0
    while i < len(rows):
        j = i
        while j < len(rows) and rows[j]["step"] == rows[i]["step"]:
            j += 1
        yield rows[i:j]
        i = j


def alerts_for(snapshots: pa.Table) -> pa.Table:
    """Replay the alert tracker over stored snapshots (ordered by step)."""
    if snapshots.num_rows == 0:
        return ALERTS.empty_table()
    tracker = AlertTracker()
    out = [t for window in windows(snapshots.to_pylist()) for t in tracker.update(window)]
    return pa.Table.from_pylist(out, schema=ALERTS)
