"""``chrono workload bio-moe``: train on load_digits with telemetry, print the claims."""
from __future__ import annotations

from .train import BioTrainConfig, train_bio

DEFAULT_EPOCHS = 24


def run_workload(mode: str = "intended", steps: int | None = None, run: str | None = "bio-moe",
                 seed: int = 0, root="chrono_runs", progress: bool = False, **kw):
    """``steps`` counts optimiser steps (21 per epoch); growth epochs scale with the run length."""
    cfg = BioTrainConfig(mode=mode, seed=seed, run=run, root=str(root), progress=progress, **kw)
    per_epoch = 1347 // cfg.batch_size
    if steps is not None:
        cfg.epochs = max(3, -(-steps // per_epoch))
        if "growth_epochs" not in kw:
            cfg.growth_epochs = (max(1, cfg.epochs // 6), max(2, cfg.epochs // 3))
    return train_bio(cfg)
