"""Governance controller: snapshots in, per-layer decisions out (DESIGN §4, §6).

``Controller.update(rows, lenses)`` turns one window's snapshot rows into one
``ControlDecision`` per layer and sets the scale of any lens registered for that
layer (anything with ``set_scale(float)``). Two modes (``ControlConfig.mode``):

* ``faithful``: ChronoMoE's policy, the pure functions of :mod:`.policy` (debt ->
  pressure -> lens scale with harm guard);
* ``setpoint``: PI feedback of :mod:`.setpoint` regulating each layer's Neff to
  ``neff_target · n``; the effort u in [0, 1] drives every actuator.

It imports no torch, keeps all state in ``ControlState`` and is deterministic:
the same rows in the same order give the same decisions, which is what
``chrono replay`` checks.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from . import policy, setpoint
from ..schema import DECISIONS, GLOBAL_LAYER
from ..store.layout import DECISIONS_JSONL

# Files a governed run keeps in its run directory (next to the Parquet tables).
JSONL_NAME = DECISIONS_JSONL   # decisions mirrored one JSON object per line (ChronoMoE format)
CONFIG_NAME = "control_config.json"      # the ControlConfig, so `chrono replay` re-derives decisions

MODES = ("faithful", "setpoint")
# What each actuator reads from a decision, per mode (the rest is marked informational).
READS = {
    "faithful": {"lens": "lens_scale", "informed-lens": "lens_scale", "bias": "pressure",
                 "aux": "pressure", "temperature": "heat"},
    "setpoint": {"lens": "lens_scale", "informed-lens": "lens_scale", "bias": "pressure",
                 "aux": "pressure", "temperature": "heat"},
}
# Which computed signals each signal is derived from (so consuming one consumes its inputs).
DERIVED_FROM = {
    "faithful": {"lens_scale": ("pressure", "backoff"), "pressure": ("debt",), "heat": ("pressure",),
                 "forgetting": ("pressure",)},
    "setpoint": {"lens_scale": ("effort",), "pressure": ("effort",), "heat": ("effort",),
                 "effort": ("error", "integral"), "integral": ("error",), "forgetting": ("pressure",)},
}
COMPUTED = {"faithful": ("debt", "pressure", "heat", "forgetting", "lens_scale", "backoff"),
            "setpoint": ("debt", "pressure", "heat", "forgetting", "lens_scale", "backoff",
                         "error", "integral", "effort")}

def read_config(run_dir) -> dict | None:
    """The stored ``control_config.json`` of a run directory as a dict; None when there is none.
    Raises ValueError (naming the file) when it is not JSON or not a JSON object."""
    import json
    from pathlib import Path

    path = Path(run_dir) / CONFIG_NAME
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: a control config is a JSON object of fields, not a {type(d).__name__}")
    return d


__all__ = ["JSONL_NAME", "CONFIG_NAME", "MODES", "read_config", "ControlConfig", "ControlState", "LayerState",
           "ControlDecision", "Controller", "informational", "policy", "setpoint"]


def informational(mode: str, actuators) -> tuple[str, ...]:
    """Signals the controller computes in ``mode`` that no actuator in ``actuators`` consumes.

    ``actuators``: names (``"bias"``) or a ``"+"``-joined label (``"bias+aux"``); unknown
    names consume nothing. Example: informational("faithful", "lens") == ("forgetting", "heat").
    """
    names = actuators.split("+") if isinstance(actuators, str) else list(actuators)
    todo = [READS[mode][a] for a in names if a in READS[mode]]
    used: set[str] = set()
    while todo:
        sig = todo.pop()
        if sig not in used:
            used.add(sig)
            todo.extend(DERIVED_FROM[mode].get(sig, ()))
    return tuple(sorted(s for s in COMPUTED[mode] if s not in used))


@dataclass(frozen=True)
class ControlConfig:
    """Knobs of the policy. Defaults are DESIGN §4's numbers (faithful mode).

    ``actuator`` is the label written in each decision's ``actuator`` column
    (which actuators consumed the decision, e.g. ``"lens"`` or ``"bias+aux"``).
    While abstaining the applied scale is 0 (lenses become the identity).

    ``mode="setpoint"`` regulates each layer's Neff to ``neff_target · n`` with PI
    feedback (``kp``, ``ki``, ``integral_max``; see :mod:`.setpoint`); ``integral_init``
    presets every layer's integral (bumpless start: the actuators get
    ``setpoint.initial_effort(integral_init)`` from step 0, see ``Controller.initial_decisions``).
    ``neff_target`` is a fraction of the layer's expert count in (0, 1], one
    float for every layer or ``{layer: fraction}`` (layers not named use
    ``setpoint.NEFF_TARGET``). The faithful fields (warm-up, s_max) still bound
    the lens scale in setpoint mode. Raises ValueError for an unknown mode or a
    target outside (0, 1].
    """

    actuator: str = "lens"
    warmup_steps: int = policy.WARMUP_STEPS
    s_max_warmup: float = policy.S_MAX_WARMUP
    s_max: float = policy.S_MAX
    mode: str = "faithful"
    neff_target: float | dict = setpoint.NEFF_TARGET
    kp: float = setpoint.KP
    ki: float = setpoint.KI
    integral_max: float = setpoint.INTEGRAL_MAX
    integral_init: float = 0.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown controller mode {self.mode!r}; choose from {', '.join(MODES)}")
        t = self.neff_target
        if isinstance(t, dict):
            object.__setattr__(self, "neff_target", {int(k): float(v) for k, v in t.items()})
            values = list(self.neff_target.values())
        else:
            object.__setattr__(self, "neff_target", float(t))
            values = [self.neff_target]
        if any(not 0.0 < v <= 1.0 for v in values):
            raise ValueError(f"neff_target is a fraction of the expert count in (0, 1], got {t!r}")
        if self.kp < 0 or self.ki < 0 or self.integral_max < 0:
            raise ValueError("kp, ki and integral_max must be >= 0")
        if not 0.0 <= self.integral_init <= self.integral_max:
            raise ValueError(f"integral_init must be in [0, integral_max={self.integral_max}], "
                             f"got {self.integral_init!r}")

    def target_fraction(self, layer: int) -> float:
        t = self.neff_target
        return t.get(int(layer), setpoint.NEFF_TARGET) if isinstance(t, dict) else t

    def to_dict(self) -> dict:
        d = asdict(self)
        if isinstance(d["neff_target"], dict):   # JSON keys are strings; from_dict turns them back
            d["neff_target"] = {str(k): v for k, v in d["neff_target"].items()}
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "ControlConfig":
        """Raises ValueError for unknown fields or a value that is not a JSON object."""
        if d is not None and not isinstance(d, dict):
            raise ValueError(f"a control config is a JSON object of fields, not a {type(d).__name__}")
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
    integral: float = 0.0   # setpoint mode: the PI integral


@dataclass
class ControlState:
    """Everything the controller remembers between windows, per layer."""

    layers: dict[int, LayerState] = field(default_factory=dict)


TABLE_FIELDS = tuple(f.name for f in DECISIONS if f.name != "run_id")


@dataclass(frozen=True)
class ControlDecision:
    """One layer's decision for one snapshot window.

    The first 13 fields are the ``decisions`` table's columns (DESIGN §3). Column
    meaning per mode: ``debt`` is ChronoMoE's topology debt in both modes;
    ``pressure`` is what drives the actuators (faithful: the EMA of debt;
    setpoint: the PI effort u); ``heat`` = clip(pressure, 0, 1);
    ``lens_scale`` = faithful policy / setpoint u·s_max(step); ``backoff`` is the
    harm guard (setpoint: 1.0, no guard). The rest exist in memory and in
    ``control_decisions.jsonl`` only: ``mode``; ``target`` (set point in experts),
    ``error``, ``integral``, ``effort`` (setpoint mode, else None) and
    ``informational`` (computed signals no attached actuator consumes).
    """

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
    mode: str = "faithful"
    target: float | None = None
    error: float | None = None
    integral: float | None = None
    effort: float | None = None
    informational: tuple = ()

    def as_row(self, run_id: str | None = None) -> dict:
        """The ``decisions`` table row (its columns only)."""
        d = {k: getattr(self, k) for k in TABLE_FIELDS}
        if run_id is not None:
            d = {"run_id": run_id, **d}
        return d

    def as_record(self, run_id: str | None = None) -> dict:
        """Every field (the JSONL mirror's line): the table row plus the setpoint terms."""
        d = asdict(self)
        d["informational"] = list(self.informational)
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
        self.informational = informational(self.config.mode, self.config.actuator)

    def _bounds(self) -> dict:
        """The lens-scale bounds of ``policy.s_max`` / ``policy.lens_scale`` from the config."""
        c = self.config
        return dict(warmup_steps=c.warmup_steps, warmup_max=c.s_max_warmup, late_max=c.s_max)

    def _new_layer(self) -> LayerState:
        c = self.config
        return LayerState(integral=c.integral_init if c.mode == "setpoint" else 0.0)

    def initial_decisions(self) -> list[ControlDecision]:
        """What the actuators apply before the first window (setpoint mode with ``integral_init`` > 0).

        One decision per configured layer at step -1, effort ``setpoint.initial_effort(integral_init)``
        (error taken as 0: nothing measured yet). A pure function of the config, so not stored:
        ``chrono replay`` re-derives the stored decisions, which start from the same preset
        integral. Empty list otherwise (the actuators' own rest state applies).
        """
        c = self.config
        if c.mode != "setpoint" or c.integral_init <= 0:
            return []
        u = setpoint.initial_effort(c.integral_init)
        s = u * policy.s_max(0, **self._bounds())
        return [ControlDecision(-1, layer, c.actuator, 0.0, u, policy.heat(u), policy.forgetting(u), s, 1.0,
                                False, f"initial: integral preset, effort {u:.3f}", None, None, mode="setpoint",
                                target=setpoint.target(c.target_fraction(layer), n),
                                error=0.0, integral=c.integral_init, effort=u,
                                informational=self.informational)
                for layer, n in sorted(self.n_experts.items())]

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
        st = self.state.layers.get(layer) or self.state.layers.setdefault(layer, self._new_layer())
        n = int(row.get("n_experts") or self.n_experts.get(layer, 0))
        neff, top2, dead = float(row["neff"]), float(row["top2_share"]), int(row["dead"])
        label, mode, info = self.config.actuator, self.config.mode, self.informational
        if int(row.get("token_count", 1)) == 0:
            st.last_scale = 0.0
            extra = {}
            if mode == "setpoint":
                extra = dict(target=setpoint.target(self.config.target_fraction(layer), n),
                             error=None, integral=st.integral, effort=0.0)
            return ControlDecision(step, layer, label, 0.0, st.pressure, policy.heat(st.pressure),
                                   policy.forgetting(st.pressure), 0.0, st.backoff, True,
                                   "idle: no traffic in window", neff, top2, mode=mode,
                                   informational=info, **extra)
        debt = policy.topology_debt(neff, top2, dead, n)
        if mode == "setpoint":
            return self._decide_setpoint(st, step, layer, n, neff, top2, debt)
        st.pressure = policy.next_pressure(st.pressure, debt)
        st.backoff = policy.next_backoff(st.backoff, st.last_top2, top2, st.last_scale)
        s = policy.lens_scale(st.pressure, step, st.backoff, **self._bounds())
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
                               neff, top2, informational=self.informational)

    def _decide_setpoint(self, st: LayerState, step: int, layer: int, n: int, neff: float,
                         top2: float, debt: float) -> ControlDecision:
        c = self.config
        tgt = setpoint.target(c.target_fraction(layer), n)
        err = setpoint.error(neff, tgt)
        st.integral, u = setpoint.pi_step(st.integral, err, c.kp, c.ki, c.integral_max)
        st.pressure, st.backoff = u, 1.0
        s = u * policy.s_max(step, **self._bounds())
        abstain = u == 0.0
        reason = ("abstain: at or above the Neff target" if abstain else
                  f"act: Neff {neff:.2f} vs target {tgt:.2f}, effort {u:.3f}")
        st.last_top2, st.last_scale = top2, s
        st.decisions += 1
        return ControlDecision(step, layer, c.actuator, debt, u, policy.heat(u), policy.forgetting(u),
                               s, 1.0, abstain, reason, neff, top2, mode="setpoint", target=tgt,
                               error=err, integral=st.integral, effort=u,
                               informational=self.informational)
