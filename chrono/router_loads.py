"""Per-expert router loads, as the actuators read them: one interface, two sources.

An actuator that needs a router's load (``RouterBiasActuator``: per step;
``InformedLensActuator``: per snapshot window) holds a ``LoadCursor`` and calls
``take()``: the **assignments** (token x top-k slot; capacity-dropped ones included;
every mode) the router made since that cursor's previous ``take()``, as a float32
``[n_experts]`` tensor on the router's device, no host sync. Every cursor is
independent, so two actuators on one router never steal each other's counts.

Sources (``RouterLoads.load_cursor(layer)``):

* a probes ``Handle`` (``probes.loads``): the counts its router hook already keeps
  on the device; no hook of its own. That is what ``chrono.govern(model, handle)``
  hands the actuators. Tokens probes does not count are not load: padding masked out
  by ``attention_mask`` (``padding="exclude"``, the default) and the recompute of an
  activation checkpoint.
* ``HookLoads``: without probes (the governance benchmark, a bare actuator), ONE
  forward hook per router, shared by all its cursors, counting the indices of the
  native protocol output ``(logits, weights, indices[, dropped])``.

For the same router calls (no padding, no recompute) both give the same integers:
``tests/governance/test_router_loads.py`` checks it on a fixed seed.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .hooks import HookRegistry


class LoadError(ValueError):
    """The router's output is not ``(logits, weights, indices[, dropped])``."""


@runtime_checkable
class LoadCursor(Protocol):
    def take(self) -> torch.Tensor:
        """float32 ``[n_experts]`` assignments per expert since the previous take (zeros at first)."""


@runtime_checkable
class RouterLoads(Protocol):
    def load_cursor(self, layer: int) -> LoadCursor:
        """A new, independent cursor over the load of the router of ``layer``."""


def routed_indices(output) -> torch.Tensor:
    """``indices [.., k]`` of a native-protocol router output. Raises ``LoadError``."""
    if isinstance(output, (tuple, list)) and len(output) >= 3:
        return output[2]
    raise LoadError("router output is not (logits, weights, indices[, dropped])")


class _Total:
    """Cumulative int64 assignments per expert of one router (on the device of its last call)."""

    def __init__(self, n_experts: int):
        self.n_experts = int(n_experts)
        self.counts: torch.Tensor | None = None

    def hook(self, module, args, output):
        idx = routed_indices(output).detach().reshape(-1)
        if self.counts is None or self.counts.device != idx.device:
            self.counts = torch.zeros(self.n_experts, dtype=torch.int64, device=idx.device)
        self.counts.scatter_add_(0, idx.long(), torch.ones_like(idx, dtype=torch.int64))
        return None  # a hook that returns a value would replace the router's output


class _HookCursor:
    def __init__(self, total: _Total):   # counts from its creation on
        self._total = total
        self._seen = None if total.counts is None else total.counts.clone()

    def take(self) -> torch.Tensor:
        now = self._total.counts
        if now is None:
            return torch.zeros(self._total.n_experts)
        seen = self._seen if self._seen is not None and self._seen.device == now.device else 0
        out = (now - seen).to(torch.float32)
        self._seen = now.clone()
        return out


class HookLoads:
    """``RouterLoads`` without probes: one counting hook per router, installed at the first cursor.

    ``routers``: ``{layer: (router module, n_experts)}``; ``hooks``: the registry the
    counting hooks go to (``remove()`` of it, or of this object, takes them away).
    """

    def __init__(self, routers: dict[int, tuple[nn.Module, int]], hooks: HookRegistry | None = None):
        self._routers = routers
        self.hooks = HookRegistry(parent=hooks)
        self._totals: dict[int, _Total] = {}

    def load_cursor(self, layer: int) -> LoadCursor:
        total = self._totals.get(layer)
        if total is None:
            router, n = self._routers[layer]
            total = self._totals[layer] = _Total(n)
            self.hooks.forward(router, total.hook)
        return _HookCursor(total)

    def remove(self) -> None:
        self.hooks.remove()
