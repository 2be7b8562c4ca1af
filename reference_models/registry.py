"""Workload registry: ``chrono workload NAME`` looks NAME up here.

Each entry maps a workload name to ``"module:function"``; every function has one signature
and is called as ``fn(mode=, steps=, run=, seed=, root=, progress=)`` (``steps=None``: the
workload's own default) and returns an object with ``.summary()``,
or a dict (printed as ``key: value`` lines). Other workload modules add themselves with
``register`` (or an entry below) without touching the CLI.
"""
from __future__ import annotations

import importlib

WORKLOADS: dict[str, str] = {
    "semantic-moe": "reference_models.semantic_moe.workload:run_workload",
    "bio-moe": "reference_models.bio_moe.workload:run_workload",
    "astarte": "reference_models.astarte.workload:run_workload",
    "var": "reference_models.var.workload:run_workload",
}

DESCRIPTIONS: dict[str, str] = {
    "semantic-moe": "byte-level LM on pydoc_data text, FAISS teacher + distilled student router (ASTRA-X)",
    "bio-moe": "load_digits classifier, phasor bank + k-WTA + liquid MoE with staged growth 1->3->6",
    "astarte": "stateful byte LM on pydoc_data text: Autonomic Base Pair Encoder with a null channel, "
               "attention heads as experts; checkpoint for 'chrono astarte dream|generate'",
    "var": "VAR tiered routing (fast table / 4-token context cache / learned) of a trained byte-level "
           "MoE LM on pydoc_data text, evaluated against the model's own router",
}


def register(name: str, target: str, description: str = "") -> None:
    """Add a workload: ``target`` is ``"package.module:function"``."""
    if ":" not in target:
        raise ValueError(f"target {target!r} must look like 'package.module:function'")
    WORKLOADS[name] = target
    DESCRIPTIONS[name] = description


def resolve(name: str):
    """The workload's run function; KeyError with the known names when unknown."""
    try:
        target = WORKLOADS[name]
    except KeyError:
        raise KeyError(f"unknown workload {name!r}; workloads: {', '.join(sorted(WORKLOADS))}") from None
    mod, fn = target.split(":")
    return getattr(importlib.import_module(mod), fn)
