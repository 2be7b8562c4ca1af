"""Expert lifecycle: a policy that proposes spawn / prune / clone / split / merge, and the
interface a model implements to apply them.

Why a separate policy: the decision (which expert, why) is pure arithmetic over snapshot
rows and per-expert counts of the same window, so it is testable without torch and the
same policy drives every workload. The model owns the surgery (copying weights, remapping
router rows); it reports back whether it applied the proposal. Every proposal is logged to
the ``lifecycle`` table: ``applied=False`` rows are proposals a model refused (or a dry
run), ``applied=True`` rows changed the expert set, with ``n_experts_after``.

Rules (per MoE layer, one event per layer per snapshot, then ``cooldown`` snapshots quiet):

* prune  - an expert whose share stayed below ``prune_share`` for ``patience`` consecutive
  snapshots (dead experts included), while more than ``min_experts`` remain.
* merge  - the two least-used live experts both below ``merge_share_factor / n`` (and not
  prunable): fold the smaller into the other, freeing a slot without losing what it learnt.
* split  - an expert above ``overload_factor / n`` while fewer than ``max_experts`` exist
  (``clone`` instead when ``split_overloaded`` is False: copy without dividing its region).
* spawn  - routing uncertainty (the caller's normalised mean gate entropy) above
  ``spawn_entropy``, or load entropy rising by more than ``spawn_entropy_rise`` nats between
  snapshots, while fewer than ``max_experts`` exist: add a fresh expert.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Protocol, runtime_checkable

import numpy as np

from .schema import GLOBAL_LAYER, LIFECYCLE_EVENTS


@dataclass(frozen=True)
class LifecycleConfig:
    min_experts: int = 2
    max_experts: int = 16
    prune_share: float = 0.01       # "nearly dead" threshold of chrono.metrics
    patience: int = 2               # consecutive snapshots an expert must stay below prune_share
    merge_share_factor: float = 0.25  # merge when two experts are both below this / n
    overload_factor: float = 2.5    # split when one expert takes more than this / n
    split_overloaded: bool = True   # False: propose clone instead of split
    spawn_entropy: float | None = None  # normalised gate entropy in [0,1] that triggers spawn
    spawn_entropy_rise: float | None = None  # nats of load-entropy rise between snapshots
    cooldown: int = 2               # snapshots without events in a layer after one is applied
    enable: tuple[str, ...] = ("prune", "merge", "split", "clone", "spawn")

    def __post_init__(self):
        bad = [e for e in self.enable if e not in LIFECYCLE_EVENTS]
        if bad:
            raise ValueError(f"unknown lifecycle events {bad}; known: {LIFECYCLE_EVENTS}")
        if self.min_experts < 1 or self.max_experts < self.min_experts:
            raise ValueError("need 1 <= min_experts <= max_experts")


@dataclass
class Proposal:
    """One lifecycle action for one layer. ``expert`` is the expert removed / changed / split;
    for spawn it is -1 until applied (the model reports the new index)."""

    event: str
    layer: int
    expert: int
    source_expert: int | None = None
    reason: str = ""

    def __post_init__(self):
        if self.event not in LIFECYCLE_EVENTS:
            raise ValueError(f"unknown lifecycle event {self.event!r}; known: {LIFECYCLE_EVENTS}")

    def row(self, step: int, n_experts_after: int, applied: bool, expert: int | None = None) -> dict:
        """A LIFECYCLE table row (run_id is filled in by the writer)."""
        return {"step": int(step), "layer": int(self.layer), "event": self.event,
                "expert": int(self.expert if expert is None else expert),
                "source_expert": None if self.source_expert is None else int(self.source_expert),
                "n_experts_after": int(n_experts_after), "applied": bool(applied),
                "reason": self.reason}


@runtime_checkable
class LifecycleModel(Protocol):
    """What a model implements so the lifecycle can change its expert set.

    ``apply_lifecycle`` performs the proposal and returns the index of the expert that now
    holds the result (the new expert for spawn / clone / split, the survivor for merge, the
    removed index for prune), or None when it refuses (e.g. a capacity limit).
    """

    def lifecycle_experts(self) -> dict[int, int]:
        """{layer: current number of experts}."""

    def apply_lifecycle(self, proposal: Proposal) -> int | None:
        ...


@dataclass
class _LayerState:
    low_streak: dict[int, int] = field(default_factory=dict)
    last_entropy: float | None = None
    cooldown: int = 0


class LifecyclePolicy:
    """Turns snapshot rows (+ the window's per-expert counts) into proposals."""

    def __init__(self, config: LifecycleConfig | None = None):
        self.config = config or LifecycleConfig()
        self._state: dict[int, _LayerState] = {}

    def reset_layer(self, layer: int) -> None:
        """Forget streaks of a layer (expert indices changed)."""
        st = self._state.setdefault(layer, _LayerState())
        st.low_streak.clear()

    def propose(self, rows: Iterable[dict], counts: dict[int, np.ndarray],
                uncertainty: dict[int, float] | None = None) -> list[Proposal]:
        """Proposals for this snapshot.

        rows: SNAPSHOTS dicts of one window (the global row is ignored).
        counts: {layer: per-expert dispatched counts of the same window}.
        uncertainty: optional {layer: mean gate entropy / ln(n)} in [0, 1].
        """
        cfg = self.config
        out: list[Proposal] = []
        for row in rows:
            layer = int(row["layer"])
            if layer == GLOBAL_LAYER or layer not in counts:
                continue
            c = np.asarray(counts[layer], dtype=np.float64)
            n = c.shape[-1]
            st = self._state.setdefault(layer, _LayerState())
            total = c.sum()
            if total <= 0:  # idle window: no evidence either way
                continue
            share = c / total
            for e in range(n):
                st.low_streak[e] = st.low_streak.get(e, 0) + 1 if share[e] < cfg.prune_share else 0
            for e in [k for k in st.low_streak if k >= n]:
                del st.low_streak[e]
            rise = None if st.last_entropy is None else float(row["entropy"]) - st.last_entropy
            st.last_entropy = float(row["entropy"])
            if st.cooldown > 0:
                st.cooldown -= 1
                continue
            p = self._decide(layer, share, n, st, rise, (uncertainty or {}).get(layer))
            if p is not None:
                out.append(p)
        return out

    def _decide(self, layer, share, n, st, rise, unc) -> Proposal | None:
        cfg, en = self.config, self.config.enable
        order = np.argsort(share, kind="stable")
        if "prune" in en and n > cfg.min_experts:
            victims = [int(e) for e in order if st.low_streak.get(int(e), 0) >= cfg.patience]
            if victims:
                e = victims[0]
                return Proposal("prune", layer, e, None,
                                f"share {share[e]:.4f} < {cfg.prune_share} for "
                                f"{st.low_streak[e]} snapshots")
        if "merge" in en and n > cfg.min_experts and n >= 2:
            a, b = int(order[0]), int(order[1])
            limit = cfg.merge_share_factor / n
            if share[a] < limit and share[b] < limit:
                return Proposal("merge", layer, a, b,
                                f"shares {share[a]:.4f}, {share[b]:.4f} < {limit:.4f}")
        if n < cfg.max_experts:
            top = int(order[-1])
            limit = cfg.overload_factor / n
            ev = "split" if cfg.split_overloaded else "clone"
            if ev in en and share[top] > limit:
                return Proposal(ev, layer, top, top, f"share {share[top]:.3f} > {limit:.3f}")
            if "spawn" in en:
                if cfg.spawn_entropy is not None and unc is not None and unc > cfg.spawn_entropy:
                    return Proposal("spawn", layer, -1, None,
                                    f"gate entropy {unc:.3f} > {cfg.spawn_entropy}")
                if cfg.spawn_entropy_rise is not None and rise is not None \
                        and rise > cfg.spawn_entropy_rise:
                    return Proposal("spawn", layer, -1, None,
                                    f"load entropy rose {rise:.3f} > {cfg.spawn_entropy_rise}")
        return None

    def applied(self, layer: int) -> None:
        """Start the cooldown of ``layer`` and forget its streaks (indices moved)."""
        st = self._state.setdefault(layer, _LayerState())
        st.cooldown = self.config.cooldown
        st.low_streak.clear()
        st.last_entropy = None


def apply_proposals(model: LifecycleModel, proposals: Iterable[Proposal], step: int,
                    writer=None, policy: LifecyclePolicy | None = None) -> list[dict]:
    """Ask ``model`` to apply each proposal; log every outcome to ``lifecycle``.

    An applied event also declares the layer's new expert count to ``writer``
    (``RunWriter.declare_experts``), so routing rows of the new size are accepted.

    Returns the LIFECYCLE rows written (applied and refused).
    """
    rows = []
    for p in proposals:
        result = model.apply_lifecycle(p)
        n_after = model.lifecycle_experts().get(p.layer, 0)
        if result is None:
            rows.append(p.row(step, n_after, applied=False))
            continue
        rows.append(p.row(step, n_after, applied=True, expert=result))
        if policy is not None:
            policy.applied(p.layer)
    if writer is not None and rows:
        _declare(writer, rows)
        writer.log_rows("lifecycle", rows)
    return rows


def _declare(writer, rows: list[dict]) -> None:
    """Declare the expert counts applied events leave (the write API refuses undeclared counts)."""
    for r in rows:
        if r["applied"] and r["n_experts_after"] >= 1 and hasattr(writer, "declare_experts"):
            writer.declare_experts(r["layer"], r["n_experts_after"])


def record_event(writer, step: int, layer: int, event: str, expert: int, n_experts_after: int,
                 source_expert: int | None = None, reason: str = "", applied: bool = True) -> dict:
    """Log one event a model took on its own schedule (e.g. staged growth)."""
    row = Proposal(event, layer, expert, source_expert, reason).row(step, n_experts_after, applied)
    if writer is not None:
        _declare(writer, [row])
        writer.log_rows("lifecycle", [row])
    return row
