"""Governance controller: snapshots in, per-layer decisions out (DESIGN §4, §6).

``Controller.update(rows, lenses)`` turns one window's snapshot rows into one
``ControlDecision`` per layer, using only the pure functions of
:mod:`chrono.controller.policy`, and sets the scale of any lens registered for
that layer (anything with ``set_scale(float)``). It imports no torch, keeps all
state in ``ControlState`` and is deterministic: the same rows in the same order
give the same decisions, which is what ``chrono replay`` checks.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from . import policy
from ..schema import GLOBAL_LAYER

# Files a governed run keeps in its run directory (next to the Parquet tables).
JSONL_NAME = "control_decisions.jsonl"   # decisions mirrored one JSON object per line (ChronoMoE format)
CONFIG_NAME = "control_config.json"      # the ControlConfig, so `chrono replay` re-derives decisions

__all__ = ["JSONL_NAME", "CONFIG_NAME", "ControlConfig", "ControlState", "LayerState", "ControlDecision", "Controller", "policy"]


@dataclass(frozen=True)
class ControlConfig:
    """Knobs of the policy. Defaults are DESIGN §4's numbers.

    ``actuator`` is the label written in each decision's ``actuator`` column
    (which actuators consumed the decision, e.g. ``"lens"`` or ``"bias+aux"``).
    While abstaining the applied scale is 0 (lenses become the identity).
    """

    actuator: str = "lens"
    warmup_steps: int = policy.WARMUP_STEPS
    s_max_warmup: float = policy.S_MAX_WARMUP
    s_max: float = policy.S_MAX

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "ControlConfig":
        d = dict(d or {})
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ControlConfig fields: {sorted(unknown)}")
        return cls(**d)


@dataclass
class LayerState:
    pressure: float = 0.0
    backoff: float = 1.0
    last_top2: float | None = None
    last_scale: float = 0.0
    decisions: int = 0


@dataclass
class ControlState:
    """Everything the controller remembers between windows, per layer."""

    layers: dict[int, LayerState] = field(default_factory=dict)


@dataclass(frozen=True)
class ControlDecision:
    """One layer's decision for one snapshot window (a DECISIONS row without run_id)."""

    step: int
    layer: int
    actuator: str
    debt: float
    pressure: float
    heat: float
    forgetting: float
    lens_scale: float
    backoff: float
    abstain: bool
    reason: str
    neff: float | None
    top2_share: float | None

    def as_row(self, run_id: str | None = None) -> dict:
        d = asdict(self)
        if run_id is not None:
            d = {"run_id": run_id, **d}
        return d


class Controller:
    """Pure policy loop over snapshot windows; one decision per layer per window."""

    def __init__(self, n_layers: int, n_experts_per_layer, config: ControlConfig | None = None):
        if int(n_layers) < 0:
            raise ValueError("n_layers must be >= 0")
        self.n_layers = int(n_layers)
        if isinstance(n_experts_per_layer, int):
            self.n_experts = {i: n_experts_per_layer for i in range(self.n_layers)}
        elif isinstance(n_experts_per_layer, dict):
            self.n_experts = {int(k): int(v) for k, v in n_experts_per_layer.items()}
        else:
            self.n_experts = {i: int(v) for i, v in enumerate(n_experts_per_layer)}
        self.config = config or ControlConfig()
        self.state = ControlState()

    def _s_max(self, step: int) -> float:
        c = self.config
        return c.s_max_warmup if step < c.warmup_steps else c.s_max

    def update(self, snapshot_rows: list[dict], lenses: dict | None = None) -> list[ControlDecision]:
        """Decide for every layer present in one window's rows (global row ignored).

        A layer whose window had no traffic is *idle*: its state is untouched, it
        abstains with reason "idle" and its lens goes back to identity.
        """
        out: list[ControlDecision] = []
        rows = sorted((r for r in snapshot_rows if int(r["layer"]) != GLOBAL_LAYER),
                      key=lambda r: int(r["layer"]))
        for row in rows:
            d = self._decide(row)
            out.append(d)
            lens = (lenses or {}).get(d.layer)
            if lens is not None:
                lens.set_scale(d.lens_scale)
        return out

    def _decide(self, row: dict) -> ControlDecision:
        layer, step = int(row["layer"]), int(row["step"])
        st = self.state.layers.setdefault(layer, LayerState())
        n = int(row.get("n_experts") or self.n_experts.get(layer, 0))
        neff, top2, dead = float(row["neff"]), float(row["top2_share"]), int(row["dead"])
        label = self.config.actuator
        if int(row.get("token_count", 1)) == 0:
            st.last_scale = 0.0
            return ControlDecision(step, layer, label, 0.0, st.pressure, policy.heat(st.pressure),
                                   policy.forgetting(st.pressure), 0.0, st.backoff, True,
                                   "idle: no traffic in window", neff, top2)
        debt = policy.topology_debt(neff, top2, dead, n)
        st.pressure = policy.next_pressure(st.pressure, debt)
        st.backoff = policy.next_backoff(st.backoff, st.last_top2, top2, st.last_scale)
        s = policy.clip(min(st.pressure, policy.SCALE_CAP), 0.0, self._s_max(step)) * st.backoff
        reason = policy.abstain_reason(st.backoff, st.pressure)
        abstain = reason is not None
        if abstain:
            s = 0.0
        else:
            reason = f"act: debt {debt:.3f}, pressure {st.pressure:.3f}"
        st.last_top2, st.last_scale = top2, s
        st.decisions += 1
        return ControlDecision(step, layer, label, debt, st.pressure, policy.heat(st.pressure),
                               policy.forgetting(st.pressure), s, st.backoff, abstain, reason,
                               neff, top2)
