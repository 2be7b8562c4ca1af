"""Astarte as a chrono workload: train on pydoc text, write signals + head routing to the store.

``run(root, run_id, mode, steps, seed)`` is what ``chrono workload astarte`` calls.
Per training chunk it logs ``loss``, ``astarte.null_norm``, ``astarte.register_norm``,
``astarte.drift`` (L2 distance the registers moved during the chunk); head routing
(each token's winning attention head per layer) is recorded by ``probes.attach``
through the heads' native router protocol (routing rows, snapshots, alerts); ``val_loss`` every ``eval_every`` chunks. Pause chunks (every
``pause_every``) let the registers free-run without input and without a gradient
step; their signals are logged too (``astarte.pause`` = 1).
The final checkpoint goes to ``<root>/runs/run_id=<run_id>/checkpoints/astarte.pt`` (the run's metadata directory).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..common import WorkloadSummary
from ..corpus import pydoc_bytes, split_bytes
from .model import Astarte, AstarteConfig, RollingChunks, generate, save_checkpoint

CHECKPOINT = Path("checkpoints") / "astarte.pt"


@torch.no_grad()
def evaluate(model: Astarte, val: RollingChunks, n_batches: int = 4) -> float:
    was = model.training
    model.eval()
    losses = [float(model.loss(val.batch(i))[0]) for i in range(n_batches)]
    model.train(was)
    return float(np.mean(losses))


def train_chunks(model: Astarte, opt, data: RollingChunks, start: int, n: int, pause_every: int = 0,
                 pause_cycles: int = 8, writer=None, val: RollingChunks | None = None,
                 eval_every: int = 0, progress: bool = False, handle=None) -> list[float]:
    """Train chunks ``start .. start+n-1``; returns their losses. Deterministic given the state.

    ``handle``: a ``probes.attach`` handle over the model (its head routers); one
    probes step per chunk, so routing rows carry the chunk index as step.
    """
    from tqdm import tqdm

    losses = []
    for c in tqdm(range(start, start + n), disable=not progress, desc="astarte", unit="chunk"):
        before = model.abpe.registers.clone()
        paused = bool(pause_every) and (c + 1) % pause_every == 0
        if paused:
            model.abpe.idle(pause_cycles)
            loss_v = None
        else:
            loss, ends, outs = model.loss(data.batch(c))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            model.abpe.advance(ends, outs)
            loss_v = float(loss.detach())
            losses.append(loss_v)
        if writer is not None:
            if loss_v is not None:
                writer.log_signal(c, "loss", loss_v)
            writer.log_signal(c, "astarte.null_norm", model.null_norm())
            writer.log_signal(c, "astarte.register_norm", model.register_norm())
            writer.log_signal(c, "astarte.drift", float((model.abpe.registers - before).norm()))
            writer.log_signal(c, "astarte.pause", 1.0 if paused else 0.0)
            if val is not None and eval_every and ((c + 1) % eval_every == 0 or c == start + n - 1):
                writer.log_signal(c, "val_loss", evaluate(model, val))
        if handle is not None:
            handle.step()
    return losses


PRESETS = {
    # quick: the test-suite preset (seconds on 2 shared cores)
    "quick": dict(d_state=16, n_cycles=3, d_model=32, n_layers=2, n_heads=4, seq_len=32),
    "default": dict(d_state=32, n_cycles=4, d_model=64, n_layers=2, n_heads=4, seq_len=64),
}


def run(root, run_id: str, mode: str = "intended", steps: int = 300, seed: int = 0,
        progress: bool = True, preset: str | None = None, batch_size: int | None = None,
        pause_every: int = 25, eval_every: int = 50, lr: float = 3e-3) -> dict:
    """Train Astarte for ``steps`` chunks and record everything in run ``run_id``."""
    preset = preset or ("quick" if steps <= 40 else "default")
    cfg = AstarteConfig(mode=mode, **PRESETS[preset])
    batch_size = batch_size or (8 if preset == "quick" else 16)
    torch.manual_seed(seed)
    model = Astarte(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    train_text, val_text = split_bytes(pydoc_bytes())
    data = RollingChunks(train_text, cfg.seq_len, batch_size, stride=cfg.seq_len // 2 + 1)
    val = RollingChunks(val_text, cfg.seq_len, batch_size, stride=cfg.seq_len)
    eval_every = min(eval_every, max(1, steps // 2))
    model_desc = {"name": "astarte", "layers": list(range(cfg.n_layers)),
                  "experts_per_layer": {str(i): cfg.n_heads for i in range(cfg.n_layers)},
                  "top_k": 1, "adapter": "native (attention heads as experts)"}
    config = dict(cfg.to_dict(), steps=steps, seed=seed, batch_size=batch_size, lr=lr,
                  pause_every=pause_every, preset=preset, workload="astarte")
    import probes

    with probes.attach(model, run=run_id, root=root, flush_every=min(50, max(1, steps)),
                       config=config) as h:
        w = h.writer
        w.update_manifest(model=dict(w.manifest.get("model") or {}, **model_desc))
        losses = train_chunks(model, opt, data, 0, steps, pause_every=pause_every, writer=w,
                              val=val, eval_every=eval_every, progress=progress, handle=h)
        val_loss = evaluate(model, val)
        w.log_signal(steps - 1, "val_loss", val_loss)
        ckpt = Path(w.path) / CHECKPOINT    # the run's metadata directory
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(ckpt, model, opt, chunk=steps)
        sample = generate(model, b"def ", length=40, temperature=0.8, seed=seed)
    return {
        "workload": "astarte", "run_id": run_id, "mode": mode, "steps": steps,
        "train_chunks": len(losses), "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None, "val_loss": val_loss,
        "null_norm": model.null_norm(), "register_norm": model.register_norm(),
        "null_history_rows": int(model.abpe.null_history.shape[0]),
        "checkpoint": str(ckpt), "sample": sample.decode("utf-8", "replace"),
    }


class Summary(WorkloadSummary):
    """The run's summary that ``chrono workload`` prints with ``.summary()``."""

    KEYS = ("mode", "steps", "train_chunks", "first_loss", "final_loss", "val_loss", "null_norm", "register_norm", "null_history_rows", "checkpoint", "sample")


def run_workload(mode: str = "intended", steps: int | None = None, run: str | None = "astarte", seed: int = 0,
                 root="chrono_runs", progress: bool = False, **kw) -> Summary:
    """Entry point of ``chrono workload astarte`` (see ``reference_models.registry``)."""
    return Summary(globals()["run"](root, run or "astarte", mode=mode, steps=steps or 300, seed=seed,
                                    progress=progress, **kw))
