"""Training for the semantic MoE, with the seed's API shape:
``train(dataloader, vocab_size, n_experts, config) -> TrainMetrics`` and ``metrics.summary()``.

Schedule (intended mode): a calibration pass fills each router's reservoir of meaning vectors
and fits the teacher (FAISS k-means); then alpha (student weight) ramps linearly from
``alpha_start`` to ``alpha_end`` over ``alpha_ramp`` of the steps, the teacher is re-fit every
``recluster_every`` steps, the student learns the teacher's top-1 (cross-entropy), and at each
snapshot ``chrono.lifecycle`` may split / merge / prune experts.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from chrono.lifecycle import LifecycleConfig, LifecyclePolicy, apply_proposals

from .config import PRESETS, SemanticMoEConfig
from .model import SemanticMoELM


@dataclass
class TrainingConfig:
    preset: str = "small"
    top_k: int = 2
    learning_rate: float = 3e-3
    student_lr: float = 1e-2          # the student router's own rate (no weight decay)
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    alpha_start: float = 0.0
    alpha_end: float = 1.0
    alpha_ramp: float = 0.6          # fraction of steps over which alpha ramps
    alpha_decay_steps: int = 0       # seed's name; >0 overrides alpha_ramp with absolute steps
    distill_weight: float = 1.0
    load_penalty: float = 1.0
    recluster_every: int = 100       # 0: never re-fit the teacher; no re-fit after the alpha ramp
    calib_batches: int = 8
    lifecycle: bool = True
    lifecycle_config: LifecycleConfig = field(default_factory=lambda: LifecycleConfig(
        min_experts=2, max_experts=12, overload_factor=2.5, merge_share_factor=0.2, patience=2,
        cooldown=2, enable=("prune", "merge", "split")))
    snapshot_every: int = 25         # telemetry window (steps) and lifecycle cadence
    eval_every: int = 50
    faithful: bool = False
    dense: bool = False
    seed: int = 0
    run: str | None = None           # telemetry run id; None = no telemetry
    root: str = "chrono_runs"
    progress: bool = False

    def model_config(self, vocab_size: int, n_experts: int) -> SemanticMoEConfig:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; presets: {', '.join(PRESETS)}")
        kw = dict(PRESETS[self.preset])
        kw.update(vocab_size=vocab_size, n_experts=n_experts, top_k=self.top_k,
                  load_penalty=self.load_penalty, faithful=self.faithful, dense=self.dense,
                  seed=self.seed)
        return SemanticMoEConfig(**kw)


@dataclass
class TrainMetrics:
    history: dict = field(default_factory=lambda: {"step": [], "loss": []})
    evals: list = field(default_factory=list)       # {"step", "val_loss", "agreement", ...}
    lifecycle: list = field(default_factory=list)   # LIFECYCLE rows
    final: dict = field(default_factory=dict)
    last_window: dict = field(default_factory=dict)  # {layer: counts} of the last closed window

    def log(self, name, value):  # the seed's MetricsLogger.log
        self.history.setdefault(name, []).append(value)

    def summary(self) -> str:
        f = self.final
        lines = [f"steps {f.get('steps')}  final train loss {f.get('train_loss', float('nan')):.4f}  "
                 f"val loss {f.get('val_loss', float('nan')):.4f}"]
        if "agreement" in f:
            lines.append(f"student/teacher top-1 agreement {f['agreement']:.3f} "
                         f"(per layer {', '.join(f'{a:.3f}' for a in f['agreement_per_layer'])})")
        if "neff" in f:
            lines.append("routing: " + "; ".join(
                f"layer {l}: {n} experts, Neff {ne:.2f}, Top2 {t:.3f}"
                for l, n, ne, t in zip(f["layers"], f["n_experts"], f["neff"], f["top2"])))
        applied = [r for r in self.lifecycle if r["applied"]]
        if self.lifecycle:
            kinds = {}
            for r in applied:
                kinds[r["event"]] = kinds.get(r["event"], 0) + 1
            lines.append(f"lifecycle: {len(applied)} applied {kinds or ''}")
        if any("agreement" in e for e in self.evals):
            lines.append("agreement over training: " + ", ".join(
                f"{e['step'] + 1}:{e['agreement']:.2f}" for e in self.evals if "agreement" in e))
        lines.append(f"active params {f.get('active_params')}  total params {f.get('total_params')}")
        return "\n".join(lines)


def _optimizer(model, cfg: TrainingConfig, old=None):
    """AdamW over current params, carrying Adam state of params that survived surgery."""
    student = {id(p) for r in model.routers() for p in r.student.parameters()}
    groups = [{"params": [p for p in model.parameters() if id(p) not in student]}]
    if student:
        groups.append({"params": [p for r in model.routers() for p in r.student.parameters()],
                       "lr": cfg.student_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if old is not None:
        for p in model.parameters():
            if p in old.state:
                opt.state[p] = old.state[p]
    return opt


@torch.no_grad()
def evaluate(model: SemanticMoELM, batches) -> dict:
    """Validation loss, student/teacher top-1 agreement and per-layer routing counts."""
    model.eval()
    losses, agree, total = [], {}, {}
    counts: dict[int, np.ndarray] = {}
    for x, y in batches:
        trace = []
        _, loss = model(x, y, trace=trace)
        losses.append(float(loss))
        for tr in trace:
            t, s, n = tr.teacher.argmax(-1), tr.student.argmax(-1), tr.teacher.shape[-1]
            agree[tr.layer] = agree.get(tr.layer, 0) + int((t == s).sum())
            total[tr.layer] = total.get(tr.layer, 0) + int(t.numel())
            c = torch.bincount(tr.idx.reshape(-1), minlength=n)[:n].cpu().numpy()
            counts[tr.layer] = counts.get(tr.layer, 0) + c
    model.train()
    out = {"val_loss": float(np.mean(losses)), "counts": counts}
    if total:
        per = [agree[l] / total[l] for l in sorted(total)]
        out.update(agreement=float(np.mean(per)), agreement_per_layer=per)
    return out


def _alpha(cfg: TrainingConfig, step: int, steps: int) -> float:
    ramp = cfg.alpha_decay_steps if cfg.alpha_decay_steps > 0 else max(1, int(cfg.alpha_ramp * steps))
    frac = min(1.0, step / ramp)
    return cfg.alpha_start + frac * (cfg.alpha_end - cfg.alpha_start)


def train(dataloader: Iterable, vocab_size: int, n_experts: int, config: TrainingConfig,
          val_batches=None, steps: int | None = None) -> TrainMetrics:
    """Train a semantic MoE LM on ``dataloader`` (yields (inputs [B, T], targets [B, T])).

    ``steps`` (default: len(dataloader)) sets the alpha schedule's horizon.
    With ``config.run`` set, routing (via probes / the router tap), signals and lifecycle
    events are written to the chrono store under ``config.root``.
    """
    from reference_models.common import instrument, set_seed

    set_seed(config.seed)
    mcfg = config.model_config(vocab_size, n_experts)
    model = SemanticMoELM(mcfg)
    batches = list(dataloader) if steps is None else dataloader
    steps = len(batches) if steps is None else steps
    it = iter(batches)
    metrics = TrainMetrics()
    policy = LifecyclePolicy(config.lifecycle_config)
    val_batches = val_batches or []

    # calibration: fill the reservoirs and fit the teachers before training (intended only)
    calib = []
    if not config.dense and not config.faithful:
        for _ in range(config.calib_batches):
            calib.append(next(it))
        with torch.no_grad():
            for x, _ in calib:
                model(x)
        for r in model.routers():
            r.fit_teacher(config.seed + r.layer_id)
            r.window_counts.zero_()
        batches_left = calib + list(it) if isinstance(batches, list) else _chain(calib, it)
    else:
        batches_left = it

    handle = None
    if config.run is not None and not config.dense:
        info = {"name": "semantic-moe", "top_k": mcfg.top_k if not mcfg.faithful else 1}
        handle = instrument(model, config.run, config.root, flush_every=config.snapshot_every,
                            model_info=info, config={"training": _jsonable(asdict(config)),
                                                     "model": asdict(mcfg)})
    writer = getattr(handle, "writer", None)
    opt = _optimizer(model, config)

    def on_snapshot(step, rows, h):
        nonlocal opt
        counts = {r.layer_id: r.window_counts.to("cpu", copy=True).numpy() for r in model.routers()}
        metrics.last_window = counts
        for r in model.routers():
            r.window_counts.zero_()
        if not config.lifecycle or config.faithful:
            return
        props = policy.propose(rows, counts)
        applied = apply_proposals(model, props, step, writer=writer, policy=policy)
        metrics.lifecycle.extend(applied)
        if any(r["applied"] for r in applied):
            opt = _optimizer(model, config, old=opt)

    if handle is not None:
        handle.on_snapshot(on_snapshot)

    from tqdm import tqdm

    bar = tqdm(total=steps, desc="semantic-moe", disable=not config.progress, unit="step")
    step = 0
    try:
        for x, y in batches_left:
            if step >= steps:
                break
            for r in model.routers():
                r.alpha = _alpha(config, step, steps)
            trace = []
            _, lm_loss = model(x, y, trace=trace)
            loss = lm_loss
            distill = torch.zeros(())
            if not config.faithful and config.distill_weight > 0:   # student learns the teacher's top-1
                for tr in trace:
                    distill = distill + F.cross_entropy(tr.student, tr.teacher.argmax(-1))
                loss = loss + config.distill_weight * distill
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], config.clip_grad)
            opt.step()
            metrics.log("step", step)
            metrics.log("loss", lm_loss.item())
            if writer is not None:
                writer.log_signal(step, "loss", lm_loss.item())
                if model.routers():
                    writer.log_signal(step, "semantic_moe.alpha", model.routers()[0].alpha)
                    writer.log_signal(step, "semantic_moe.distill_loss", distill.item())
            if handle is not None:
                handle.step()
            elif config.lifecycle and not config.dense and (step + 1) % config.snapshot_every == 0:
                _local_snapshot(model, step, on_snapshot)
            # the teacher re-fits while the student is taking over; once alpha reaches its end
            # value it is frozen, so the student's target stops moving
            if (not config.dense and not config.faithful and config.recluster_every > 0
                    and (step + 1) % config.recluster_every == 0
                    and _alpha(config, step, steps) < config.alpha_end):
                for r in model.routers():
                    shift = r.fit_teacher(config.seed + r.layer_id + step)
                    if writer is not None:
                        writer.log_signal(step, "semantic_moe.recluster_shift", shift, layer=r.layer_id)
            if val_batches and ((step + 1) % config.eval_every == 0 or step + 1 == steps):
                ev = evaluate(model, val_batches)
                ev["step"] = step
                metrics.evals.append(ev)
                if writer is not None:
                    writer.log_signal(step, "val_loss", ev["val_loss"])
                    if "agreement" in ev:
                        writer.log_signal(step, "teacher_agreement", ev["agreement"])
                        for r, a in zip(model.routers(), ev["agreement_per_layer"]):
                            writer.log_signal(step, "teacher_agreement", a, layer=r.layer_id)
            step += 1
            bar.update(1)
    finally:
        bar.close()
        if handle is not None:
            handle.detach()

    metrics.final = _final(model, metrics, step)
    metrics.model = model
    return metrics


def _chain(first, it):
    yield from first
    yield from it


def _local_snapshot(model, step, on_snapshot):
    """Without telemetry, build snapshot rows from the routers' own window counts."""
    from chrono.snapshots import layer_rows

    counts = {r.layer_id: r.window_counts.to("cpu", copy=True).numpy() for r in model.routers()}
    rows = layer_rows("local", 0, step, counts)
    on_snapshot(step, rows, None)


def _final(model: SemanticMoELM, metrics: TrainMetrics, steps: int) -> dict:
    from chrono.metrics import summarize

    tail = metrics.history["loss"][-20:]
    f = {"steps": steps, "train_loss": float(np.mean(tail)) if tail else float("nan"),
         "active_params": model.active_params(),
         "total_params": sum(p.numel() for p in model.parameters())}
    if metrics.evals:
        last = metrics.evals[-1]
        f["val_loss"] = last["val_loss"]
        if "agreement" in last:
            f["agreement"] = last["agreement"]
            f["agreement_per_layer"] = last["agreement_per_layer"]
    if model.routers():
        f["layers"], f["n_experts"], f["neff"], f["top2"] = [], [], [], []
        for r in model.routers():
            c = metrics.evals[-1]["counts"].get(r.layer_id) if metrics.evals else None
            if c is None or len(c) != r.n_experts:  # no eval since the last lifecycle change
                c = r.window_counts.to("cpu", copy=True).numpy()
                last = metrics.last_window.get(r.layer_id)
                if c.sum() == 0 and last is not None and len(last) == len(c):
                    c = last   # a snapshot just emptied the window: report the window it closed
            m = summarize(c)
            f["layers"].append(r.layer_id)
            f["n_experts"].append(r.n_experts)
            f["neff"].append(float(m.neff))
            f["top2"].append(float(m.top2_share))
    return f


def _jsonable(d):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out[k] = _jsonable(v)
        elif isinstance(v, (int, float, str, bool, type(None))):
            out[k] = v
        else:
            out[k] = str(v)
    return out
