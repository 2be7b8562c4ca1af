"""The set-point policy: PI feedback on each layer's Neff, pure functions, no torch.

ChronoMoE's policy (``policy``, the ``faithful`` mode) has zero debt once
Neff >= 0.6·n, so it stops pushing there (DESIGN §6). The ``setpoint`` mode
regulates each layer to a configurable target instead:

* target  T = neff_target · n (``neff_target`` a fraction of the expert count n, per layer);
* error   e = (T − Neff) / T: positive below the target, negative above it, e <= 1;
* integral I ← clip(I + ki·e, 0, i_max), *not* updated while the output is saturated
  at 1 and the error is still positive (conditional integration, an anti-windup rule
  of Åström & Hägglund, "Advanced PID Control", 2006, §3.5);
* effort  u = clip(kp·e + I, 0, 1): the fraction of its range each actuator uses
  (aux weight α_min → α_max, bias rate 0 → rate, temperature 1 → t_max, lens scale 0 → s_max).

Bumpless start ("start balanced"): the integral may start at ``integral_init`` I0 in
[0, integral_max] instead of 0. Before the first window has been measured the error is
taken as 0, so the actuators start at u0 = clip(I0) (``initial_effort``) from step 0; the
first update then continues from I0 (no jump in the law), and above the target the
integral unwinds from I0 towards 0 as usual (anti-windup unchanged). Use it when a
workload collapses before the first window closes: the effort a fixed-weight baseline
shows is needed early is applied at once, and the loop only relaxes it while Neff stays
above the set point.

A window runs one update (the windows are the controller's sample period). With the
defaults (kp 2, ki 0.2) a layer at Neff 3 of 8 (target 6.4) saturates (u = 1); at the
target the effort is whatever the integral has settled to, which is the balancing this
layer needs there and no more; above the target the integral unwinds and u drops to 0.
"""
from __future__ import annotations

from .policy import clip

KP = 2.0
KI = 0.2
INTEGRAL_MAX = 1.0
NEFF_TARGET = 0.8


def initial_effort(integral_init: float) -> float:
    """Effort before the first measurement: the PI output at zero error, clip(I0, 0, 1)."""
    return clip(float(integral_init), 0.0, 1.0)


def target(neff_target: float, n_experts: int) -> float:
    """Set point in experts: ``neff_target · n`` (``neff_target`` in (0, 1])."""
    return float(neff_target) * int(n_experts)


def error(neff: float, target_neff: float) -> float:
    """Normalised error (T − Neff) / T; 0 when T <= 0."""
    t = float(target_neff)
    return 0.0 if t <= 0 else (t - float(neff)) / t


def pi_step(integral: float, err: float, kp: float = KP, ki: float = KI,
            integral_max: float = INTEGRAL_MAX) -> tuple[float, float]:
    """One PI update: returns (new integral, effort u in [0, 1]).

    Conditional integration: the integral does not grow while the output is
    saturated at 1 with the error still positive (u_raw > 1, e > 0); otherwise it
    moves by ki·e and is clipped to [0, integral_max] (above the target it unwinds
    down to 0, the effort needed at the target).
    Examples: pi_step(0, 0.6) -> (0.0, 1.0) (saturated, no windup);
    pi_step(0.3, 0.05) -> (0.31, 0.41); pi_step(0.3, -0.2) -> (0.26, 0.0).
    """
    raw = kp * err + integral
    if not (raw > 1.0 and err > 0):
        integral = clip(integral + ki * err, 0.0, integral_max)
    return integral, clip(kp * err + integral, 0.0, 1.0)
