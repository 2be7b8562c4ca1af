"""``chrono workload semantic-moe``: train on pydoc_data text with telemetry, print a summary."""
from __future__ import annotations

from reference_models.corpus import byte_batches, fixed_val_batches, split_bytes, text_bytes

from .train import TrainingConfig, train

BATCH = 16
DEFAULT_STEPS = 400


def make_config(mode: str, seed: int, run: str | None, root, preset: str = "small", **kw) -> TrainingConfig:
    cfg = TrainingConfig(preset=preset, seed=seed, run=run, root=str(root), faithful=(mode == "faithful"),
                         **kw)
    if mode == "faithful":  # the seed: alpha ramps 0 -> 1 linearly, no lifecycle, no re-clustering
        cfg.lifecycle = False
        cfg.recluster_every = 0
    return cfg


def run_workload(mode: str = "intended", steps: int | None = None, run: str | None = "semantic-moe",
                 seed: int = 0, root="chrono_runs", preset: str = "small", n_experts: int = 8,
                 progress: bool = False, **kw):
    """Train the semantic MoE; returns TrainMetrics (``.summary()`` prints the claims)."""
    steps = steps or DEFAULT_STEPS
    cfg = make_config(mode, seed, run, root, preset, progress=progress, **kw)
    block = cfg.model_config(256, n_experts).block_size
    train_data, val_data = split_bytes(text_bytes())
    loader = byte_batches(train_data, block, BATCH, seed, steps + cfg.calib_batches)
    val = fixed_val_batches(val_data, block, BATCH, n_batches=8)
    return train(loader, 256, n_experts, cfg, val_batches=val, steps=steps)
