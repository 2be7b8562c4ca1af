"""How far DeepSeek EPLB's greedy placement (and chrono's swap refinement) is from the optimum
on tiny layers, where the optimum can be found by exhaustive search.

240 random layers: (experts, GPUs, replicas) in 8 shapes x 30 seeds, loads uniform
0..99 with one expert x10 in 30 % of layers. For each: the brute-force optimum of the
busiest GPU's load (every replica-count vector x every equal-size split), EPLB as
published, EPLB + refine, and chrono's exact search (method="exact").

    python benchmarks/placement_optimality.py
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = [(4, 2, 0), (4, 2, 2), (6, 3, 0), (6, 2, 2), (4, 4, 4), (6, 4, 2), (5, 3, 1), (8, 4, 0)]


def _splits(items: list, k: int):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for comb in itertools.combinations(range(len(rest)), k - 1):
        chosen = set(comb)
        for tail in _splits([rest[i] for i in range(len(rest)) if i not in chosen], k):
            yield [[first] + [rest[i] for i in comb]] + tail


def brute_force(w, gpus: int, n_phy: int) -> float:
    E, best = len(w), np.inf
    for cut in itertools.combinations(range(1, n_phy), E - 1):
        b = (0,) + cut + (n_phy,)
        share = [w[e] / (b[e + 1] - b[e]) for e in range(E) for _ in range(b[e + 1] - b[e])]
        for parts in _splits(list(range(n_phy)), n_phy // gpus):
            best = min(best, max(sum(share[i] for i in g) for g in parts))
    return best


def main() -> None:
    from benchmarks._common import write_result
    from chrono.analysis.placement import gpu_loads, plan

    rng = np.random.default_rng(0)
    arms = {"eplb": dict(method="eplb", refine=False), "eplb+refine": dict(method="eplb", refine=True),
            "exact": dict(method="exact")}
    stats = {a: {"optimal": 0, "ratios": []} for a in arms}
    n = 0
    for E, G, R in SHAPES:
        for _ in range(30):
            w = rng.integers(0, 100, size=E).astype(float)
            if rng.random() < 0.3:
                w[rng.integers(E)] *= 10
            opt = brute_force(w, G, E + R)
            n += 1
            for name, kw in arms.items():
                got = gpu_loads(w[None], plan(w[None], G, R, **kw).phy2log, G).max()
                stats[name]["optimal"] += bool(abs(got - opt) <= 1e-9 * max(1.0, opt))
                stats[name]["ratios"].append(float(got / opt) if opt > 0 else 1.0)
    out = {}
    for name, s in stats.items():
        r = np.array(s["ratios"])
        out[name] = {"optimal": s["optimal"], "layers": n, "worst_ratio": float(r.max()),
                     "mean_ratio": float(r.mean())}
        print(f"{name:<12} optimal on {s['optimal']}/{n}  worst {r.max():.3f} x optimum  mean {r.mean():.4f}")
    print("wrote", write_result("placement_optimality", {"shapes": SHAPES, "arms": out}))


if __name__ == "__main__":
    main()
