"""Training of Bio-MoE on sklearn's load_digits with staged growth, distillation, routed
learning, MeritBoard bandit bias, neurogenesis and pruning; telemetry into chrono.

Modes:
* ``intended`` - the design as its text says: per-sample routed learning (an expert learns
  from the samples routed to it), UCB exploration bias, a small Switch load-balancing loss
  (Fedus et al. 2021, alpha * E * sum f_i P_i), entropy-triggered neurogenesis and pruning of
  low-utilisation experts through ``chrono.lifecycle``.
* ``faithful`` - the original's behaviour: the gate is not trained by backprop (experts
  learn locally), per-batch routed learning (only the expert that received most of the batch
  updates), a greedy bandit bias from cumulative credit (pure exploitation), no balancing.
  Accuracy stays high while almost all traffic ends on one expert.

Both grow 1 -> 3 -> 6 experts at ``growth_epochs``; each new expert is a clone of the most
used expert, bootstrapped by distillation alone (alpha 1.0, other experts frozen), then
trained with 0.5 * distillation + task loss for one epoch.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from chrono.actuators import switch_balance_loss
from chrono.lifecycle import (LifecycleConfig, LifecyclePolicy, Proposal, apply_proposals,
                              record_event)

from .model import BioMoE, BioMoEConfig, zone_config


@dataclass
class BioTrainConfig:
    mode: str = "intended"
    epochs: int = 24
    batch_size: int = 64
    learning_rate: float = 3e-3
    growth_epochs: tuple = (4, 8)        # epochs at which the expert set grows
    growth_sizes: tuple = (3, 6)         # active experts after each growth
    bootstrap_steps: int = 20            # distillation-only steps for a new expert (alpha 1.0)
    distill_alpha: float = 0.5           # distillation weight during the epoch after growth
    balance_weight: float = 0.05         # Switch aux loss weight (intended only)
    lifecycle: bool = True               # neurogenesis + pruning through chrono.lifecycle
    teach_spawned: bool = True           # a spawned expert is taught by the busiest expert (intended)
    lifecycle_config: LifecycleConfig = field(default_factory=lambda: LifecycleConfig(
        min_experts=2, max_experts=8, prune_share=0.02, patience=2, cooldown=2,
        spawn_entropy=0.97, enable=("prune", "spawn")))
    faithful_bandit_scale: float = 1.0   # weight of the greedy credit bias in faithful mode
    zone: str | None = None
    seed: int = 0
    run: str | None = None
    root: str = "chrono_runs"
    progress: bool = False

    def model_config(self) -> BioMoEConfig:
        base = zone_config(self.zone, seed=self.seed) if self.zone else BioMoEConfig(seed=self.seed)
        if self.mode == "faithful":
            base.bandit = "greedy"
            base.bandit_scale = self.faithful_bandit_scale
        return base


NEUROGENESIS_ENTROPY = 0.8   # the neurogenesis setting's trigger (see neurogenesis_config)


def neurogenesis_config(**overrides) -> BioTrainConfig:
    """The documented intended-mode setting in which neurogenesis fires (docs/workloads.md).

    Staged growth stops at 3 experts (epoch 4); from then on the expert set is the
    lifecycle's: after one settling epoch, an epoch whose mean normalised gate entropy
    (``_gate_entropy``: mean per-sample entropy / ln n, 1 = uniform) exceeds
    ``NEUROGENESIS_ENTROPY`` spawns a fresh expert, which the busiest expert of the window then
    teaches (alpha 1.0 bootstrap, then ``distill_alpha`` for one epoch). Why not the default:
    with growth to 6 the gate specialises (its entropy falls from ~0.87 to ~0.64 over the
    epochs after growth, seed 0) and never reaches the default trigger 0.97, so neurogenesis
    never fires there. The threshold was set from that training-time entropy trajectory, not
    from test accuracy.
    """
    base = dict(mode="intended", growth_epochs=(4,), growth_sizes=(3,),
                lifecycle_config=LifecycleConfig(min_experts=2, max_experts=8, prune_share=0.02, patience=2,
                                                 cooldown=2, spawn_entropy=NEUROGENESIS_ENTROPY,
                                                 enable=("prune", "spawn")))
    base.update(overrides)
    return BioTrainConfig(**base)


@dataclass
class BioResult:
    epochs: list = field(default_factory=list)   # per-epoch dicts
    lifecycle: list = field(default_factory=list)
    teach: list = field(default_factory=list)    # neurogenesis teach phases (MSE to the teacher)
    final: dict = field(default_factory=dict)

    def summary(self) -> str:
        f = self.final
        shares = ", ".join(f"{s:.3f}" for s in f.get("shares", []))
        return (f"{f.get('mode')}: test accuracy {f.get('accuracy', float('nan')):.4f}, "
                f"{f.get('n_experts')} active experts, Neff {f.get('neff', float('nan')):.2f}, "
                f"Top2 {f.get('top2', float('nan')):.3f}, shares [{shares}]\n"
                f"first-choice traffic of the busiest expert: {f.get('top1_max_share', float('nan')):.3f}\n"
                f"lifecycle events applied: {sum(1 for r in self.lifecycle if r['applied'])}"
                f" ({', '.join(sorted({r['event'] for r in self.lifecycle if r['applied']}))})"
                + (f"\nalerts raised: {f['alerts']}" if f.get("alerts") else ""))


def _gate_entropy(p: torch.Tensor) -> float:
    """Mean per-sample gate entropy normalised by ln(n) (1 = uniform, 0 = certain)."""
    n = p.shape[-1]
    if n < 2:
        return 0.0
    ent = -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()
    return float(ent / np.log(n))


@torch.no_grad()
def evaluate(model: BioMoE, x, y) -> dict:
    model.eval()
    logits = model(x)
    idx = model.router.last["idx"][:, 0]
    pred = logits.argmax(-1)
    correct = (pred == y).float()
    n = model.router.n_experts
    counts = torch.bincount(model.router.last["idx"].reshape(-1), minlength=n)[:n].numpy()
    per = [float(correct[idx == j].mean()) if (idx == j).any() else float("nan") for j in range(n)]
    first = torch.bincount(idx, minlength=n)[:n].numpy()
    model.train()
    return {"accuracy": float(correct.mean()), "counts": counts, "first_choice": first,
            "routed_accuracy": per,
            "gate_entropy": _gate_entropy(model.router.last["probs"])}


class _BioLifecycle:
    """chrono.lifecycle.LifecycleModel over BioMoE (compact expert ids <-> slots).

    Neurogenesis then teaching: when ``teacher_slot`` is set (the trainer sets it to the
    window's busiest expert before applying proposals), an applied spawn records that expert
    as the new expert's ``source_expert`` in the lifecycle row and queues ``(new slot,
    teacher slot)`` in ``spawned``; the trainer then teaches the new expert by distillation
    (alpha 1.0 bootstrap, then ``distill_alpha`` for one epoch), as in staged growth.
    """

    def __init__(self, model: BioMoE, seed: int):
        self.model, self.seed = model, seed
        self.teacher_slot: int | None = None
        self.spawned: list[tuple[int, int]] = []

    def lifecycle_experts(self):
        return {0: self.model.router.n_experts}

    def apply_lifecycle(self, p: Proposal):
        m = self.model
        act = m.router.active
        if p.event == "prune" and 0 <= p.expert < len(act):
            slot = act[p.expert]
            return p.expert if m.prune(slot) else None
        if p.event == "spawn":
            slot = m.spawn(self.seed + 977 * len(act))
            if slot is None:
                return None
            if self.teacher_slot is not None and self.teacher_slot in m.router.active:
                p.source_expert = m.router.active.index(self.teacher_slot)
                p.reason += f"; taught by expert {p.source_expert} (busiest of the window)"
                self.spawned.append((slot, self.teacher_slot))
            return m.router.active.index(slot)
        if p.event in ("clone", "split") and 0 <= p.expert < len(act):
            slot = m.grow_clone(act[p.expert], self.seed + 131 * len(act))
            return None if slot is None else m.router.active.index(slot)
        return None


def train_bio(config: BioTrainConfig) -> BioResult:
    from reference_models.common import digits_split, instrument, set_seed

    if config.mode not in ("intended", "faithful"):
        raise ValueError(f"mode must be intended or faithful, not {config.mode!r}")
    set_seed(config.seed)
    faithful = config.mode == "faithful"
    xtr, ytr, xte, yte = digits_split()
    model = BioMoE(config.model_config())
    if faithful:  # the original's router is not trained by backprop: experts learn locally
        for p in list(model.router.gate.parameters()) + list(model.router.group_gate.parameters()):
            p.requires_grad_(False)
    life = _BioLifecycle(model, config.seed)
    policy = LifecyclePolicy(config.lifecycle_config)
    g = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = len(xtr) // config.batch_size
    result = BioResult()

    handle = None
    if config.run is not None:
        handle = instrument(model, config.run, config.root, flush_every=steps_per_epoch,
                            model_info={"name": "bio-moe", "top_k": model.cfg.top_k},
                            config={"training": {k: (v if isinstance(v, (int, float, str, bool, type(None), tuple))
                                                     else str(v)) for k, v in asdict(config).items()},
                                    "model": asdict(model.cfg)})
    writer = getattr(handle, "writer", None)
    opt = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    distilling: dict[int, int] = {}      # new slot -> teacher slot, during the epoch after growth
    window_counts = np.zeros(model.router.n_experts, dtype=np.int64)
    window_entropy: list[float] = []
    step = 0
    stage = 0

    def log(step_, name, value, layer=None):
        if writer is not None and value is not None and np.isfinite(value):
            writer.log_signal(step_, name, value, layer=layer)

    from tqdm import tqdm

    for epoch in tqdm(range(config.epochs), desc=f"bio-moe {config.mode}", disable=not config.progress):
        # ---- staged growth 1 -> 3 -> 6 (clone + distill)
        if stage < len(config.growth_epochs) and epoch == config.growth_epochs[stage]:
            target = config.growth_sizes[stage]
            stage += 1
            teacher = model.router.active[int(np.argmax(window_counts))] if window_counts.sum() else model.router.active[0]
            new_slots = []
            while model.router.n_experts < target:
                slot = model.grow_clone(teacher, config.seed * 1000 + step + len(new_slots))
                if slot is None:
                    break
                new_slots.append(slot)
                result.lifecycle.append(record_event(
                    writer, step, 0, "clone", model.router.active.index(slot), model.router.n_experts,
                    source_expert=model.router.active.index(teacher),
                    reason=f"staged growth to {target} (slot {slot} from slot {teacher})"))
            result.lifecycle.append(record_event(writer, step, 0, "grow", model.router.n_experts - 1,
                                                 model.router.n_experts, reason=f"stage {stage}: "
                                                 f"{target} experts at epoch {epoch}"))
            _bootstrap(model, new_slots, teacher, xtr, config, g)
            distilling = {s: teacher for s in new_slots}
            policy.reset_layer(0)
            window_counts = np.zeros(model.router.n_experts, dtype=np.int64)
        perm = torch.randperm(len(xtr), generator=g)
        losses = []
        for b in range(steps_per_epoch):
            ib = perm[b * config.batch_size:(b + 1) * config.batch_size]
            x, y = xtr[ib], ytr[ib]
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            r = model.router
            probs, idx = r.last["probs"], r.last["idx"]
            n = r.n_experts
            top1 = idx[:, 0]
            if not faithful and config.balance_weight > 0 and n > 1:   # Switch aux loss, top-1 f
                loss = loss + switch_balance_loss(probs, top1, n, alpha=config.balance_weight)
            if distilling and config.distill_alpha > 0:
                h = model.last_hidden.detach()
                for s, t in distilling.items():
                    with torch.no_grad():
                        target_out = model.experts[t](h)
                    loss = loss + config.distill_alpha * F.mse_loss(model.experts[s](h), target_out)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            counts = torch.bincount(top1, minlength=n)[:n].numpy()
            if faithful:  # routed learning per batch: only the most-routed expert updates
                winner = r.active[int(np.argmax(counts))]
                model.set_frozen([s for s in r.active if s != winner], True)
                model.set_frozen([winner], False)
            model.zero_frozen_grads()
            opt.step()
            if faithful:
                model.set_frozen(range(model.cfg.max_experts), False)
            correct = (logits.argmax(-1) == y).numpy()
            r.board.update(r.active, top1.numpy(), correct)
            window_counts = window_counts + torch.bincount(idx.reshape(-1), minlength=n)[:n].numpy() \
                if len(window_counts) == n else torch.bincount(idx.reshape(-1), minlength=n)[:n].numpy()
            window_entropy.append(_gate_entropy(probs.detach()))
            losses.append(float(loss.detach()))
            log(step, "loss", losses[-1])
            if handle is not None:
                handle.step()
            step += 1
        distilling = {}   # the distillation epoch after a growth (or a spawn, set below) is over
        # ---- end of epoch: test accuracy, per-expert signals, lifecycle
        ev = evaluate(model, xte, yte)
        unc = float(np.mean(window_entropy)) if window_entropy else 0.0
        share = window_counts / max(1, window_counts.sum())
        result.epochs.append({"epoch": epoch, "step": step - 1, "loss": float(np.mean(losses)),
                              "accuracy": ev["accuracy"], "n_experts": model.router.n_experts,
                              "gate_entropy": unc, "shares": share.tolist(),
                              "routed_accuracy": ev["routed_accuracy"]})
        log(step - 1, "accuracy", ev["accuracy"])
        log(step - 1, "bio_moe.gate_entropy", unc)
        log(step - 1, "bio_moe.active_experts", model.router.n_experts)
        log(step - 1, "bio_moe.spike_rate", model.kwta.last_spike_rate)
        for j, slot in enumerate(model.router.active):
            log(step - 1, f"bio_moe.utilisation.e{j}", float(share[j]) if j < len(share) else 0.0)
            log(step - 1, f"bio_moe.routed_accuracy.e{j}", ev["routed_accuracy"][j])
            log(step - 1, f"bio_moe.merit.e{j}", float(model.router.board.merit[slot]))
        # lifecycle once growth is over and the last grown set has had one epoch to settle
        # (right after cloning, the clones are indistinguishable and the gate entropy says nothing)
        settled = stage == len(config.growth_epochs) and (not config.growth_epochs
                                                           or epoch > config.growth_epochs[-1])
        if config.lifecycle and not faithful and settled and len(window_counts) == model.router.n_experts:
            from chrono.snapshots import layer_rows

            rows = layer_rows(config.run or "local", step - steps_per_epoch, step - 1, {0: window_counts})
            props = policy.propose(rows, {0: window_counts}, uncertainty={0: unc})
            life.teacher_slot = model.router.active[int(np.argmax(window_counts))] if config.teach_spawned else None
            life.spawned = []
            applied = apply_proposals(life, props, step - 1, writer=writer, policy=policy)
            result.lifecycle.extend(applied)
            for slot, teacher in life.spawned:     # neurogenesis -> teach (bootstrap, then distil an epoch)
                before, after = _bootstrap(model, [slot], teacher, xtr, config, g)
                distilling[slot] = teacher
                result.teach.append({"epoch": epoch, "step": step - 1, "slot": slot, "teacher_slot": teacher,
                                     "mse_before": before, "mse_after": after})
                log(step - 1, "bio_moe.teach_mse_before", before)
                log(step - 1, "bio_moe.teach_mse_after", after)
            if any(a["applied"] for a in applied):
                opt = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
        window_counts = np.zeros(model.router.n_experts, dtype=np.int64)
        window_entropy = []
        if writer is not None:
            writer.flush()
    if handle is not None:
        handle.detach()

    from chrono.metrics import summarize

    ev = evaluate(model, xte, yte)
    m = summarize(ev["counts"])
    result.final = {"mode": config.mode, "accuracy": ev["accuracy"], "n_experts": model.router.n_experts,
                    "neff": float(m.neff), "top2": float(m.top2_share),
                    "shares": (ev["counts"] / max(1, ev["counts"].sum())).tolist(),
                    "top1_max_share": float(ev["first_choice"].max() / max(1, ev["first_choice"].sum())),
                    "last_epoch_shares": result.epochs[-1]["shares"] if result.epochs else []}
    if config.run is not None:
        result.final["alerts"] = _alerts(config)
    result.model = model
    return result


def _bootstrap(model: BioMoE, new_slots, teacher: int, xtr, config: BioTrainConfig, g):
    """Alpha 1.0 distillation: new experts learn to reproduce the teacher; nothing else moves.

    Returns (MSE to the teacher before, after) on the bootstrap's first batch (nan if skipped).
    """
    if not new_slots or config.bootstrap_steps <= 0:
        return float("nan"), float("nan")
    params = [p for s in new_slots for p in model.experts[s].parameters()]
    opt = torch.optim.Adam(params, lr=config.learning_rate)
    for i in range(config.bootstrap_steps):
        ib = torch.randint(0, len(xtr), (config.batch_size,), generator=g)
        with torch.no_grad():
            h = model.features(xtr[ib])
            target = model.experts[teacher](h)
        loss = sum(F.mse_loss(model.experts[s](h), target) for s in new_slots)
        if i == 0:
            probe, before = (h, target), float(loss.detach()) / len(new_slots)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(sum(F.mse_loss(model.experts[s](probe[0]), probe[1]) for s in new_slots)) / len(new_slots)
    return before, after


def _alerts(config: BioTrainConfig) -> dict:
    import chrono

    con = chrono.connect(config.root)
    rows = con.execute("SELECT alert, min(step), count(*) FROM alerts WHERE run_id = ? AND transition = 'raised' "
                       "GROUP BY alert", [config.run]).fetchall()
    return {a: {"first_step": int(s), "raised": int(n)} for a, s, n in rows}
