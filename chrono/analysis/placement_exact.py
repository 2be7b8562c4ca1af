"""Exact min-max placement for tiny layers (the planner's ``method="exact"``).

For one layer with E experts, P physical slots and G GPUs (P / G slots each,
one node), search every replica-count vector (each expert >= 1 replica, sum P;
an expert's load is split evenly over its replicas) and, for each, every
equal-cardinality assignment of replicas to GPUs by depth-first branch and
bound (heaviest replica first; a GPU whose (load, free slots) equals one
already tried is skipped; a branch is cut once a GPU reaches the best maximum
found). Returns a placement whose maximum GPU load is the optimum.

The search grows combinatorially: ``search_size`` estimates it and the planner
only uses this method when the estimate is at most ``EXACT_LIMIT``.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

EXACT_LIMIT = 200_000


def search_size(n_experts: int, n_phy: int, gpus: int) -> float:
    """Replica-count vectors x equal-size partitions of the slots (an upper bound on the leaves)."""
    k = n_phy // gpus
    log_size = (math.log(math.comb(n_phy - 1, n_experts - 1)) + math.lgamma(n_phy + 1)
                - gpus * math.lgamma(k + 1) - math.lgamma(gpus + 1))
    return math.exp(log_size) if log_size < 700 else math.inf


def _compositions(total: int, parts: int):
    for cut in itertools.combinations(range(1, total), parts - 1):
        b = (0,) + cut + (total,)
        yield [b[i + 1] - b[i] for i in range(parts)]


def exact_layer(weight: np.ndarray, gpus: int, n_phy: int) -> tuple[np.ndarray, float]:
    """(phy2log int64[P] with GPU g holding slots [g*k, (g+1)*k), optimal max GPU load)."""
    w = [float(x) for x in weight]
    E, k = len(w), n_phy // gpus
    best = [math.inf, None]
    total = sum(w)
    for counts in _compositions(n_phy, E):
        items = sorted(((w[e] / c, e) for e, c in enumerate(counts) for _ in range(c)), reverse=True)
        if max(items[0][0], total / gpus) >= best[0] - 1e-12:
            continue
        load = [0.0] * gpus
        free = [k] * gpus
        assign = [[] for _ in range(gpus)]

        def dfs(i: int, cur_max: float) -> None:
            if i == len(items):
                best[0], best[1] = cur_max, [list(a) for a in assign]
                return
            x, e = items[i]
            tried = set()
            for g in range(gpus):
                if not free[g] or (load[g], free[g]) in tried:
                    continue
                tried.add((load[g], free[g]))
                new = load[g] + x
                if max(new, cur_max) >= best[0] - 1e-12:
                    continue
                load[g], free[g] = new, free[g] - 1
                assign[g].append(e)
                dfs(i + 1, max(cur_max, new))
                assign[g].pop()
                load[g], free[g] = new - x, free[g] + 1

        dfs(0, 0.0)
    phy2log = np.array([e for a in best[1] for e in a], dtype=np.int64)
    return phy2log, best[0]
