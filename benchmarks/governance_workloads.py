"""The two workloads of benchmarks/governance.py and the Trainer-free loop that trains one arm.

* ``byte-moe``: a byte-level MoE LM built to collapse (2 MoE layers, 8 experts, top-2,
  sharp router init, a shared offset in every router input, 10x router lr, no top-k
  renormalisation). The model is the one measured in DESIGN §6.
* ``qwen3-moe``: a tiny HF transformers ``Qwen3MoeForCausalLM`` (random init from a
  config, offline; 2 layers, 8 experts, top-2, hidden 64) with its stock router and
  init, not built to collapse, trained on the same bytes.

Both train on the shared corpus ``reference_models.corpus`` (Python's ``pydoc_data.topics``,
90/10 split, same batches per seed for every arm).
Routing is counted by a forward hook on each router (appended after any chrono
override, so it sees the experts really used), turned into snapshot rows every
``every`` steps (``chrono.snapshots.layer_rows``), fed to ``AlertTracker`` and, for
governed arms, to ``chrono.governance.Governor.observe``: the path ``chrono.govern``
takes with probes. The Switch aux loss of every aux arm is ``chrono.actuators``'
``AuxLossActuator`` capture (alpha fixed for baselines, set by the controller for chrono).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chrono.actuators import AuxLossActuator, RouterBiasActuator
from chrono.controller import ControlConfig
from chrono.governance import Governor
from chrono.router_hooks import HookSet
from chrono.snapshots import AlertTracker, layer_rows
from reference_models.moe import mix_experts


# ----------------------------------------------------------------- byte-moe model
@dataclass
class ByteConfig:
    vocab: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    n_experts: int = 8
    top_k: int = 2
    d_expert: int = 128
    seq_len: int = 64
    router_init_std: float = 0.5   # sharp router at init: early winners take all
    shared_offset: float = 1.5     # a fixed shared direction in the router input, |c| = this·sqrt(d)


class Router(nn.Module):
    """Native chrono router (logits, top-k weights = softmax probs, indices) with a
    learnable logit bias, a ``selection_bias`` buffer (top-k choice only) and ``temperature``."""

    def __init__(self, d: int, n_experts: int, top_k: int, init_std: float):
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.weight = nn.Parameter(torch.randn(n_experts, d) * init_std)
        self.logit_bias = nn.Parameter(torch.zeros(n_experts))
        self.register_buffer("selection_bias", torch.zeros(n_experts))
        self.temperature = 1.0

    def forward(self, x):                       # x [T, d]
        logits = x @ self.weight.t() + self.logit_bias                              # [T, E]
        probs = torch.softmax(logits / self.temperature, dim=-1)
        idx = torch.topk(logits + self.selection_bias, self.top_k, dim=-1).indices  # [T, k]
        return logits, probs.gather(-1, idx), idx


class ByteMoE(nn.Module):
    def __init__(self, cfg: ByteConfig):
        super().__init__()
        self.router = Router(cfg.d_model, cfg.n_experts, cfg.top_k, cfg.router_init_std)
        self.w1 = nn.Parameter(torch.randn(cfg.n_experts, cfg.d_model, cfg.d_expert) / math.sqrt(cfg.d_model))
        self.w2 = nn.Parameter(torch.randn(cfg.n_experts, cfg.d_expert, cfg.d_model) / math.sqrt(cfg.d_expert))

    def forward(self, x, route_x):              # x [B, S, d] expert input, route_x: router input
        B, S, d = x.shape
        flat = x.reshape(-1, d)
        _, w, idx = self.router(route_x.reshape(-1, d))
        out = mix_experts(flat, idx, w, lambda e, h: F.gelu(h @ self.w1[e]) @ self.w2[e], self.w1.shape[0])
        return out.reshape(B, S, d)


class ByteBlock(nn.Module):
    def __init__(self, cfg: ByteConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = nn.MultiheadAttention(cfg.d_model, cfg.n_heads, batch_first=True)
        self.moe = ByteMoE(cfg)
        self.register_buffer("mask", torch.triu(torch.ones(cfg.seq_len, cfg.seq_len, dtype=torch.bool), 1))

    def forward(self, x):
        S = x.shape[1]
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=self.mask[:S, :S], need_weights=False)[0]
        return x + self.moe(self.ln2(x), x)     # the router reads the raw residual stream


class ByteMoELM(nn.Module):
    def __init__(self, cfg: ByteConfig):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Parameter(torch.randn(cfg.seq_len, cfg.d_model) * 0.02)
        c = torch.randn(cfg.d_model, generator=torch.Generator().manual_seed(7))
        self.register_buffer("offset", c / c.norm() * cfg.shared_offset * math.sqrt(cfg.d_model))
        self.blocks = nn.ModuleList(ByteBlock(cfg) for _ in range(cfg.n_layers))
        self.ln = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)

    def forward(self, x):                       # x [B, S] bytes -> logits [B, S, vocab]
        h = self.emb(x) + self.pos[: x.shape[1]] + self.offset
        for b in self.blocks:
            h = b(h)
        return self.head(self.ln(h))


# ----------------------------------------------------------------- workloads
@dataclass(frozen=True)
class Workload:
    name: str
    steps: int
    batch: int
    seq_len: int
    lr: float
    router_lr_mult: float
    eval_batches: int
    quick: bool = False

    def build(self, seed: int):
        """(model, {layer: (router, n_experts)}, logits_fn) with weights drawn from ``seed``."""
        torch.manual_seed(seed)
        if self.name == "byte-moe":
            cfg = ByteConfig(d_model=48, d_expert=96, seq_len=self.seq_len) if self.quick \
                else ByteConfig(seq_len=self.seq_len)
            model = ByteMoELM(cfg)
            routers = {i: (b.moe.router, cfg.n_experts) for i, b in enumerate(model.blocks)}
            return model, routers, model
        if self.name == "qwen3-moe":
            from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

            cfg = Qwen3MoeConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                 moe_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, num_experts=8,
                                 num_experts_per_tok=2, max_position_embeddings=self.seq_len,
                                 norm_topk_prob=True, router_aux_loss_coef=0.0, tie_word_embeddings=False)
            model = Qwen3MoeForCausalLM(cfg)
            routers = {i: (layer.mlp.gate, 8) for i, layer in enumerate(model.model.layers)}
            return model, routers, (lambda x: model(input_ids=x, use_cache=False).logits)
        raise ValueError(f"unknown workload {self.name!r}")


def workloads(quick: bool) -> dict[str, Workload]:
    if quick:
        return {"byte-moe": Workload("byte-moe", 150, 12, 48, 3e-3, 10.0, 4, quick=True),
                "qwen3-moe": Workload("qwen3-moe", 150, 12, 48, 3e-3, 1.0, 4, quick=True)}
    return {"byte-moe": Workload("byte-moe", 600, 16, 64, 3e-3, 10.0, 16),
            "qwen3-moe": Workload("qwen3-moe", 600, 16, 64, 3e-3, 1.0, 16)}


def load_text() -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) int64 byte tensors of the shared corpus (``reference_models.corpus``, 90/10)."""
    from reference_models.corpus import split_bytes, text_bytes

    return split_bytes(torch.from_numpy(text_bytes().astype(np.int64)))


def batch(data: torch.Tensor, bs: int, seq: int, gen: torch.Generator):
    ix = torch.randint(0, len(data) - seq - 1, (bs,), generator=gen)
    return (torch.stack([data[i:i + seq] for i in ix]), torch.stack([data[i + 1:i + seq + 1] for i in ix]))


# ----------------------------------------------------------------- one run
def _counter(routers: dict, hooks: HookSet) -> dict[int, torch.Tensor]:
    counts = {l: torch.zeros(n, dtype=torch.int64) for l, (_, n) in routers.items()}

    def make(layer):
        def hook(module, args, output):
            idx = output[2].detach().reshape(-1)
            counts[layer].scatter_add_(0, idx.long(), torch.ones_like(idx, dtype=torch.int64))
        return hook
    for l, (r, _) in routers.items():
        hooks.forward(r, make(l))
    return counts


def train_arm(wl: Workload, spec: dict, seed: int, every: int, train, val, arm: str = "") -> dict:
    """Train one (workload, arm, seed); returns the per-run record (no curve aggregation)."""
    model, routers, logits_fn = wl.build(seed)
    router_ids = {id(p) for r, _ in routers.values() for p in r.parameters()}
    opt = torch.optim.AdamW([
        {"params": [p for p in model.parameters() if id(p) not in router_ids], "lr": wl.lr},
        {"params": [p for r, _ in routers.values() for p in r.parameters()], "lr": wl.lr * wl.router_lr_mult},
    ], weight_decay=0.0)
    gov, extra = None, []
    if "govern" in spec:
        gov = Governor(routers, spec["govern"], ControlConfig(**spec.get("config", {})),
                       actuator_kwargs=spec.get("kw"))
    if spec.get("alpha"):
        extra = [AuxLossActuator(l, alpha_min=spec["alpha"], alpha_max=spec["alpha"], router=r, n_experts=n)
                 for l, (r, n) in routers.items()]
    if spec.get("rate"):
        extra = [RouterBiasActuator(r, l, n, rate=spec["rate"], pressure_scaled=False)
                 for l, (r, n) in routers.items()]
    hooks = HookSet()
    counts = _counter(routers, hooks)            # installed last: sees the biased choice
    # the controller's sample period may be shorter than the alert window (spec "control_every");
    # alerts and the curve keep `every`-step windows either way
    ctl_every = int(spec.get("control_every", every))
    ctl_counts = counts if ctl_every == every else _counter(routers, hooks)
    tracker, gen = AlertTracker(), torch.Generator().manual_seed(10_000 + seed)
    first = {"PRE_COLLAPSE": None, "COLLAPSE_CONFIRMED": None}
    curve, last_rows, effort = [], [], []
    t0 = time.perf_counter()
    for step in range(wl.steps):
        model.train()
        x, y = batch(train, wl.batch, wl.seq_len, gen)
        logits = logits_fn(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        total = loss
        for a in extra:
            if isinstance(a, AuxLossActuator):
                total = total + a.loss()
        if gov is not None:
            total = total + gov.aux_loss()
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        for a in extra:
            a.on_step()
        if gov is not None:
            gov.step()
        if gov is not None and ctl_counts is not counts and (step + 1) % ctl_every == 0:
            window = {l: c.numpy().copy() for l, c in ctl_counts.items()}
            for c in ctl_counts.values():
                c.zero_()
            ds = gov.observe(step, layer_rows(f"{arm}-{seed}", step + 1 - ctl_every, step, window))
            effort.append(float(np.mean([d.pressure for d in ds])))
        if (step + 1) % every == 0:
            window = {l: c.numpy().copy() for l, c in counts.items()}
            for c in counts.values():
                c.zero_()
            rows = layer_rows(f"{arm}-{seed}", step + 1 - every, step, window)
            for tr in tracker.update(rows):
                if tr["transition"] == "raised" and first[tr["alert"]] is None:
                    first[tr["alert"]] = tr["step"]
            if gov is not None and ctl_counts is counts:
                ds = gov.observe(step, rows)
                effort.append(float(np.mean([d.pressure for d in ds])))
            per = [r for r in rows if r["layer"] >= 0]
            curve.append([step, round(float(np.mean([r["neff"] for r in per])), 4),
                          round(float(min(r["neff"] for r in per)), 4), round(float(loss.detach()), 4)])
            last_rows = per
    wall = time.perf_counter() - t0
    model.eval()
    vgen = torch.Generator().manual_seed(999)
    with torch.no_grad():
        vl = [F.cross_entropy(logits_fn(xv).reshape(-1, 256), yv.reshape(-1)).item()
              for xv, yv in (batch(val, wl.batch, wl.seq_len, vgen) for _ in range(wl.eval_batches))]
    hooks.remove()
    if gov is not None:
        gov.remove()
    for a in extra:
        a.remove()
    return {
        "workload": wl.name, "arm": arm, "seed": seed, "steps": wl.steps,
        "final_neff": [r["neff"] for r in last_rows],
        "final_top2": [r["top2_share"] for r in last_rows],
        "dead": [r["dead"] for r in last_rows],
        "first_pre_collapse": first["PRE_COLLAPSE"],
        "first_collapse_confirmed": first["COLLAPSE_CONFIRMED"],
        "val_loss": float(np.mean(vl)), "wall_s": wall,
        "mean_effort": float(np.mean(effort)) if effort else None,
        "curve": curve,   # [step, mean Neff over layers, worst layer Neff, train loss] per window
    }
