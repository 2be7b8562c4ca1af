"""What a run's manifest declares about its model, and how a writer changes it.

The manifest's ``model`` dict (DESIGN §3) may declare ``layers`` (a list),
``experts_per_layer`` (``{"layer": n}``: the count now) and ``top_k``; this
module adds ``declared_experts`` (``{"layer": [every count declared during the
run]}``) and ``layers_learned`` (true when the model declared no layers and
each was learned from its first ``log_routing`` call: any new layer stays
welcome). The write API (``chrono.validate``) checks rows against them: a window
can straddle a lifecycle change (probes write a window with the largest count
seen in it), so every count a layer ever had stays valid for its rows.
``RunWriter.declare_experts`` (called by probes when a router grows or shrinks
and by ``chrono.lifecycle`` for applied events) goes through ``declare``.
"""
from __future__ import annotations

import numpy as np

from .rules import InvalidInputError

# set in a manifest's model when its layers were learned from the first writes, not declared
LAYERS_OPEN = "layers_learned"


class Layout:
    """What the run's manifest declares: layers, expert counts (every one ever declared), top_k."""

    def __init__(self, model):
        model = model if isinstance(model, dict) else {}
        epl = _int_map(model.get("experts_per_layer"))
        self.current = epl
        self.sizes = {l: {n} for l, n in epl.items()}
        for l, ns in (_seq_map(model.get("declared_experts")) or {}).items():
            self.sizes.setdefault(l, set()).update(ns)
        layers = model.get("layers")
        listed = {int(x) for x in layers if is_int(x)} if isinstance(layers, (list, tuple)) else set()
        # None: the model declared no layers (only learned ones, LAYERS_OPEN): any layer may come
        self.layers = None if model.get(LAYERS_OPEN) else ((listed | set(self.sizes)) or None)
        k = model.get("top_k")
        self.top_k = int(k) if is_int(k) and int(k) > 0 else None


def is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _int_map(d) -> dict[int, int]:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            try:
                out[int(k)] = int(v)
            except (TypeError, ValueError):
                continue
    return out


def _seq_map(d) -> dict[int, set[int]]:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            try:
                out[int(k)] = {int(x) for x in v}
            except (TypeError, ValueError):
                continue
    return out


def declare(model, layer: int, n_experts: int) -> dict | None:
    """``model`` (manifest model dict) with ``layer`` declared to have ``n_experts`` now; None if unchanged.

    Keeps every count ever declared in ``declared_experts`` (rows of a window that
    straddles a lifecycle change are valid with either count).
    """
    for name, v, lo in (("layer", layer, 0), ("n_experts", n_experts, 1)):
        if not is_int(v) or v < lo:
            raise InvalidInputError(f"declare_experts: {name} must be an integer >= {lo}, got {v!r}")
    model = dict(model) if isinstance(model, dict) else {}
    lay = Layout(model)
    if lay.layers is None:   # learned, not declared by the model: later layers stay welcome
        model[LAYERS_OPEN] = True
    key = str(int(layer))
    if lay.current.get(int(layer)) == n_experts and n_experts in lay.sizes.get(int(layer), ()):
        if "declared_experts" in model:
            return None
    epl = {str(k): v for k, v in lay.current.items()}
    epl[key] = int(n_experts)
    model["experts_per_layer"] = dict(sorted(epl.items(), key=lambda kv: int(kv[0])))
    hist = {str(k): sorted(v) for k, v in lay.sizes.items()}
    hist[key] = sorted(set(hist.get(key, [])) | {int(n_experts)})
    model["declared_experts"] = dict(sorted(hist.items(), key=lambda kv: int(kv[0])))
    if isinstance(model.get("layers"), list) and int(layer) not in model["layers"]:
        model["layers"] = sorted(model["layers"] + [int(layer)])
    return model


def merge_declarations(old_model, new_model):
    """The model a reopened run records: ``new_model`` plus every count declared before (None stays None)."""
    if not isinstance(new_model, dict) or not isinstance(old_model, dict):
        return new_model
    merged = dict(new_model)
    old, new = Layout(old_model).sizes, Layout(new_model).sizes
    if not new and not old:
        return merged
    hist = {l: set(v) for l, v in old.items()}
    for l, v in new.items():
        hist.setdefault(l, set()).update(v)
    merged["declared_experts"] = {str(l): sorted(v) for l, v in sorted(hist.items())}
    return merged
