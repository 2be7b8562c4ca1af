"""What a router decided, in one shape every adapter converts to.

Adapters read the router module's own outputs (never recompute top-k from
logits: biased / grouped routing and capacity drops make that wrong) and
return a ``Routed``: ``indices [T, k]`` (long), optional ``weights [T, k]``,
optional ``dropped [T, k]`` (bool, assignment routed but not processed) and
optional ``logits [T, E]`` (only used to flag non-finite values). ``T`` is the
router call's tokens, ``k`` its top-k. A ``Routed`` is the typed record of one router
call, from the hook to ``Recorder.record`` (the later records: ``probes.records``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from chrono.attach import AttachError


class ProbeError(AttachError):
    """A user-facing problem attaching probes (no router found, bad spec...)."""


class Routed(NamedTuple):
    indices: torch.Tensor
    weights: Optional[torch.Tensor] = None
    dropped: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None


def from_protocol(out) -> Routed:
    """Convert the native-router tuple ``(logits, weights, indices[, dropped])`` to ``Routed``.

    Also accepts a ``Routed`` or a dict with those keys (what a ``RouterSpec``
    parse function may return).
    """
    if isinstance(out, Routed):
        return out
    if isinstance(out, dict):
        return Routed(out["indices"], out.get("weights"), out.get("dropped"), out.get("logits"))
    if isinstance(out, (tuple, list)) and len(out) in (3, 4):
        logits, weights, indices = out[0], out[1], out[2]
        dropped = out[3] if len(out) == 4 else None
        return Routed(indices, weights, dropped, logits)
    raise TypeError(
        "expected (logits, weights, indices[, dropped]), a probes.Routed or a dict with 'indices'; "
        f"got {type(out).__name__}")


def topk_triple(module, args, output) -> Routed:
    """Parser for the transformers 5.x router convention ``(logits, top_k_weights, top_k_index)``."""
    logits, weights, indices = output[0], output[1], output[2]
    k = indices.shape[-1]   # (a reshape is a dispatcher call even when it changes nothing)
    if indices.dim() != 2:
        indices = indices.reshape(-1, k)
    if weights is not None and weights.dim() != 2:
        weights = weights.reshape(-1, k)
    return Routed(indices, weights, None, logits)
