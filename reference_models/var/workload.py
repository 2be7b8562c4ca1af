"""VAR as a chrono workload: train a small MoE LM on pydoc text, build VAR's statistics,
evaluate the model routed by VAR against its own router, and record it all.

Store layout of this workload (run ``run_id``):
- ``signals``: ``loss`` (training), ``val_loss`` (own router), ``var.val_loss`` (routed by VAR),
  ``var.expensive_fraction``, ``var.cache_hit_rate``, ``var.fast_fraction``,
  ``var.cached_fraction``, ``var.fast_coverage`` per evaluation batch.
- ``routing`` (+ snapshots, alerts): training steps (mode TRAIN, layers 0..L-1, the model's own
  router, recorded by ``probes.attach``);
  evaluation batches (mode EVAL): layers 0..L-1 = what VAR decided, and one
  *virtual layer per tier* — ``100 + l`` fast, ``200 + l`` cached, ``300 + l``
  learned — so the dashboard shows how each tier spreads tokens over experts.
- ``tokens``: every evaluated token's decision under its tier's virtual layer
  (expert, weight, batch_idx, position, token_id).
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from ..common import WorkloadSummary
from .moe_lm import MoEConfig, MoELM, train_moe
from .var import TIERS, VAR, VARConfig, precompute_statistics

TIER_LAYER_BASE = {"fast": 100, "cached": 200, "learned": 300}

PRESETS = {
    "quick": dict(d_model=32, n_layers=2, n_heads=2, n_experts=8, d_ff=64, seq_len=32),
    "default": dict(d_model=64, n_layers=2, n_heads=4, n_experts=8, d_ff=128, seq_len=64),
}


def _text():
    from reference_models.astarte.model import RollingChunks
    from reference_models.corpus import pydoc_bytes, split_bytes

    return (RollingChunks, *split_bytes(pydoc_bytes()))


def prepare(steps: int, seed: int = 0, preset: str | None = None, batch_size: int | None = None,
            stat_batches: int | None = None, on_step=None, progress: bool = False, attach=None):
    """Train the MoE LM and precompute VAR statistics. Returns a dict of the pieces."""
    preset = preset or ("quick" if steps <= 60 else "default")
    cfg = MoEConfig(**PRESETS[preset])
    batch_size = batch_size or (8 if preset == "quick" else 16)
    Chunks, train_text, val_text = _text()
    train = Chunks(train_text, cfg.seq_len, batch_size, stride=cfg.seq_len // 2 + 1)
    val = Chunks(val_text, cfg.seq_len, batch_size, stride=cfg.seq_len)
    torch.manual_seed(seed)
    model = MoELM(cfg)
    handle = attach(model) if attach is not None else None
    try:
        train_moe(model, train, steps, on_step=on_step, progress=progress)
    finally:
        if handle is not None:
            handle.detach()
    model.eval()
    # statistics over a pass of the training text (positions independent of the training order)
    stat_batches = stat_batches or (20 if preset == "quick" else 200)
    stat_data = Chunks(train_text, cfg.seq_len, batch_size, stride=cfg.seq_len)
    stats = precompute_statistics(model, [stat_data.batch(i)[:, :-1] for i in range(stat_batches)],
                                  progress=progress)
    return dict(model=model, cfg=cfg, train=train, val=val, stats=stats, preset=preset,
                batch_size=batch_size, stat_batches=stat_batches)


class _Timed:
    """Wraps the own router as a ``route`` callable that measures router time."""

    def __init__(self, model):
        self.model, self.seconds = model, 0.0

    def __call__(self, layer, h, idx):
        t0 = time.perf_counter()
        _, w, ind = self.model.routers()[layer](h)
        self.seconds += time.perf_counter() - t0
        return w, ind


@torch.no_grad()
def evaluate(model, val, n_batches: int, route=None, on_batch=None) -> tuple[float, float]:
    """(mean validation cross-entropy, forward seconds) with ``route`` (None = own router)."""
    losses, secs = [], 0.0
    for i in range(n_batches):
        b = val.batch(i)
        t0 = time.perf_counter()
        logits = model(b[:, :-1], route=route)
        secs += time.perf_counter() - t0
        loss = float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1)))
        losses.append(loss)
        if on_batch is not None:
            on_batch(i, b[:, :-1], loss)
    return float(np.mean(losses)), secs


def log_var_batch(w, var: VAR, step: int, idx: torch.Tensor, loss: float) -> None:
    """Routing events of every tier + per-token decisions + tier signals for one eval batch."""
    B, T = idx.shape
    E = var.n_experts
    ids = idx.reshape(-1).numpy()
    pos = np.tile(np.arange(T), B)
    bidx = np.repeat(np.arange(B), T)
    for layer in range(var.n_layers):
        tiers = var.last_tiers[layer].cpu().numpy()
        experts = var.last_experts[layer].cpu().numpy()
        w.log_routing(step, layer, np.bincount(experts, minlength=E), mode="EVAL")
        for t, name in enumerate(TIERS):
            sel = tiers == t
            vl = TIER_LAYER_BASE[name] + layer
            w.log_routing(step, vl, np.bincount(experts[sel], minlength=E), mode="EVAL")
            if sel.any():
                w.log_tokens(step, vl, experts[sel], batch_idx=bidx[sel], position=pos[sel], k=0,
                             token_id=ids[sel], mode="EVAL")
    fr = var.fractions()
    w.log_signal(step, "var.val_loss", loss)
    w.log_signal(step, "var.expensive_fraction", fr["expensive_fraction"])
    w.log_signal(step, "var.cache_hit_rate", fr["cache_hit_rate"])
    w.log_signal(step, "var.fast_fraction", fr["fast_fraction"])
    w.log_signal(step, "var.cached_fraction", fr["cached_fraction"])


def run(root, run_id: str, mode: str = "intended", steps: int = 400, seed: int = 0,
        progress: bool = True, preset: str | None = None, val_batches: int | None = None) -> dict:
    """Train, precompute, evaluate VAR vs the own router; record in run ``run_id``; return a summary."""
    import chrono

    if mode not in ("intended", "faithful"):
        raise ValueError(f"mode must be 'intended' or 'faithful', got {mode!r}")
    preset = preset or ("quick" if steps <= 60 else "default")
    cfg = MoEConfig(**PRESETS[preset])
    model_desc = {
        "name": "var-moe-lm", "adapter": "native",
        "layers": list(range(cfg.n_layers)) + [b + l for b in TIER_LAYER_BASE.values()
                                                for l in range(cfg.n_layers)],
        "experts_per_layer": {str(l): cfg.n_experts for l in range(cfg.n_layers)}
        | {str(b + l): cfg.n_experts for b in TIER_LAYER_BASE.values() for l in range(cfg.n_layers)},
        "top_k": 1,
        "layer_names": {str(b + l): f"VAR {t} tier of layer {l}" for t, b in TIER_LAYER_BASE.items()
                        for l in range(cfg.n_layers)},
    }
    import probes

    config = {"workload": "var", "mode": mode, "steps": steps, "seed": seed, "preset": preset,
              "moe": cfg.to_dict()}
    holder = {}

    def on_step(i, ce, m):
        if "h" not in holder:        # attach once the model exists (prepare builds it)
            return
        holder["h"].writer.log_signal(i, "loss", ce)
        holder["h"].step()

    # training: the MoE's own routers are recorded by probes (native router protocol)
    torch.manual_seed(seed)
    def attach(m):
        holder["h"] = probes.attach(m, run=run_id, root=root, flush_every=min(50, max(1, steps)),
                                    config=config)
        return holder["h"]

    p = prepare(steps, seed, preset, on_step=on_step, progress=progress, attach=attach)
    model, val, stats = p["model"], p["val"], p["stats"]
    val_batches = val_batches or (4 if preset == "quick" else 16)
    var = VAR(model, stats, VARConfig(mode=mode))
    # evaluation: VAR's tier decisions are logged here (probes would see the own router only)
    with chrono.open_run(root, run_id, model=model_desc, config=config) as w:
        own_loss, _ = evaluate(model, val, val_batches)
        w.log_signal(steps, "val_loss", own_loss)
        step0 = steps

        def on_batch(i, idx, loss):
            log_var_batch(w, var, step0 + i, idx, loss)

        var_loss, _ = evaluate(model, val, val_batches, route=var.route, on_batch=on_batch)
        coverage = stats.coverage(var.cfg)
        w.log_signal(steps, "var.fast_coverage", coverage)
    fr = var.fractions()
    return {
        "workload": "var", "run_id": run_id, "mode": mode, "steps": steps, "preset": preset,
        "val_loss_own": own_loss, "val_loss_var": var_loss,
        "val_loss_ratio": var_loss / own_loss,
        "expensive_fraction": fr["expensive_fraction"], "fast_fraction": fr["fast_fraction"],
        "cached_fraction": fr["cached_fraction"], "cache_hit_rate": fr["cache_hit_rate"],
        "fast_coverage": coverage, "eligible_tokens": int(var.eligible.sum()),
        "evaluated_tokens": fr["tokens"],
    }


class Summary(WorkloadSummary):
    """The run's summary that ``chrono workload`` prints with ``.summary()``."""

    KEYS = ("mode", "steps", "val_loss_own", "val_loss_var", "val_loss_ratio", "expensive_fraction", "fast_fraction", "cached_fraction", "cache_hit_rate", "fast_coverage", "eligible_tokens", "evaluated_tokens")


def run_workload(mode: str = "intended", steps: int | None = None, run: str | None = "var", seed: int = 0,
                 root="chrono_runs", progress: bool = False, **kw) -> Summary:
    """Entry point of ``chrono workload var`` (see ``reference_models.registry``)."""
    return Summary(globals()["run"](root, run or "var", mode=mode, steps=steps or 400, seed=seed,
                                    progress=progress, **kw))
