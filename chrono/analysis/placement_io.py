"""The placement planner over a recorded run, and the files serving engines read.

``plan_run`` sums each layer's routing rows over the scope into loads (token
assignments per expert), plans with :func:`chrono.analysis.placement.plan`, and
predicts each GPU's load before (the trivial placement SGLang and vLLM start
from: slot p holds expert p mod E) and after. Three outputs:

- ``chrono_json``: everything (inputs, maps, per-layer before/after), format
  ``chrono.placement/1``.
- ``sglang_json``: ``{"physical_to_logical_map": [[...] per model layer]}``, the
  mapping form SGLang's ``--init-expert-location FILE.json`` reads
  (``python/sglang/srt/eplb/expert_location.py``, ``compute_initial_expert_location_metadata``
  -> ``ExpertLocationMetadata.init_by_mapping(**data)``, SGLang 0.5.x at commit 01fec5c;
  the file must hold only that key). Rows are indexed by *model* layer id 0..N-1;
  layers without recorded routing (dense layers) get the trivial row.
- ``vllm_json``: the tensors of vLLM's EPLB state per MoE layer, named as in
  ``vllm/distributed/eplb/eplb_state.py`` (``EplbModelState`` at commit 50feac9):
  ``physical_to_logical_map`` [moe_layers, P], ``logical_to_physical_map``
  [moe_layers, E, replicas + 1] (-1 padded), ``logical_replica_count`` [moe_layers, E],
  and ``global_expert_load`` [moe_layers, E] (int64), the load matrix
  ``EplbState.add_model(global_expert_load=...)`` rebalances from. That vLLM
  version has no command-line flag that loads a placement file; see docs/analysis.md.
- ``vllm_initial_map``: a JSON list with one physical-to-logical row per MoE layer,
  the file ``eplb_config.initial_expert_map_path`` reads in vLLM pull request
  #49572 ("[EPLB] Support custom initial expert maps", open as of 2026-07).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from .base import AnalysisError, Scope
from .loads import layer_loads
from .placement import EPLB_SOURCE, Placement, gpu_loads, plan, trivial

TABLE_SCHEMA = pa.schema([
    ("layer", pa.int32()), ("tokens", pa.int64()), ("before_max", pa.float64()),
    ("before_mean", pa.float64()), ("before_ratio", pa.float64()), ("after_max", pa.float64()),
    ("after_mean", pa.float64()), ("after_ratio", pa.float64()), ("max_replicas", pa.int32()),
])


@dataclass
class PlacementReport:
    """A plan for the recorded layers ``layers`` (int list), from ``weight`` int64[L, E]."""

    run: str
    steps: tuple
    layers: list[int]
    weight: np.ndarray
    placement: Placement
    before: np.ndarray  # float64[L, gpus] predicted tokens per GPU, trivial placement
    after: np.ndarray  # float64[L, gpus] with the plan
    replicas: int
    groups: int

    def table(self) -> pa.Table:
        """One row per layer: predicted max and mean GPU load before/after and max / mean."""
        def ratio(a):
            mean = a.mean(1)
            return np.where(mean > 0, a.max(1) / np.where(mean > 0, mean, 1), np.nan)

        rb, ra = ratio(self.before), ratio(self.after)
        cols = {
            "layer": self.layers, "tokens": self.weight.sum(1).astype(np.int64).tolist(),
            "before_max": self.before.max(1).tolist(), "before_mean": self.before.mean(1).tolist(),
            "before_ratio": [None if np.isnan(x) else float(x) for x in rb],
            "after_max": self.after.max(1).tolist(), "after_mean": self.after.mean(1).tolist(),
            "after_ratio": [None if np.isnan(x) else float(x) for x in ra],
            "max_replicas": self.placement.logcnt.max(1).tolist(),
        }
        return pa.table(cols, schema=TABLE_SCHEMA)

    def summary(self) -> dict:
        t = self.table()
        tot_b, tot_a = float(self.before.max(1).sum()), float(self.after.max(1).sum())
        rb = [x for x in t.column("before_ratio").to_pylist() if x is not None]
        ra = [x for x in t.column("after_ratio").to_pylist() if x is not None]
        return {"layers": len(self.layers), "gpus": self.placement.gpus, "nodes": self.placement.nodes,
                "policy": self.placement.policy,
                "mean_before_ratio": float(np.mean(rb)) if rb else None,
                "mean_after_ratio": float(np.mean(ra)) if ra else None,
                "max_gpu_load_sum_before": tot_b, "max_gpu_load_sum_after": tot_a}


def plan_run(con, scope: Scope, gpus: int, replicas: int = 0, groups: int = 1, nodes: int = 1,
             method: str = "auto") -> PlacementReport:
    """Plan from the run's routing rows in ``scope`` (all layers; ``scope.layer`` plans one).

    Raises AnalysisError without routing rows, or when layers differ in expert count."""
    loads = layer_loads(con, scope, "the placement plan")
    sizes = {v.size for v in loads.values()}
    if len(sizes) != 1:
        raise AnalysisError(f"layers of run {scope.run!r} have different expert counts "
                            f"({sorted(sizes)}); plan one layer at a time with --layer")
    layers = sorted(loads)
    weight = np.stack([loads[l] for l in layers]).astype(np.int64)
    p = plan(weight.astype(np.float64), gpus, replicas=replicas, groups=groups, nodes=nodes,
             method=method)
    L, E = weight.shape
    before = gpu_loads(weight.astype(np.float64), trivial(L, E, E + replicas), gpus)
    after = gpu_loads(weight.astype(np.float64), p.phy2log, gpus)
    return PlacementReport(scope.run, scope.steps, layers, weight, p, before, after, replicas, groups)


def chrono_json(r: PlacementReport) -> dict:
    p = r.placement
    return {
        "format": "chrono.placement/1", "run": r.run,
        "steps": {"start": r.steps[0], "stop": r.steps[1]},
        "algorithm": {"policy": p.policy, "source": EPLB_SOURCE if p.policy != "exact" else
                      "chrono exact search (chrono.analysis.placement_exact)"},
        "gpus": p.gpus, "nodes": p.nodes, "groups": r.groups, "replicas": r.replicas,
        "num_logical_experts": int(r.weight.shape[1]),
        "num_physical_experts": int(p.phy2log.shape[1]), "slots_per_gpu": p.slots_per_gpu,
        "layers": r.layers, "load": r.weight.tolist(),
        "physical_to_logical_map": p.phy2log.tolist(),
        "logical_to_physical_map": p.log2phy.tolist(),
        "logical_count": p.logcnt.tolist(),
        "predicted_gpu_load": {"before": r.before.tolist(), "after": r.after.tolist()},
        "per_layer": r.table().to_pylist(), "summary": r.summary(),
    }


def sglang_json(r: PlacementReport, model_layers: int | None = None) -> dict:
    """SGLang's mapping file; ``model_layers`` (default: last recorded layer + 1) rows."""
    n = model_layers if model_layers is not None else max(r.layers) + 1
    if n <= max(r.layers):
        raise AnalysisError(f"--model-layers {n} is not larger than the last recorded layer "
                            f"{max(r.layers)}")
    P = r.placement.phy2log.shape[1]
    E = r.weight.shape[1]
    rows = trivial(n, E, P).copy()
    for i, layer in enumerate(r.layers):
        rows[layer] = r.placement.phy2log[i]
    return {"physical_to_logical_map": rows.tolist()}


def vllm_initial_map(r: PlacementReport) -> list:
    """[[logical expert of each physical slot] per MoE layer] (vLLM PR #49572's per-layer form)."""
    return r.placement.phy2log.tolist()


def vllm_json(r: PlacementReport) -> dict:
    p = r.placement
    width = r.replicas + 1
    l2p = np.full((len(r.layers), r.weight.shape[1], width), -1, dtype=np.int64)
    w = min(width, p.log2phy.shape[2])
    l2p[:, :, :w] = p.log2phy[:, :, :w]
    return {"physical_to_logical_map": p.phy2log.tolist(), "logical_to_physical_map": l2p.tolist(),
            "logical_replica_count": p.logcnt.tolist(), "global_expert_load": r.weight.tolist(),
            "moe_layers": r.layers}
