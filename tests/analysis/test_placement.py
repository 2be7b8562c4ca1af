"""The expert placement planner: EPLB worked by hand, the exact search against brute force,
and the invariants every plan must keep."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from chrono.analysis import AnalysisError
from chrono.analysis.placement import balanced_packing, gpu_loads, plan, replicate, trivial


def _brute_force_optimum(w, gpus, n_phy) -> float:
    """Min over every replica-count vector and every equal-size split of the replicas."""
    E, k = len(w), n_phy // gpus
    best = np.inf
    for cut in itertools.combinations(range(1, n_phy), E - 1):
        b = (0,) + cut + (n_phy,)
        share = [w[e] / (b[e + 1] - b[e]) for e in range(E) for _ in range(b[e + 1] - b[e])]
        for perm in itertools.permutations(range(n_phy)):
            if any(perm[i * k] > perm[i * k + j] for i in range(gpus) for j in range(1, k)):
                continue  # each GPU's slots listed in increasing order: one of each split
            best = min(best, max(sum(share[p] for p in perm[g * k:(g + 1) * k]) for g in range(gpus)))
    return best


def _check_invariants(p, w, replicas):
    L, E = w.shape
    P = E + replicas
    assert p.phy2log.shape == (L, P)
    assert (p.logcnt >= 1).all() and (p.logcnt.sum(1) == P).all()
    for layer in range(L):
        assert np.bincount(p.phy2log[layer], minlength=E).tolist() == p.logcnt[layer].tolist()
        for e in range(E):
            slots = [s for s in p.log2phy[layer, e] if s >= 0]
            assert len(slots) == p.logcnt[layer, e]
            assert all(p.phy2log[layer, s] == e for s in slots)
    loads = gpu_loads(w, p.phy2log, p.gpus)
    assert np.allclose(loads.sum(1), w.sum(1))


@pytest.mark.parametrize("E,gpus,replicas", [(4, 2, 0), (4, 2, 2), (3, 3, 0), (5, 3, 1), (3, 2, 3),
                                             (6, 2, 0)])
def test_plan_reaches_brute_force_optimum_on_tiny_layers(E, gpus, replicas):
    rng = np.random.default_rng(E * 100 + gpus * 10 + replicas)
    for _ in range(4):
        w = rng.integers(0, 100, size=E).astype(float)
        w[rng.integers(E)] *= rng.choice([1, 10])
        p = plan(w[None], gpus, replicas=replicas)  # auto: exact search for tiny layers
        got = gpu_loads(w[None], p.phy2log, gpus).max()
        assert got == pytest.approx(_brute_force_optimum(w, gpus, E + replicas)), w
        _check_invariants(p, w[None], replicas)


def test_eplb_worked_by_hand_is_a_heuristic():
    w = np.array([[100.0, 40, 30, 30]])
    # replicate: e0 100 -> 2 replicas (50), then e0 50 is still the largest -> 3 (33.3)
    phy, rank, cnt = replicate(w, 6)
    assert phy.tolist() == [[0, 1, 2, 3, 0, 0]] and cnt.tolist() == [[3, 1, 1, 1]]
    assert rank.tolist() == [[0, 0, 0, 0, 1, 2]]
    # pack shares [33.3, 40, 30, 30, 33.3, 33.3] (3 per GPU), heaviest first onto the lighter GPU:
    # slot1 40 -> g0; slot0 -> g1; slot4 -> g1 (33 < 40); slot5 -> g0; slot2 -> g1 (full); slot3 -> g0
    p = plan(w, 2, replicas=2, method="eplb", refine=False)
    assert p.phy2log.tolist() == [[1, 0, 3, 0, 0, 2]]
    assert gpu_loads(w, p.phy2log, 2).tolist()[0] == pytest.approx([40 + 100 / 3 + 30, 200 / 3 + 30])
    # the optimum splits e0 and e1 in two: {50, 20, 30} on each GPU -> 100
    assert _brute_force_optimum(w[0], 2, 6) == pytest.approx(100.0)
    exact = plan(w, 2, replicas=2, method="exact")
    assert gpu_loads(w, exact.phy2log, 2).max() == pytest.approx(100.0)


def test_balanced_packing_by_hand():
    pack, rank = balanced_packing(np.array([[90.0, 50, 40, 20]]), 2)
    # 90 -> p0, 50 -> p1, 40 -> p1 (50 < 90), 20 -> p0 (p1 full)
    assert pack.tolist() == [[0, 1, 1, 0]] and rank.tolist() == [[0, 0, 1, 1]]


def test_hierarchical_keeps_groups_on_nodes():
    rng = np.random.default_rng(3)
    w = rng.lognormal(0, 1, size=(5, 16)) * 100
    p = plan(w, gpus=4, replicas=4, groups=4, nodes=2, method="eplb")
    assert p.policy == "hierarchical"
    _check_invariants(p, w, 4)
    per_gpu = p.slots_per_gpu
    for layer in range(5):
        node_of_slot = np.arange(20) // per_gpu // 2
        for g in range(4):  # every replica of group g's experts sits on one node
            experts = range(4 * g, 4 * g + 4)
            nodes = {int(node_of_slot[s]) for s in range(20) if p.phy2log[layer, s] in experts}
            assert len(nodes) == 1


def test_eplb_improves_on_trivial_and_refine_never_hurts():
    rng = np.random.default_rng(1)
    w = rng.lognormal(0, 1.5, size=(8, 32)) * 100
    before = gpu_loads(w, trivial(8, 32, 40), 8).max(1)
    raw = gpu_loads(w, plan(w, 8, replicas=8, method="eplb", refine=False).phy2log, 8).max(1)
    ref = plan(w, 8, replicas=8, method="eplb")
    after = gpu_loads(w, ref.phy2log, 8).max(1)
    assert (after <= raw + 1e-9).all() and (raw <= before + 1e-9).all() and after.sum() < before.sum()
    _check_invariants(ref, w, 8)


def test_global_policy_when_groups_do_not_split_over_nodes():
    w = np.arange(1, 13, dtype=float)[None]
    p = plan(w, gpus=4, replicas=0, groups=3, nodes=2, method="eplb")
    assert p.policy == "global" and p.nodes == 1
    _check_invariants(p, w, 0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(gpus=3), "do not split evenly"), (dict(gpus=2, nodes=3), "multiple of --nodes"),
    (dict(gpus=2, groups=3), "equal groups"), (dict(gpus=0), "--gpus must be >= 1"),
    (dict(gpus=2, replicas=-1), "--replicas"), (dict(gpus=2, method="magic"), "unknown method"),
])
def test_plan_rejects_impossible_requests(kwargs, match):
    with pytest.raises(AnalysisError, match=match):
        plan(np.ones((1, 4)), **kwargs)


def test_exact_refuses_big_layers():
    with pytest.raises(AnalysisError, match="tiny layers"):
        plan(np.ones((1, 64)), 8, method="exact")


def test_plan_invariants_over_random_shapes():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=60, deadline=None, derandomize=True)
    @given(st.data())
    def check(data):
        nodes = data.draw(st.sampled_from([1, 2]))
        gpus = nodes * data.draw(st.integers(1, 4))
        groups = nodes * data.draw(st.integers(1, 3))
        E = groups * data.draw(st.integers(1, 4))
        slots = -(-E // gpus) * gpus + gpus * data.draw(st.integers(0, 2))  # a multiple of gpus >= E
        L = data.draw(st.integers(1, 3))
        w = np.array(data.draw(st.lists(st.integers(0, 1000), min_size=L * E, max_size=L * E)),
                     dtype=float).reshape(L, E)
        method = data.draw(st.sampled_from(["eplb", "auto"]))
        p = plan(w, gpus, replicas=slots - E, groups=groups, nodes=nodes, method=method)
        _check_invariants(p, w, slots - E)
        after = gpu_loads(w, p.phy2log, gpus).max(1)
        assert (after >= w.sum(1) / gpus - 1e-9).all()  # no plan beats a perfect split
        if p.policy == "hierarchical" and nodes > 1:  # every group's replicas on one node
            node_of_slot = np.arange(slots) // (slots // nodes)
            for layer in range(L):
                for g in range(groups):
                    members = np.isin(p.phy2log[layer], np.arange(g * (E // groups), (g + 1) * (E // groups)))
                    assert np.unique(node_of_slot[members]).size == 1

    check()
