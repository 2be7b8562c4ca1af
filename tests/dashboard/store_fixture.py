"""A small store with every table filled, written through the real writer.

``build(root)`` returns the facts the tests assert against (totals, alert
counts, the last global snapshot), computed from the same inputs.
"""
from __future__ import annotations

import numpy as np

import chrono
from chrono.snapshots import AlertTracker, layer_rows

MAIN_RUN, HEALTHY_RUN, EMPTY_RUN = "collapse-run", "healthy-run", "fresh-run"
LAYERS, EXPERTS, TOP_K, TOKENS, STEPS, EVERY = 4, 8, 2, 256, 80, 10


def _counts(rng, step: int) -> np.ndarray:
    """[layers, experts]: layer 0 stays balanced, deeper layers collapse onto expert 0."""
    out = np.zeros((LAYERS, EXPERTS), dtype=np.int64)
    for layer in range(LAYERS):
        drift = 12.0 * (step / STEPS) * (layer / (LAYERS - 1))
        logits = np.zeros(EXPERTS)
        logits[0] += drift
        logits[EXPERTS // 2:] -= 2 * drift
        p = np.exp(logits - logits.max())
        out[layer] = rng.multinomial(TOKENS * TOP_K, p / p.sum())
    return out


def build(root) -> dict:
    rng = np.random.default_rng(7)
    facts: dict = {"tokens": 0, "raised": 0, "cleared": 0, "snapshots": []}
    model = {"name": "fixture-moe", "layers": list(range(LAYERS)),
             "experts_per_layer": {str(l): EXPERTS for l in range(LAYERS)}, "top_k": TOP_K,
             "adapter": "native"}
    tracker = AlertTracker()
    pressure = np.zeros(LAYERS)
    with chrono.open_run(root, MAIN_RUN, model=model, config={"steps": STEPS}) as w:
        window = {}
        for step in range(STEPS):
            c = _counts(rng, step)
            weights = c * rng.uniform(0.4, 0.6, size=c.shape)
            w.log_routing(step, np.arange(LAYERS), c, weight_sum=weights)
            facts["tokens"] += int(c.sum())
            w.log_signal(step, "loss", 3.0 - step / STEPS)
            w.log_signal(step, "var.expensive_fraction", 0.2 + 0.001 * step)
            w.log_signal(step, "astarte.null_norm", 0.5, layer=1)
            for l in range(LAYERS):
                window[l] = window.get(l, 0) + c[l]
            if (step + 1) % EVERY == 0:
                start = step + 1 - EVERY
                rows = layer_rows(MAIN_RUN, start, step, window)
                window = {}
                w.log_rows("snapshots", rows)
                trans = tracker.update(rows)
                w.log_rows("alerts", trans)
                facts["raised"] += sum(t["transition"] == "raised" for t in trans)
                facts["cleared"] += sum(t["transition"] == "cleared" for t in trans)
                facts["snapshots"].append(rows)
                decisions = []
                for r in rows:
                    if r["layer"] < 0:
                        continue
                    n = r["n_experts"]
                    debt = min(1.0, max(0.0, (0.6 * n - r["neff"]) / (0.6 * n)))
                    pressure[r["layer"]] = 0.8 * pressure[r["layer"]] + 0.2 * debt
                    p = float(pressure[r["layer"]])
                    decisions.append({"step": step, "layer": r["layer"], "actuator": "lens", "debt": debt,
                                      "pressure": p, "heat": min(1.0, p), "forgetting": 0.02 + 0.1 * p,
                                      "lens_scale": min(p, 0.02), "backoff": 1.0, "abstain": p < 0.01,
                                      "reason": ("abstain: pressure < 0.01 (healthy)" if p < 0.01
                                                 else f"act: debt {debt:.3f}, pressure {p:.3f}"),
                                      "neff": r["neff"], "top2_share": r["top2_share"]})
                w.log_rows("decisions", decisions)
                w.flush()
            if step == 5:
                w.log_signal(step, "accuracy", 0.5)
        w.log_signal(STEPS - 1, "accuracy", 0.75)
        w.log_rows("lifecycle", [
            {"step": 40, "layer": 3, "event": "prune", "expert": 7, "source_expert": None,
             "n_experts_after": 7, "applied": True, "reason": "dead for 3 snapshots"},
            {"step": 50, "layer": 2, "event": "split", "expert": 8, "source_expert": 0,
             "n_experts_after": 9, "applied": False, "reason": "expert 0 over 50 % share"},
        ])
        n_tok = 64
        w.log_tokens(step=STEPS - 1, layer=0, expert=rng.integers(0, EXPERTS, n_tok),
                     weight=np.r_[np.full(32, 0.7), np.full(32, 0.3)], k=np.r_[np.zeros(32), np.ones(32)],
                     batch_idx=0, position=np.arange(n_tok) % 32)
    facts["last_global"] = facts["snapshots"][-1][-1]
    facts["decisions"] = LAYERS * (STEPS // EVERY)

    with chrono.open_run(root, HEALTHY_RUN, model={"name": "tiny", "layers": [0, 1],
                                                   "experts_per_layer": {"0": 4, "1": 4}, "top_k": 1}) as w:
        tracker = AlertTracker()
        for step in range(20):
            w.log_routing(step, np.arange(2), np.full((2, 4), 25), weight_sum=np.full((2, 4), 12.5))
            w.log_signal(step, "loss", 2.0 - 0.01 * step)
            if (step + 1) % EVERY == 0:
                rows = layer_rows(HEALTHY_RUN, step + 1 - EVERY, step, {0: np.full(4, 250), 1: np.full(4, 250)})
                w.log_rows("snapshots", rows)
                assert not tracker.update(rows)
                # a governed healthy run: debt 0, so the controller abstains every time
                w.log_rows("decisions", [
                    {"step": step, "layer": l, "actuator": "lens", "debt": 0.0, "pressure": 0.0, "heat": 0.0,
                     "forgetting": 0.02, "lens_scale": 0.0, "backoff": 1.0, "abstain": True,
                     "reason": "abstain: pressure < 0.01 (healthy)", "neff": r["neff"],
                     "top2_share": r["top2_share"]} for l, r in enumerate(rows[:2])])
    with chrono.open_run(root, EMPTY_RUN, model={"name": "nothing-yet"}):
        pass
    return facts
