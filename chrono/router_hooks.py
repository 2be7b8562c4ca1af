"""Hooks that change what a router decides, on routers we may not edit (HF transformers).

Everything is installed through a ``chrono.hooks.HookRegistry`` (``HookSet`` is its
old name): one owner's hooks, removed last first by ``remove()``, optionally nested
under a probes handle's registry so that detach unwinds them too. Two overrides,
both exact no-ops until switched on:

* ``SelectionBias``: loss-free balancing on routers that own no bias tensor. A
  forward hook, *prepended* so probes and load counters see the decision the
  model really used, replaces the router's (logits, weights, indices) by
  indices = top-k(logits + b) and weights = the router's own *unbiased* gate
  values of those experts (softmax over the logits, renormalised when the family
  renormalises). Source: Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing
  Strategy for Mixture-of-Experts" (arXiv:2408.15664) §3: the bias enters top-k
  selection only. The bias lives in logit space, i.e. it multiplies an expert's
  selection odds by exp(b) for every token.
* ``InputTemperature``: router temperature T on linear routers without a bias
  term, as a forward pre-hook x -> x / T, so logits = W·x / T (softmax or sigmoid
  of logits / T inside the router).

Supported router classes (transformers 5.x): ``SOFTMAX_TOPK`` below and HF
DeepSeek-V3 ``DeepseekV3TopkRouter`` (which owns ``e_score_correction_bias``, so
bias balancing uses that tensor directly, see ``chrono.actuators``).
"""
from __future__ import annotations

import torch
from torch import nn

from .hooks import HookRegistry

# class name -> when top-k weights are renormalised: "always" or the name of a bool attribute
SOFTMAX_TOPK = {
    "MixtralTopKRouter": "always",
    "Qwen2MoeTopKRouter": "norm_topk_prob",
    "Qwen3MoeTopKRouter": "norm_topk_prob",
    "OlmoeTopKRouter": "norm_topk_prob",
}
LINEAR_ROUTERS = tuple(SOFTMAX_TOPK) + ("DeepseekV3TopkRouter",)


class HookError(ValueError):
    """The router is not one these hooks know how to steer."""


def family(router: nn.Module, known=LINEAR_ROUTERS) -> str | None:
    """The first class name in ``router``'s MRO that is in ``known``, else None."""
    for cls in type(router).__mro__:
        if cls.__name__ in known:
            return cls.__name__
    return None


HookSet = HookRegistry   # the name benchmarks and earlier code use


def lens_pre_hook(lens: nn.Module):
    """Forward pre-hook applying ``lens`` to a router's first positional input (x -> lens(x)).

    The one place a lens meets a router: ``probes.attach(lenses=...)`` and
    ``chrono.actuators.LensActuator`` both install this.
    """
    def apply_lens(module, args):
        if not args:
            return None
        return (lens(args[0]),) + tuple(args[1:])
    return apply_lens


class SelectionBias:
    """Per-expert selection bias ``b`` [n_experts] float32 on an HF softmax top-k router.

    ``bias`` is updated in place by the owner; call ``set_active(True)`` once it
    is non-zero (the hook then recomputes the decision; while inactive it
    returns None and the router's own output passes untouched). Raises
    HookError for a router class not in ``SOFTMAX_TOPK``.
    """

    def __init__(self, router: nn.Module, n_experts: int):
        name = family(router, SOFTMAX_TOPK)
        if name is None:
            raise HookError(f"router {type(router).__name__} is not a softmax top-k router chrono can "
                            f"bias (known: {', '.join(SOFTMAX_TOPK)})")
        self.renorm = SOFTMAX_TOPK[name]
        w = getattr(router, "weight", None)
        device = w.device if isinstance(w, torch.Tensor) else torch.device("cpu")
        self.bias = torch.zeros(int(n_experts), dtype=torch.float32, device=device)
        self.active = False
        self.hooks = HookRegistry()
        self.hooks.forward(router, self._hook, prepend=True)

    def set_active(self, on: bool) -> None:
        self.active = bool(on)

    def _hook(self, module, args, output):
        if not self.active:
            return None
        logits, weights, idx = output[0], output[1], output[2]
        z = logits.float()
        sel = torch.topk(z + self.bias.to(z.device), idx.shape[-1], dim=-1).indices   # [T, k]
        w = torch.softmax(z, dim=-1).gather(-1, sel)                                 # unbiased gate values
        if self.renorm == "always" or getattr(module, self.renorm, False):
            w = w / w.sum(dim=-1, keepdim=True)
        return (logits, w.to(weights.dtype), sel.to(idx.dtype)) + tuple(output[3:])

    def remove(self) -> None:
        self.hooks.remove()


class InputTemperature:
    """Router temperature on a bias-free linear router: pre-hook x -> x / T (T = 1: untouched).

    Raises HookError for a router class not in ``LINEAR_ROUTERS`` (a router with
    an additive logit bias would not compute logits / T from x / T).
    """

    def __init__(self, router: nn.Module):
        if family(router) is None:
            raise HookError(f"router {type(router).__name__} has no known linear logits for a "
                            f"temperature (known: {', '.join(LINEAR_ROUTERS)})")
        self.temperature = 1.0
        self.hooks = HookRegistry()
        self.hooks.pre(router, self._pre)

    def _pre(self, module, args):
        if self.temperature == 1.0 or not args:
            return None
        return (args[0] / self.temperature,) + tuple(args[1:])

    def remove(self) -> None:
        self.hooks.remove()
