"""Expert placement planner: replicate hot experts and place replicas on GPUs so that the
most loaded GPU carries as little as possible, from recorded per-layer loads.

The algorithm is the hierarchical load balancing of DeepSeek's public Expert
Parallelism Load Balancer (EPLB, https://github.com/deepseek-ai/EPLB, eplb.py at
commit d52c72d, March 2025; described in the DeepSeek-V3 report, arXiv:2412.19437
§3.4), re-implemented here with NumPy (vectorised over layers, no torch):

1. **groups to nodes**: the ``groups`` expert groups (contiguous blocks of
   experts, as in group-limited routing) are packed onto ``nodes`` nodes, the
   same number per node, heaviest group first onto the least loaded node that
   still has room ("balanced packing");
2. **replicas to the hottest experts**: within each node, each of the node's
   redundant slots goes to the expert whose load per replica is currently the
   largest (load is split evenly over an expert's replicas);
3. **replicas to GPUs**: the node's physical experts (replicas) are packed onto
   its GPUs by the same balanced packing, the same number per GPU.

When ``groups`` is not a multiple of ``nodes`` EPLB's *global* policy is used:
the same three steps with one group and one node. Ties are broken by the
smaller index (stable sorts), where EPLB leaves the order to ``torch.sort``.

Beyond EPLB, ``refine=True`` (the default) then repeatedly swaps one replica of
the most loaded GPU with one replica of another GPU of the same node when the
swap lowers the larger of the two GPUs' loads (steepest improvement, at most
``refine_rounds`` swaps per layer); it never moves a replica across nodes and
never changes replica counts, so step 1's node grouping is kept.

Shapes: ``weight`` float64[L, E] (L layers, E logical experts); a physical slot
``p`` of ``P = E + replicas`` lives on GPU ``p // (P // gpus)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import AnalysisError

EPLB_SOURCE = "github.com/deepseek-ai/EPLB eplb.py @ d52c72d (2025-03-24)"


@dataclass
class Placement:
    """A plan for L layers: ``phy2log`` int64[L, P] (logical expert of each physical slot),
    ``log2phy`` int64[L, E, max_replicas] (slots of each expert, padded with -1),
    ``logcnt`` int64[L, E] (replicas per expert), ``gpus`` and ``nodes``."""

    phy2log: np.ndarray
    log2phy: np.ndarray
    logcnt: np.ndarray
    gpus: int
    nodes: int
    policy: str

    @property
    def slots_per_gpu(self) -> int:
        return self.phy2log.shape[1] // self.gpus


def balanced_packing(weight: np.ndarray, n_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack each row's n items into ``n_packs`` packs of exactly n / n_packs items, heaviest
    item first onto the lightest pack with room. Returns (pack int64[X, n], rank_in_pack)."""
    x, n = weight.shape
    if n % n_packs:
        raise AnalysisError(f"cannot split {n} items into {n_packs} equal packs")
    cap = n // n_packs
    rows = np.arange(x)
    if cap == 1:
        return np.broadcast_to(np.arange(n), (x, n)).copy(), np.zeros((x, n), dtype=np.int64)
    order = np.argsort(-weight, axis=1, kind="stable")
    load = np.zeros((x, n_packs))
    count = np.zeros((x, n_packs), dtype=np.int64)
    pack = np.empty((x, n), dtype=np.int64)
    rank = np.empty((x, n), dtype=np.int64)
    for i in range(n):
        item = order[:, i]
        p = np.argmin(np.where(count < cap, load, np.inf), axis=1)
        pack[rows, item] = p
        rank[rows, item] = count[rows, p]
        load[rows, p] += weight[rows, item]
        count[rows, p] += 1
    return pack, rank


def replicate(weight: np.ndarray, n_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Give each row's ``n_phy - n`` extra replicas, one at a time, to the expert with the largest
    load per replica. Returns (phy2log int64[X, n_phy], replica rank, logcnt int64[X, n])."""
    x, n = weight.shape
    if n_phy < n:
        raise AnalysisError(f"{n_phy} physical slots cannot hold {n} experts")
    rows = np.arange(x)
    phy2log = np.empty((x, n_phy), dtype=np.int64)
    phy2log[:, :n] = np.arange(n)
    rank = np.zeros((x, n_phy), dtype=np.int64)
    logcnt = np.ones((x, n), dtype=np.int64)
    for i in range(n, n_phy):
        e = np.argmax(weight / logcnt, axis=1)
        phy2log[:, i] = e
        rank[:, i] = logcnt[rows, e]
        logcnt[rows, e] += 1
    return phy2log, rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def _hierarchical(weight: np.ndarray, n_phy: int, groups: int, nodes: int, gpus: int):
    L, E = weight.shape
    gsize, per_node_groups = E // groups, groups // nodes
    # 1. groups -> nodes; "meta-logical" order puts node 0's experts first
    gpack, grank = balanced_packing(weight.reshape(L, groups, gsize).sum(-1), nodes)
    log2mlog = (((gpack * per_node_groups + grank) * gsize)[..., None] + np.arange(gsize)).reshape(L, E)
    mlog2log = _inverse(log2mlog)
    # 2. replicas within each node
    w_mlog = np.take_along_axis(weight, mlog2log, axis=1).reshape(L * nodes, E // nodes)
    phy2mlog, phyrank, mlogcnt = replicate(w_mlog, n_phy // nodes)
    # 3. physical experts -> GPUs of the node
    w_phy = np.take_along_axis(w_mlog / mlogcnt, phy2mlog, axis=1)
    pack, rank = balanced_packing(w_phy, gpus // nodes)
    pphy2phy = _inverse(pack * (n_phy // gpus) + rank)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1).reshape(L, nodes, -1)
    pphy2mlog = (pphy2mlog + (np.arange(nodes) * (E // nodes))[None, :, None]).reshape(L, n_phy)
    phy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=1)
    prank = np.take_along_axis(phyrank, pphy2phy, axis=1).reshape(L, n_phy)
    logcnt = np.take_along_axis(mlogcnt.reshape(L, E), log2mlog, axis=1)
    return phy2log, prank, logcnt


def _log2phy(phy2log: np.ndarray, prank: np.ndarray, logcnt: np.ndarray) -> np.ndarray:
    L, P = phy2log.shape
    width = int(logcnt.max())
    out = np.full((L, logcnt.shape[1] * width), -1, dtype=np.int64)
    np.put_along_axis(out, phy2log * width + prank, np.broadcast_to(np.arange(P), (L, P)), axis=1)
    return out.reshape(L, logcnt.shape[1], width)


def gpu_loads(weight: np.ndarray, phy2log: np.ndarray, gpus: int) -> np.ndarray:
    """float64[L, gpus]: each GPU's predicted load, an expert's load split evenly over its replicas."""
    L, E = weight.shape
    cnt = np.zeros((L, E))
    np.add.at(cnt, (np.arange(L)[:, None], phy2log), 1)
    per_slot = np.take_along_axis(weight / np.maximum(cnt, 1), phy2log, axis=1)
    return per_slot.reshape(L, gpus, -1).sum(-1)


def trivial(n_layers: int, n_experts: int, n_phy: int) -> np.ndarray:
    """The placement SGLang and vLLM start from: slot p holds expert p mod E (int64[L, P])."""
    return np.broadcast_to(np.arange(n_phy) % n_experts, (n_layers, n_phy)).astype(np.int64)


def _refine(weight, phy2log, logcnt, gpus, nodes, rounds):
    L, P = phy2log.shape
    k = P // gpus
    gpn = gpus // nodes
    share = np.take_along_axis(weight / logcnt, phy2log, axis=1)  # [L, P] load of each slot
    for layer in range(L):
        s = share[layer].reshape(gpus, k)
        m = phy2log[layer].reshape(gpus, k)
        for _ in range(rounds):
            load = s.sum(1)
            g = int(np.argmax(load))
            lo, hi = (g // gpn) * gpn, (g // gpn + 1) * gpn
            # swapping slot a of g with slot b of GPU h: loads become load[g]-d, load[h]+d, d = x-y
            d = s[g][None, :, None] - s[lo:hi][:, None, :]  # [gpn, k, k]
            new_max = np.maximum(load[g] - d, load[lo:hi, None, None] + d)
            new_max[g - lo] = np.inf
            h, a, b = np.unravel_index(int(np.argmin(new_max)), new_max.shape)
            if not new_max[h, a, b] < load[g] - 1e-12 * max(1.0, load[g]):
                break
            h += lo
            s[g, a], s[h, b] = s[h, b], s[g, a]
            m[g, a], m[h, b] = m[h, b], m[g, a]
    return phy2log


def plan(weight, gpus: int, replicas: int = 0, groups: int = 1, nodes: int = 1,
         refine: bool = True, refine_rounds: int = 64, method: str = "auto") -> Placement:
    """Plan a placement for ``weight`` float[L, E] (load of each logical expert per layer).

    ``replicas`` = redundant physical experts per layer (P = E + replicas, SGLang's
    ``--ep-num-redundant-experts``, vLLM's ``num_redundant_experts``). ``method``:
    ``"eplb"`` (EPLB, then ``refine``), ``"exact"`` (``placement_exact``, one node, tiny
    layers only) or ``"auto"`` (exact when one node and the search is at most
    ``EXACT_LIMIT`` leaves, else eplb). Raises AnalysisError when E % groups, P % gpus or
    gpus % nodes is not 0, counts are < 1, or "exact" is asked of a layer too large.
    """
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2 or w.shape[1] < 1:
        raise AnalysisError("loads must be a [layers, experts] array")
    if (w < 0).any() or not np.isfinite(w).all():
        raise AnalysisError("loads must be finite and >= 0")
    L, E = w.shape
    for name, v in (("gpus", gpus), ("groups", groups), ("nodes", nodes)):
        if int(v) < 1:
            raise AnalysisError(f"--{name} must be >= 1")
    if replicas < 0:
        raise AnalysisError("--replicas must be >= 0")
    P = E + replicas
    if P % gpus:
        raise AnalysisError(f"{E} experts + {replicas} replicas = {P} physical experts do not split "
                            f"evenly over {gpus} GPUs (choose --replicas so that experts + replicas "
                            f"is a multiple of --gpus)")
    if gpus % nodes:
        raise AnalysisError(f"--gpus {gpus} is not a multiple of --nodes {nodes}")
    if E % groups:
        raise AnalysisError(f"{E} experts do not split into {groups} equal groups")
    from .placement_exact import EXACT_LIMIT, exact_layer, search_size

    if method not in ("auto", "eplb", "exact"):
        raise AnalysisError(f"unknown method {method!r}; methods: auto, eplb, exact")
    small = nodes == 1 and search_size(E, P, gpus) <= EXACT_LIMIT
    if method == "exact" and not small:
        raise AnalysisError(f"exact placement is limited to one node and tiny layers (search size "
                            f"{search_size(E, P, gpus):.3g} > {EXACT_LIMIT}); use the EPLB method")
    if method == "exact" or (method == "auto" and small):
        phy2log = np.stack([exact_layer(w[i], gpus, P)[0] for i in range(L)]) if L else \
            np.zeros((0, P), dtype=np.int64)
        logcnt = np.zeros((L, E), dtype=np.int64)
        np.add.at(logcnt, (np.arange(L)[:, None], phy2log), 1)
        return Placement(phy2log, _log2phy(phy2log, _ranks(phy2log), logcnt), logcnt, gpus, 1, "exact")
    if groups % nodes == 0:
        policy = "hierarchical"
        phy2log, prank, logcnt = _hierarchical(w, P, groups, nodes, gpus)
    else:
        policy = "global"
        phy2log, prank, logcnt = _hierarchical(w, P, 1, 1, gpus)
    if refine:
        phy2log = _refine(w, phy2log, logcnt, gpus, nodes if policy == "hierarchical" else 1,
                          refine_rounds)
        prank = _ranks(phy2log)
    return Placement(phy2log, _log2phy(phy2log, prank, logcnt), logcnt, gpus,
                     nodes if policy == "hierarchical" else 1, policy)


def _ranks(phy2log: np.ndarray) -> np.ndarray:
    """Replica rank of each slot: its order among the slots of the same expert (by slot index)."""
    L, P = phy2log.shape
    order = np.argsort(phy2log, axis=1, kind="stable")
    sorted_e = np.take_along_axis(phy2log, order, axis=1)
    new = np.ones_like(sorted_e, dtype=bool)
    new[:, 1:] = sorted_e[:, 1:] != sorted_e[:, :-1]
    idx = np.where(new, np.arange(P), 0)
    start = np.maximum.accumulate(idx, axis=1)
    rank = np.empty_like(phy2log)
    np.put_along_axis(rank, order, np.arange(P) - start, axis=1)
    return rank
