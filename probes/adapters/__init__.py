"""Adapter registry: how to read one kind of router module.

String-keyed by module class name (so registering a family never imports
transformers). Families that follow the transformers ``*TopKRouter`` convention are rows
of the table in ``conventions``; a family that needs parsing of its own (Switch, JetMoE,
DBRX, Llama-4) has its own module. An adapter says how to
parse the router's own output into a ``probes.routing.Routed`` and how to
read its expert count and top-k from the module. ``install`` is only set for
families whose router module does not return the decision itself (DBRX).
"""
from __future__ import annotations

import importlib
import numbers
import operator
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from torch import nn


def _found(module: nn.Module, names) -> tuple:
    """``(name, value, count)`` of the first of ``names`` holding a count on ``module``, else
    ``(None, None, None)``. Read per router call when the hook's one-lookup read does not apply
    (experts may grow): the instance dict first, the class (properties) only where it has the
    name; nn.Module.__getattr__ (parameters, buffers, submodules: never an int) is skipped, it
    costs microseconds per miss. An int (not a bool) is its own count; a NumPy integer is read
    as an int (``_numpy_count``)."""
    d, cls = module.__dict__, type(module)
    for n in names:
        v = d[n] if n in d else (getattr(module, n, None) if hasattr(cls, n) else None)
        if isinstance(v, int):
            if not isinstance(v, bool):
                return n, v, v
        elif v is not None:
            c = _numpy_count(v)
            if c is not None:
                return n, v, c
    return None, None, None


def _attr(module: nn.Module, names, default=None):
    c = _found(module, names)[2]
    return default if c is None else c


def _numpy_count(v) -> Optional[int]:
    """``v`` as an int if it is a NumPy integer (a count computed with NumPy, e.g. ``mask.sum()``;
    was skipped, and every call of its router lost: 'cannot tell the expert count'), else None
    (a float, a NumPy bool, a tensor: reading a tensor would wait for its device). Read with
    ``operator.index``: torch.compile traces a NumPy scalar as a 0-d array, which
    ``isinstance(v, numbers.Integral)`` does not recognise there."""
    if isinstance(v, (numbers.Integral, np.ndarray)):
        try:
            return operator.index(v)
        except TypeError:
            return None
    return None


_N_EXPERTS = ("n_experts", "num_experts", "num_local_experts", "out_features")


def count_key(module: nn.Module) -> Optional[str]:
    """The name ``default_n_experts`` reads ``module``'s expert count under, when that value
    is an int in the module's own ``__dict__`` (a plain attribute; ``RouterSite.experts_of``
    then reads it with one dict lookup); None otherwise (a property, an int subclass, a NumPy
    integer, no such attribute). The same scan as the full reading (``_found``)."""
    n, v, _ = _found(module, _N_EXPERTS)
    return n if n is not None and n in module.__dict__ and type(v) is int else None


def default_n_experts(module: nn.Module, parent: Optional[nn.Module] = None) -> int:
    n = _attr(module, _N_EXPERTS)
    if n is None:
        raise ValueError(f"cannot tell the expert count of {type(module).__name__}")
    return n


def default_top_k(module: nn.Module, parent: Optional[nn.Module] = None) -> int:
    k = _attr(module, ("top_k", "num_experts_per_tok", "k"))
    if k is None and parent is not None:
        k = _attr(parent, ("top_k", "num_experts_per_tok", "k"))
    return 1 if k is None else k


@dataclass(frozen=True)
class Adapter:
    name: str                       # shown in h.routers and the manifest, e.g. "hf.mixtral"
    classes: tuple[str, ...]        # router module class names this adapter reads
    parse: Callable                 # (module, args, output) -> Routed
    n_experts: Callable = default_n_experts   # (module, parent) -> int, re-read at every flush
    top_k: Callable = default_top_k           # (module, parent) -> int
    accept: Optional[Callable] = None         # (dotted name) -> bool: skip some sites of the class
    # (model, name, module, on_output) -> removable; None = a plain forward hook on the module
    install: Optional[Callable] = None


_REGISTRY: dict[str, Adapter] = {}

# modules that register adapters: ``conventions`` holds the table of families that share the
# (logits, weights, indices) convention; each other module is a family with its own parsing
MODULES = ("conventions", "switch_transformers", "jetmoe", "dbrx", "llama4")


def register(adapter: Adapter) -> Adapter:
    """Register ``adapter`` for each class name it lists (a later registration wins)."""
    for c in adapter.classes:
        _REGISTRY[c] = adapter
    return adapter


def adapter_for(module: nn.Module) -> Optional[Adapter]:
    """The registered adapter for ``module``'s class (or a base class), else None."""
    for cls in type(module).__mro__:
        a = _REGISTRY.get(cls.__name__)
        if a is not None:
            return a
    return None


def registered() -> dict[str, str]:
    """{class name: adapter name} of everything registered."""
    return {c: a.name for c, a in sorted(_REGISTRY.items())}


for _module in MODULES:
    importlib.import_module(f".{_module}", __name__)
