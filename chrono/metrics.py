"""Routing-health metrics as pure, vectorised functions of expert counts.

Every function takes ``counts`` of shape ``[..., n_experts]`` (tokens
dispatched per expert, after capacity drops) and returns an array of shape
``[...]`` (a NumPy scalar for 1-D input). The semantics follow ChronoMoE
exactly (DESIGN §4):

* shares = counts / total; entropy = -sum s ln s over s > 1e-10; Neff = exp(entropy)
* Top2 = sum of the two largest shares (1.0 when n < 2)
* dead = #experts with share == 0; nearly_dead = #experts with 0 < share < 0.01
* a window with zero tokens: dead = n, Neff = 1, Top2 = 0, entropy = 0

Beyond ChronoMoE (literature): CV of loads, MaxVio (max/mean - 1, Wang et
al. 2024 "Auxiliary-loss-free load balancing"), Gini, Jain's fairness index
(Jain, Chiu & Hawe 1984), drop fraction, the Switch Transformer auxiliary
loss alpha*E*sum(f_i*P_i) (Fedus et al. 2021, eq. 4) and the router z-loss
mean(logsumexp(logits)^2) (Zoph et al. 2022, ST-MoE eq. 5).
For a zero-traffic window the load-spread metrics report perfect balance
(cv = 0, max_violation = 0, gini = 0, jain = 1) so they never produce NaN.

Metrics merge: they depend on the window only through its summed counts, so
the metrics of a window equal the metrics of the sum of its halves' counts
(``RoutingWindow.merge``; property-tested).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

SHARE_EPS = 1e-10
NEARLY_DEAD_SHARE = 0.01

__all__ = [
    "shares", "entropy", "neff", "top2_share", "dead", "nearly_dead", "cv",
    "max_violation", "gini", "jain", "drop_fraction", "switch_aux_loss",
    "router_z_loss", "summarize", "LayerMetrics", "RoutingWindow",
]


def _counts(counts) -> np.ndarray:
    arr = np.asarray(counts, dtype=np.float64)
    if arr.ndim == 0:
        raise ValueError("counts must have a trailing expert dimension, got a scalar")
    if arr.shape[-1] == 0:
        raise ValueError("counts must cover at least one expert")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError("counts must be finite and non-negative")
    return arr


def _out(x):
    """Return NumPy scalars as plain Python numbers, arrays unchanged."""
    return x.item() if isinstance(x, np.ndarray) and x.ndim == 0 else x


def shares(counts) -> np.ndarray:
    """Fraction of the window's tokens per expert; all zeros for an empty window."""
    c = _counts(counts)
    total = c.sum(axis=-1, keepdims=True)
    return np.divide(c, total, out=np.zeros_like(c), where=total > 0)


def _entropy_from_shares(s: np.ndarray) -> np.ndarray:
    safe = np.where(s > SHARE_EPS, s, 1.0)
    return 0.0 - np.sum(np.where(s > SHARE_EPS, s * np.log(safe), 0.0), axis=-1) + 0.0


def entropy(counts):
    """Shannon entropy (nats) of the routing distribution; 0 for an empty window."""
    return _out(_entropy_from_shares(shares(counts)))


def neff(counts):
    """Effective number of experts exp(entropy); 1 for an empty window."""
    return _out(np.exp(_entropy_from_shares(shares(counts))))


def _top2_from_shares(s: np.ndarray, total: np.ndarray) -> np.ndarray:
    n = s.shape[-1]
    if n < 2:
        top2 = np.ones(s.shape[:-1])
    else:
        top2 = np.sum(np.partition(s, n - 2, axis=-1)[..., n - 2:], axis=-1)
    return np.where(total > 0, top2, 0.0)


def top2_share(counts):
    """Share of the two busiest experts (1.0 when n < 2); 0 for an empty window."""
    c = _counts(counts)
    return _out(_top2_from_shares(shares(c), c.sum(axis=-1)))


def dead(counts):
    """Number of experts that received no token (share == 0); n for an empty window."""
    return _out(np.sum(shares(counts) == 0.0, axis=-1))


def nearly_dead(counts):
    """Number of experts with 0 < share < 0.01."""
    s = shares(counts)
    return _out(np.sum((s > 0.0) & (s < NEARLY_DEAD_SHARE), axis=-1))


def cv(counts):
    """Coefficient of variation of expert loads (population std / mean)."""
    c = _counts(counts)
    mean = c.mean(axis=-1)
    return _out(np.divide(c.std(axis=-1), mean, out=np.zeros_like(mean), where=mean > 0))


def max_violation(counts):
    """MaxVio = max load / mean load - 1 (0 = perfectly balanced)."""
    c = _counts(counts)
    mean = c.mean(axis=-1)
    return _out(np.divide(c.max(axis=-1), mean, out=np.ones_like(mean), where=mean > 0) - 1.0)


def gini(counts):
    """Gini coefficient of expert loads (0 = equal, (n-1)/n = one expert takes all)."""
    c = np.sort(_counts(counts), axis=-1)
    n = c.shape[-1]
    i = np.arange(1, n + 1, dtype=np.float64)
    total = c.sum(axis=-1)
    num = np.sum((2 * i - n - 1) * c, axis=-1)
    return _out(np.divide(num, n * total, out=np.zeros_like(total), where=total > 0))


def jain(counts):
    """Jain's fairness index (sum x)^2 / (n sum x^2), in [1/n, 1]; 1 for an empty window."""
    c = _counts(counts)
    n = c.shape[-1]
    sq = np.sum(c * c, axis=-1)
    return _out(np.divide(c.sum(axis=-1) ** 2, n * sq, out=np.ones_like(sq), where=sq > 0))


def drop_fraction(dropped, dispatched):
    """Fraction of routed assignments dropped by capacity: dropped / (dropped + dispatched).

    Both arguments are totals (or count vectors summed over the last axis by
    the caller); 0 when nothing was routed.
    """
    d = np.asarray(dropped, dtype=np.float64)
    k = np.asarray(dispatched, dtype=np.float64)
    total = d + k
    return _out(np.divide(d, total, out=np.zeros_like(total), where=total > 0))


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def switch_aux_loss(logits, top_k: int = 1, alpha: float = 1.0) -> float:
    """Switch Transformer load-balancing loss alpha * E * sum_i f_i * P_i.

    ``logits``: router logits ``[tokens, E]``. f_i is the fraction of (token, k)
    assignments to expert i under top-k of the logits, P_i the mean router
    probability. Equals alpha for perfectly uniform routing.
    """
    x = np.asarray(logits, dtype=np.float64)
    x = x.reshape(-1, x.shape[-1])
    if x.shape[0] == 0:
        return 0.0
    e = x.shape[-1]
    if not 1 <= top_k <= e:
        raise ValueError(f"top_k must be in [1, {e}], got {top_k}")
    probs = _softmax(x)
    top = np.argpartition(-x, top_k - 1, axis=-1)[:, :top_k]
    f = np.bincount(top.ravel(), minlength=e) / top.size
    p = probs.mean(axis=0)
    return float(alpha * e * np.sum(f * p))


def router_z_loss(logits) -> float:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    x = np.asarray(logits, dtype=np.float64)
    x = x.reshape(-1, x.shape[-1])
    if x.shape[0] == 0:
        return 0.0
    m = x.max(axis=-1)
    lse = m + np.log(np.exp(x - m[:, None]).sum(axis=-1))
    return float(np.mean(lse ** 2))


@dataclass(frozen=True)
class LayerMetrics:
    """Health of one layer over one window (fields batched like the input's leading dims)."""

    n_experts: int
    token_count: object
    entropy: object
    neff: object
    top2_share: object
    dead: object
    nearly_dead: object
    cv: object
    max_violation: object
    gini: object
    jain: object
    drop_fraction: object

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def summarize(counts, dropped=None) -> LayerMetrics:
    """All metrics of ``counts [..., n_experts]`` at once (one pass over shares).

    ``dropped``: optional per-expert dropped assignments, same shape as counts.
    """
    c = _counts(counts)
    s = shares(c)
    total = c.sum(axis=-1)
    ent = _entropy_from_shares(s)
    drops = np.zeros(c.shape[:-1]) if dropped is None else _counts(dropped).sum(axis=-1)
    return LayerMetrics(
        n_experts=int(c.shape[-1]),
        token_count=_out(total.astype(np.int64)),
        entropy=_out(ent),
        neff=_out(np.exp(ent)),
        top2_share=_out(_top2_from_shares(s, total)),
        dead=_out(np.sum(s == 0.0, axis=-1)),
        nearly_dead=_out(np.sum((s > 0.0) & (s < NEARLY_DEAD_SHARE), axis=-1)),
        cv=cv(c),
        max_violation=max_violation(c),
        gini=gini(c),
        jain=jain(c),
        drop_fraction=drop_fraction(drops, total),
    )


class RoutingWindow:
    """Mergeable metric state (torchmetrics style): update / compute / reset / merge.

    The state is the summed counts (and drops); the merge rule is addition, so
    ``a.merge(b).compute()`` equals the metrics of the concatenated window.
    """

    def __init__(self, n_experts: int):
        if n_experts < 1:
            raise ValueError("n_experts must be >= 1")
        self.n_experts = n_experts
        self.reset()

    def reset(self) -> None:
        self.counts = np.zeros(self.n_experts, dtype=np.int64)
        self.dropped = np.zeros(self.n_experts, dtype=np.int64)

    def update(self, counts, dropped=None) -> None:
        c = np.asarray(counts, dtype=np.int64)
        if c.shape != (self.n_experts,):
            raise ValueError(f"expected counts of shape ({self.n_experts},), got {c.shape}")
        self.counts += c
        if dropped is not None:
            self.dropped += np.asarray(dropped, dtype=np.int64)

    def merge(self, other: "RoutingWindow") -> "RoutingWindow":
        if other.n_experts != self.n_experts:
            raise ValueError("cannot merge windows with different expert counts")
        out = RoutingWindow(self.n_experts)
        out.counts = self.counts + other.counts
        out.dropped = self.dropped + other.dropped
        return out

    def compute(self) -> LayerMetrics:
        return summarize(self.counts, self.dropped)
