"""``probes.attach``'s options, checked before anything is attached: one ``ProbeError`` line each.

A user mistake (a string where a number goes, a bool for a count, a port out of range) is refused
here with the option's name, the accepted values and what was given, instead of failing later
inside a hook, a sampler or a server with a bare ``ValueError``.
"""
from __future__ import annotations

import numbers

from torch import nn

from .routing import ProbeError

STEP_RULES = ("auto", "optimizer", "forward", "manual")


def _int(x) -> bool:
    """An integer that is not a bool (``True`` is an ``int`` in Python)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_options(model, *, flush_every, tokens, padding, steps, start_step, staging,
                  max_tokens_per_step, seed, metrics_port) -> None:
    """Raise ``ProbeError`` for the first option that is not one ``attach`` accepts.

    ``steps`` is a rule name here (a handle to follow was resolved to ``"manual"`` before)."""
    if not isinstance(model, nn.Module):
        raise ProbeError(f"attach() needs a torch.nn.Module, got {type(model).__name__}")
    if not _int(flush_every) or flush_every < 1:
        raise ProbeError(f"flush_every must be an int >= 1, got {flush_every!r}")
    if not isinstance(tokens, numbers.Real) or isinstance(tokens, bool) or not (0.0 <= float(tokens) <= 1.0):
        raise ProbeError(f"tokens must be 0 (aggregate only) or a fraction in (0, 1], got {tokens!r}")
    if not _int(max_tokens_per_step) or max_tokens_per_step < 1:
        raise ProbeError(f"max_tokens_per_step must be an int >= 1, got {max_tokens_per_step!r}")
    if not _int(seed):
        raise ProbeError(f"seed must be an int, got {seed!r}")
    if padding not in ("exclude", "count"):
        raise ProbeError(f"padding must be 'exclude' (default) or 'count', got {padding!r}")
    if not isinstance(staging, bool):
        raise ProbeError(f"staging must be True (default) or False, got {staging!r}")
    if steps not in STEP_RULES:
        raise ProbeError(f"steps must be 'auto', 'optimizer', 'forward', 'manual' or a probes "
                         f"Handle to follow, got {steps!r}")
    if start_step is not None and (not _int(start_step) or start_step < 0):
        raise ProbeError(f"start_step must be None or an int >= 0, got {start_step!r}")
    if metrics_port is not None and (not _int(metrics_port) or not 0 <= metrics_port <= 65535):
        raise ProbeError(f"metrics_port must be None or a TCP port 0-65535 (0: any free one), got {metrics_port!r}")
