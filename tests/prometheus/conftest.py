"""A small recorded run for the exporter tests: routing, snapshots, alerts and decisions.

Layer l of ``n_layers`` drifts into collapse at a speed that grows with l, so
the latest window has healthy layers, PRE_COLLAPSE layers and (after enough
windows) COLLAPSE_CONFIRMED layers; layers 0 and 1 get controller decisions.
"""
from __future__ import annotations

import numpy as np
import pytest

import chrono
from chrono.snapshots import AlertTracker, layer_rows

EVERY = 5


class RunBuilder:
    def __init__(self, root, run="exp1", n_layers=4, n_experts=8, seed=0):
        self.root, self.run = root, run
        self.n_layers, self.n_experts = n_layers, n_experts
        self.rng = np.random.default_rng(seed)
        self.tracker = AlertTracker()
        self.windows = 0
        self.pressure = {0: 0.0, 1: 0.0}
        model = {"name": "test", "layers": list(range(n_layers)),
                 "experts_per_layer": {str(l): n_experts for l in range(n_layers)},
                 "top_k": 2, "adapter": "synthetic"}
        with chrono.open_run(root, run, model=model):
            pass

    def counts(self, step: int) -> np.ndarray:
        out = np.zeros((self.n_layers, self.n_experts), dtype=np.int64)
        for l in range(self.n_layers):
            drift = 0.35 * step * l / max(1, self.n_layers - 1)
            logits = np.zeros(self.n_experts)
            logits[0] += drift
            logits[self.n_experts // 2:] -= drift
            p = np.exp(logits - logits.max())
            out[l] = self.rng.multinomial(512, p / p.sum())
        return out

    def add_windows(self, n: int = 1) -> None:
        """Record ``n`` more windows of EVERY steps, through the real store writer."""
        with chrono.open_run(self.root, self.run) as w:
            for _ in range(n):
                start = self.windows * EVERY
                window = {}
                for step in range(start, start + EVERY):
                    c = self.counts(step)
                    w.log_routing(step, np.arange(self.n_layers), c)
                    for l in range(self.n_layers):
                        window[l] = window.get(l, 0) + c[l]
                rows = layer_rows(self.run, start, start + EVERY - 1, window)
                w.log_rows("snapshots", rows)
                w.log_rows("alerts", self.tracker.update(rows))
                decisions = []
                for l in self.pressure:
                    debt = 0.1 * l + 0.05 * self.windows
                    self.pressure[l] = 0.8 * self.pressure[l] + 0.2 * debt
                    p = self.pressure[l]
                    decisions.append({"step": start + EVERY - 1, "layer": l, "actuator": "lens",
                                      "debt": debt, "pressure": p, "heat": min(p, 1.0),
                                      "forgetting": 0.02 + 0.1 * p, "lens_scale": min(p, 0.02),
                                      "backoff": 1.0, "abstain": p < 0.01, "reason": "test",
                                      "neff": None, "top2_share": None})
                w.log_rows("decisions", decisions)
                self.windows += 1
                w.flush()


@pytest.fixture
def run_builder(store_root):
    b = RunBuilder(store_root)
    b.add_windows(12)
    return b


def latest_from_store(root, run):
    """What the exporter must show, straight from the store with SQL."""
    con = chrono.connect(root)
    snap = con.sql("SELECT * FROM snapshots WHERE run_id = $r AND layer >= 0 AND step = "
                   "(SELECT max(step) FROM snapshots WHERE run_id = $r)",
                   params={"r": run}).to_arrow_table().to_pylist()
    tokens = dict(con.execute("SELECT layer, sum(tokens) FROM routing WHERE run_id = ? GROUP BY 1",
                              [run]).fetchall())
    transitions = {(l, a, t): n for l, a, t, n in con.execute(
        "SELECT layer, alert, transition, count(*) FROM alerts WHERE run_id = ? GROUP BY ALL",
        [run]).fetchall()}
    # replay the transitions in order: the last one of each (layer, alert) decides
    active = set()
    for l, a, t in con.execute("SELECT layer, alert, transition FROM alerts WHERE run_id = ? "
                               "ORDER BY step", [run]).fetchall():
        (active.add if t == "raised" else active.discard)((l, a))
    decisions = con.sql("SELECT * FROM decisions WHERE run_id = $r AND step = "
                        "(SELECT max(step) FROM decisions WHERE run_id = $r)",
                        params={"r": run}).to_arrow_table().to_pylist()
    con.close()
    return {"snapshot": {r["layer"]: r for r in snap}, "tokens": tokens,
            "transitions": transitions, "active": active,
            "decisions": {r["layer"]: r for r in decisions}}


@pytest.fixture
def store_truth():
    """``store_truth(root, run)``: the latest values of a run, computed with SQL."""
    return latest_from_store
