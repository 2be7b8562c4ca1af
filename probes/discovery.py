"""Finding router sites in a model: explicit specs, registered adapters, native routers, generic guess.

Order of precedence for a module: a matching ``RouterSpec``, then the native
protocol (``chrono_router = True``), then the adapter registry (by class
name). Only when none of those finds anything does the generic fallback look
for ``gate`` / ``router`` modules (the transformers ``*TopKRouter``
convention, or a ``Linear`` whose ``out_features`` is the expert count) and
log what it guessed. Nothing found -> ``ProbeError`` listing candidates.
"""
from __future__ import annotations

import fnmatch
import logging
import re
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from . import adapters as A
from .routing import ProbeError, Routed, from_protocol

log = logging.getLogger("probes")


def describe(model: nn.Module, routers: list) -> dict:
    """The manifest's model description: layers, experts per layer, top-k, adapters, sites."""
    return {
        "name": type(model).__name__,
        "layers": [s.layer for s in routers],
        "experts_per_layer": {str(s.layer): s.n_experts for s in routers},
        "top_k": max(s.top_k for s in routers),
        "adapter": ",".join(sorted({s.adapter for s in routers})),
        "sites": [s.as_dict() for s in routers],
    }


@dataclass(frozen=True)
class RouterSpec:
    """Tell probes where a router is and how to read it.

    ``path_pattern``: a dotted module name or glob (``"blocks.*.moe.router"``)
    or a compiled regex. ``parse(module, args, output)`` returns
    ``(logits, weights, indices[, dropped])``, a ``probes.Routed`` or a dict
    with ``indices`` (``[T, k]`` long) and optional ``weights`` / ``dropped``
    / ``logits``. ``n_experts`` / ``top_k``: ints or callables of the module
    (default: the module's ``n_experts`` / ``num_experts`` / ``out_features``
    and ``top_k`` / ``num_experts_per_tok`` attributes).
    """

    path_pattern: object
    parse: Callable = None
    n_experts: object = None
    top_k: object = None
    name: str = "spec"

    def matches(self, name: str) -> bool:
        p = self.path_pattern
        if isinstance(p, re.Pattern):
            return p.fullmatch(name) is not None
        return fnmatch.fnmatchcase(name, str(p))


@dataclass
class RouterSite:
    """One discovered router: dotted ``name``, ``layer`` index, expert count, top-k, adapter."""

    name: str
    layer: int
    adapter: str
    parse: Callable = field(repr=False)
    _module: weakref.ref = field(repr=False)
    _parent: Optional[weakref.ref] = field(repr=False, default=None)
    _n_experts: Callable = field(repr=False, default=A.default_n_experts)
    _top_k: Callable = field(repr=False, default=A.default_top_k)
    install: Optional[Callable] = field(repr=False, default=None)
    guessed: bool = False
    count_key: Optional[str] = field(init=False, repr=False, default=None)

    def __post_init__(self):
        m = self._module()
        if self._n_experts is A.default_n_experts and m is not None:
            self.count_key = A.count_key(m)

    @property
    def module(self) -> Optional[nn.Module]:
        return self._module()

    @property
    def n_experts(self) -> int:
        """Re-read from the module each time (lifecycle may grow or prune experts)."""
        m = self._module()
        if m is None:
            return 0
        return self.experts_of(m)

    def experts_of(self, module: nn.Module) -> int:
        """The expert count of ``module`` (this site's router, already dereferenced: the
        router hook reads it per call, inlining the first two lines). With the default
        adapter reading, the attribute that held an int at discovery (``count_key``, e.g.
        ``num_experts``) is read while it holds one; else the adapter's full reading runs."""
        n = module.__dict__.get(self.count_key)
        if n.__class__ is int:
            return n
        return int(self._n_experts(module, self._parent() if self._parent else None))

    @property
    def top_k(self) -> int:
        m = self._module()
        if m is None:
            return 0
        return int(self._top_k(m, self._parent() if self._parent else None))

    def as_dict(self) -> dict:
        return {"name": self.name, "layer": self.layer, "n_experts": self.n_experts,
                "top_k": self.top_k, "adapter": self.adapter, "guessed": self.guessed}

    def __repr__(self) -> str:
        return (f"RouterSite(name={self.name!r}, layer={self.layer}, n_experts={self.n_experts}, "
                f"top_k={self.top_k}, adapter={self.adapter!r})")


def _native_parse(module, args, output) -> Routed:
    return from_protocol(output)


def _spec_value(v, module, parent, default):
    if v is None:
        return default(module, parent)
    return v(module) if callable(v) else int(v)


TOP_K_ATTRS = ("top_k", "num_experts_per_tok", "k")


def _readable_top_k(module, parent) -> bool:
    return A._attr(module, TOP_K_ATTRS) is not None or \
        (parent is not None and A._attr(parent, TOP_K_ATTRS) is not None)


def _spec_top_k(spec: RouterSpec, k_cfg: Optional[int]):
    """The spec's top_k; else the router's (or its parent's) attribute; else the model config's
    ``num_experts_per_tok`` / ``moe_top_k`` / ``top_k``; else 1 (``find_sites`` warns)."""
    def read(m, p):
        if spec.top_k is not None:
            return _spec_value(spec.top_k, m, p, A.default_top_k)
        if k_cfg is not None and not _readable_top_k(m, p):
            return k_cfg
        return A.default_top_k(m, p)
    return read


def _spec_site(spec: RouterSpec, name, module, parent, k_cfg: Optional[int] = None) -> RouterSite:
    parse = spec.parse

    def parse_spec(mod, args, output):
        return from_protocol(parse(mod, args, output) if parse is not None else output)

    return RouterSite(
        name=name, layer=-1, adapter=spec.name, parse=parse_spec, _module=weakref.ref(module),
        _parent=weakref.ref(parent) if parent is not None else None,
        # (a spec without n_experts reads the default way, one dict lookup per call: count_key)
        _n_experts=A.default_n_experts if spec.n_experts is None else
        lambda m, p: _spec_value(spec.n_experts, m, p, A.default_n_experts),
        _top_k=_spec_top_k(spec, k_cfg))


def _linear_guess_parse(module, args, output) -> Routed:
    # Generic guess for a bare gate Linear: the decision is not visible, so top-k
    # of its logits is recomputed (exact only for plain softmax top-k routing).
    logits = output if torch.is_tensor(output) else output[0]
    k = getattr(module, "_probes_top_k", 1)
    flat = logits.reshape(-1, logits.shape[-1])
    top = torch.topk(flat.float(), k, dim=-1)
    return Routed(top.indices, torch.softmax(flat.float(), dim=-1).gather(1, top.indices), None, flat)


def _is_topk_convention(module: nn.Module) -> bool:
    cls = type(module).__name__.lower()
    return cls.endswith(("topkrouter", "topk_router")) and \
        A._attr(module, ("num_experts", "n_experts", "num_local_experts")) is not None and \
        A._attr(module, ("top_k", "num_experts_per_tok")) is not None


def _config_top_k(model: nn.Module) -> Optional[int]:
    cfg = getattr(model, "config", None)
    for key in ("num_experts_per_tok", "moe_top_k", "top_k"):
        v = getattr(cfg, key, None)
        if isinstance(v, int):
            return v
    return None


def find_sites(model: nn.Module, specs=None, generic: bool = True) -> list[RouterSite]:
    """All router sites of ``model`` with layer indices assigned (see module docstring)."""
    specs = list(specs or [])
    for s in specs:
        if not isinstance(s, RouterSpec):
            raise ProbeError(f"specs= takes probes.RouterSpec objects, got {type(s).__name__}")
    modules = dict(model.named_modules())
    sites: list[RouterSite] = []
    taken: set[str] = set()
    spec_matched = False
    k_cfg = _config_top_k(model)
    unknown_k: dict[int, list[str]] = {}   # spec -> its routers whose top-k nothing says

    def parent_of(name):
        return modules.get(name.rsplit(".", 1)[0] if "." in name else "")

    for name, module in modules.items():
        if any(name.startswith(t + ".") for t in taken):
            continue  # never descend into a router already claimed
        parent = parent_of(name)
        site = None
        spec = next((s for s in specs if s.matches(name)), None)
        if spec is not None:
            site = _spec_site(spec, name, module, parent, k_cfg)
            spec_matched = True
            if spec.top_k is None and k_cfg is None and not _readable_top_k(module, parent):
                unknown_k.setdefault(id(spec), []).append(name)
        elif getattr(module, "chrono_router", False) is True:
            site = RouterSite(name=name, layer=-1, adapter="native", parse=_native_parse,
                              _module=weakref.ref(module),
                              _parent=weakref.ref(parent) if parent is not None else None)
            lid = getattr(module, "layer_id", None)
            if isinstance(lid, int):
                site.layer = lid
        else:
            a = A.adapter_for(module)
            if a is not None and (a.accept is None or a.accept(name)):
                site = RouterSite(name=name, layer=-1, adapter=a.name, parse=a.parse,
                                  _module=weakref.ref(module),
                                  _parent=weakref.ref(parent) if parent is not None else None,
                                  _n_experts=a.n_experts, _top_k=a.top_k, install=a.install)
        if site is not None:
            sites.append(site)
            taken.add(name)
    if specs and not spec_matched:
        raise ProbeError(_no_match_message(model, specs))
    for names in unknown_k.values():
        log.warning("probes: top-k of router %s%s is not readable (no top_k / num_experts_per_tok "
                    "attribute, no model config); the manifest records top_k=1. Pass "
                    "probes.RouterSpec(..., top_k=K).", names[0],
                    f" and {len(names) - 1} more ({len(names)} routers)" if len(names) > 1 else "")
    if not sites and generic:
        sites = _generic_sites(model, modules)
    if not sites:
        raise ProbeError(_nothing_found_message(model, generic))
    _assign_layers(sites)
    return sites


def _generic_sites(model, modules) -> list[RouterSite]:
    sites = []
    k_cfg = _config_top_k(model)
    for name, module in modules.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in ("gate", "router", "gating", "router_gate"):
            continue
        parent = modules.get(name.rsplit(".", 1)[0] if "." in name else "")
        pref = weakref.ref(parent) if parent is not None else None
        if _is_topk_convention(module):
            from .routing import topk_triple
            sites.append(RouterSite(name=name, layer=-1, adapter="generic.topk_convention",
                                    parse=topk_triple, _module=weakref.ref(module), _parent=pref,
                                    guessed=True))
        elif isinstance(module, nn.Linear) and module.out_features >= 2:
            k = A._attr(parent, ("top_k", "num_experts_per_tok", "k")) if parent is not None else None
            k = k or k_cfg or 1
            module._probes_top_k = k
            sites.append(RouterSite(name=name, layer=-1, adapter="generic.linear_topk",
                                    parse=_linear_guess_parse, _module=weakref.ref(module),
                                    _parent=pref, _top_k=lambda m, p: m._probes_top_k, guessed=True))
    for s in sites:
        log.warning("probes: no registered adapter; guessed router %s (%s, %d experts, top_k=%d%s). "
                    "Pass specs=[probes.RouterSpec(...)] to be exact, or generic=False to turn guessing off.",
                    s.name, s.adapter, s.n_experts, s.top_k,
                    "; top-k recomputed from logits" if s.adapter == "generic.linear_topk" else "")
    return sites


_INT = re.compile(r"^\d+$")


def _assign_layers(sites: list[RouterSite]) -> None:
    """Layer = first integer component of the dotted name (or native ``layer_id``).

    If that leaves two sites on one layer (encoder and decoder blocks), all
    sites are numbered 0..n-1 in module order instead, and it is logged.
    """
    for s in sites:
        if s.layer >= 0:
            continue
        nums = [int(p) for p in s.name.split(".") if _INT.match(p)]
        s.layer = nums[0] if nums else -1
    layers = [s.layer for s in sites]
    if len(set(layers)) != len(layers) or any(l < 0 for l in layers):
        for i, s in enumerate(sites):
            s.layer = i
        log.info("probes: layer numbers from module names collide; numbered sites in module order: %s",
                 ", ".join(f"{s.name}->{s.layer}" for s in sites))


def _candidates(model: nn.Module, limit: int = 20) -> list[str]:
    out = []
    for name, m in model.named_modules():
        low = name.lower()
        if any(w in low.rsplit(".", 1)[-1] for w in ("gate", "router", "gating", "moe", "expert")) or \
                any(w in type(m).__name__.lower() for w in ("router", "gate", "moe")):
            out.append(f"{name} ({type(m).__name__})")
        if len(out) >= limit:
            break
    return out


_HOW = ("  probes.attach(model, run=..., specs=[probes.RouterSpec(\"layers.*.moe.router\",\n"
        "      parse=lambda module, args, out: (logits, weights, indices))])\n"
        "  (indices: [tokens, top_k] long tensor of the experts the router chose)")


def _nothing_found_message(model, generic) -> str:
    cands = _candidates(model)
    lines = [f"no MoE router found in {type(model).__name__}"
             + ("" if generic else " (generic guessing is off: generic=False)") + "."]
    lines.append("Candidate modules: " + (", ".join(cands) if cands else "none look like routers") + ".")
    lines.append("Tell probes where the router is:\n" + _HOW)
    return "\n".join(lines)


def _no_match_message(model, specs) -> str:
    pats = ", ".join(repr(getattr(s.path_pattern, "pattern", s.path_pattern)) for s in specs)
    cands = _candidates(model)
    return (f"no module of {type(model).__name__} matches RouterSpec pattern(s) {pats}. "
            f"Candidate modules: {', '.join(cands) if cands else 'none'}.")
