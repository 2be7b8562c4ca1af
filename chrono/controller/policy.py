"""The governance policy as pure functions of snapshot metrics (DESIGN §4). No torch.

Every formula follows ChronoMoE's controller as specified in DESIGN §4:

* topology debt = 0.4·clip((0.6n − Neff)/(0.6n)) + 0.4·clip((Top2 − 0.75)/0.25)
  + 0.2·clip(dead / max(1, n − 1)), each term and the sum clipped to [0, 1];
* pressure ← 0.8·pressure + 0.2·debt (an EMA, so one bad window does not swing it);
* heat = clip(pressure, 0, 1); forgetting = 0.02 + 0.10·pressure;
* lens scale s = clip(min(pressure, 0.5), 0, s_max)·backoff, s_max 0.02 before
  step 100 (warm-up: routing is still forming) and 0.5 after;
* harm guard: if Top2 rose by more than 0.02 after a scale > 0.01 was applied,
  backoff halves, otherwise it recovers by +0.2·(1 − backoff);
* abstain when backoff < 0.15 or pressure < 0.01 (the applied scale is then 0).
"""
from __future__ import annotations

# The debt's knees are the PRE_COLLAPSE thresholds; chrono.snapshots (the alert rules) owns them.
from ..snapshots import PRE_NEFF_FRACTION, PRE_TOP2 as TOP2_KNEE

PRESSURE_DECAY = 0.8
WARMUP_STEPS = 100
S_MAX_WARMUP = 0.02
S_MAX = 0.5
SCALE_CAP = 0.5
HARM_TOP2_RISE = 0.02
HARM_MIN_SCALE = 0.01
BACKOFF_RECOVERY = 0.2
ABSTAIN_BACKOFF = 0.15
ABSTAIN_PRESSURE = 0.01


def clip(x: float, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo if x < lo else hi if x > hi else x


def topology_debt(neff: float, top2_share: float, dead: int, n_experts: int) -> float:
    """How far a layer's routing is from healthy, in [0, 1] (0 = healthy).

    Examples (n=4): shares [.5,.5,0,0] -> 0.6; [1,0,0,0] -> 0.8333; [.7,.1,.1,.1] -> 0.08.
    """
    n = int(n_experts)
    if n <= 0:
        return 0.0
    target = PRE_NEFF_FRACTION * n
    neff_term = clip((target - float(neff)) / target)
    top2_term = clip((float(top2_share) - TOP2_KNEE) / (1.0 - TOP2_KNEE))
    dead_term = clip(float(dead) / max(1, n - 1))
    return clip(0.4 * neff_term + 0.4 * top2_term + 0.2 * dead_term)


def next_pressure(pressure: float, debt: float) -> float:
    """EMA of debt: 0.8·pressure + 0.2·debt (debt 0.6 from 0: 0.12, 0.216, 0.2928, ...)."""
    return PRESSURE_DECAY * float(pressure) + (1.0 - PRESSURE_DECAY) * float(debt)


def heat(pressure: float) -> float:
    return clip(float(pressure), 0.0, 1.0)


def forgetting(pressure: float) -> float:
    return 0.02 + 0.10 * float(pressure)


def s_max(step: int, warmup_steps: int = WARMUP_STEPS, warmup_max: float = S_MAX_WARMUP,
          late_max: float = S_MAX) -> float:
    """Largest lens scale allowed at ``step``: ``warmup_max`` before ``warmup_steps``, then ``late_max``.

    Defaults are ChronoMoE's (0.02 before step 100, then 0.5); ``ControlConfig``
    passes its own ``warmup_steps`` / ``s_max_warmup`` / ``s_max``.
    """
    return warmup_max if int(step) < warmup_steps else late_max


def lens_scale(pressure: float, step: int, backoff: float, warmup_steps: int = WARMUP_STEPS,
               warmup_max: float = S_MAX_WARMUP, late_max: float = S_MAX) -> float:
    """s = clip(min(pressure, 0.5), 0, s_max(step)) · backoff (bounds as in ``s_max``)."""
    limit = s_max(step, warmup_steps, warmup_max, late_max)
    return clip(min(float(pressure), SCALE_CAP), 0.0, limit) * float(backoff)


def next_backoff(backoff: float, prev_top2: float | None, top2: float, prev_scale: float) -> float:
    """Harm guard: halve when Top2 rose > 0.02 after a scale > 0.01, else recover 20 % of the gap to 1."""
    harmed = (prev_top2 is not None and prev_scale > HARM_MIN_SCALE
              and float(top2) - float(prev_top2) > HARM_TOP2_RISE)
    if harmed:
        return 0.5 * float(backoff)
    return float(backoff) + BACKOFF_RECOVERY * (1.0 - float(backoff))


def abstain_reason(backoff: float, pressure: float) -> str | None:
    """Why the controller should not act now, or None when it should."""
    if backoff < ABSTAIN_BACKOFF:
        return "abstain: backoff < 0.15 (harm guard)"
    if pressure < ABSTAIN_PRESSURE:
        return "abstain: pressure < 0.01 (healthy)"
    return None
