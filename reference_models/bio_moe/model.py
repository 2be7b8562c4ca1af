"""Bio-MoE: a PyTorch port of the bio-inspired liquid mixture-of-experts, in one file.

    x [B, 64] (8x8 digit) -> projection [B, P] -> phasor bank [B, 2F] (temporal resonance)
      -> hidden [B, H] -> k-WTA spiking attention gains [B, H] -> liquid-MoE core [B, H]
      -> classifier [B, 10]

The liquid-MoE core holds ``max_experts`` expert slots (liquid time-constant cells); the
``active`` slots form the expert set seen by routing (compact indices 0..n-1, so chrono's
``n_experts`` is the number of active experts). Gating: temperature softmax of router logits
plus a MeritBoard bandit bias (UCB or Exp3, with momentum), optionally hierarchical (a
softmax over groups times a softmax within the group); soft top-k (k = 2) mixture.

Growth, cloning with distillation, per-expert freezing, routed learning, neurogenesis and
pruning are driven by ``train.py`` through the methods here (``grow_clone``, ``spawn``,
``prune``, ``freeze_mask``); ``save_expert`` / ``load_expert`` checkpoint one expert.

The router follows chrono's native router protocol (``chrono_router``, ``n_experts``,
``top_k``, ``layer_id``; forward -> (logits [B, E], weights [B, k], indices [B, k])).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class BioMoEConfig:
    n_in: int = 64
    d_proj: int = 64
    n_phasors: int = 16          # oscillators in the phasor bank (2 features each: Re, Im)
    phasor_damping: float = 0.05
    d_hidden: int = 64
    kwta_k: int = 16             # winners of the k-WTA spiking attention
    kwta_gain: float = 0.5       # winners' gain is 1 + kwta_gain
    n_classes: int = 10
    max_experts: int = 8
    top_k: int = 2
    temperature: float = 1.0
    group_size: int = 3          # hierarchical gating: experts per group (0 = flat gating)
    liquid_steps: int = 3
    liquid_dt: float = 0.5
    bandit: str = "ucb"          # ucb | exp3 | greedy (exploit cumulative credit only)
    bandit_scale: float = 0.5    # bias added to gate logits = scale * bandit score
    bandit_momentum: float = 0.9
    ucb_c: float = 1.0
    exp3_gamma: float = 0.1
    seed: int = 0


# Zone registry: presets named after brain regions (what each stresses in the design).
ZONES: dict[str, dict] = {
    # fast plasticity, many experts, eager neurogenesis
    "hippocampus": dict(max_experts=8, kwta_k=24, bandit="ucb", ucb_c=1.5),
    # sharp, decisive gating: low temperature, flat gating
    "amygdala": dict(temperature=0.5, group_size=0, bandit="greedy"),
    # homeostasis: exploration-heavy Exp3 bandit keeps load level
    "hypothalamus": dict(bandit="exp3", exp3_gamma=0.2, bandit_scale=1.0),
    # relay: shallow liquid cells, sparse winners
    "thalamus": dict(liquid_steps=1, kwta_k=8, group_size=2),
    # temporal features matter: a richer phasor bank
    "language": dict(n_phasors=32, phasor_damping=0.02, liquid_steps=4),
}


def zone_config(zone: str, **overrides) -> BioMoEConfig:
    if zone not in ZONES:
        raise ValueError(f"unknown zone {zone!r}; zones: {', '.join(ZONES)}")
    return replace(BioMoEConfig(**ZONES[zone]), **overrides)


# ---------------------------------------------------------------- front end
class PhasorBank(nn.Module):
    """Temporal resonance features: the projected vector read as a signal u_t over t = 0..P-1,
    each oscillator k returns r_k = sum_t u_t exp(-damping (P-1-t)) exp(i w_k t) as (Re, Im).
    A damped DFT-like bank (frequencies spread over (0, pi)); fixed, not trained."""

    def __init__(self, length: int, n: int, damping: float):
        super().__init__()
        t = torch.arange(length, dtype=torch.float32)
        w = torch.linspace(math.pi / (n + 1), math.pi * n / (n + 1), n)
        decay = torch.exp(-damping * (length - 1 - t))[:, None]           # [P, 1]
        basis = torch.cat([decay * torch.cos(w[None] * t[:, None]),
                           decay * torch.sin(w[None] * t[:, None])], 1)    # [P, 2F]
        self.register_buffer("basis", basis / math.sqrt(length))

    def forward(self, u):  # [B, P] -> [B, 2F]
        return u @ self.basis


class KWTAAttention(nn.Module):
    """k-winners-take-all spiking gains: the k most active units of each sample spike and are
    amplified by (1 + gain); the spike mask carries no gradient (as a spike would not)."""

    def __init__(self, k: int, gain: float):
        super().__init__()
        self.k, self.gain = k, gain
        self.last_spike_rate = 0.0

    def forward(self, h):  # [B, H] -> [B, H]
        k = min(self.k, h.shape[-1])
        thresh = h.detach().abs().topk(k, dim=-1).values[:, -1:]
        spikes = (h.detach().abs() >= thresh).float()
        self.last_spike_rate = float(spikes.mean())
        return h * (1.0 + self.gain * spikes)


class LiquidExpert(nn.Module):
    """Liquid time-constant cell unrolled for a few Euler steps:
    s <- s + dt * (-s / tau + tanh(W s + U h + b)), tau = softplus(.) > 0 per unit
    (after Hasani et al., Liquid Time-constant Networks, 2021)."""

    def __init__(self, d: int, steps: int, dt: float):
        super().__init__()
        self.U = nn.Linear(d, d)
        self.W = nn.Linear(d, d, bias=False)
        nn.init.zeros_(self.W.weight)
        self.tau_raw = nn.Parameter(torch.zeros(d))
        self.steps, self.dt = steps, dt

    def forward(self, h):  # [N, H] -> [N, H]
        tau = F.softplus(self.tau_raw) + 0.5
        drive = self.U(h)
        s = torch.zeros_like(h)
        for _ in range(self.steps):
            s = s + self.dt * (-s / tau + torch.tanh(self.W(s) + drive))
        return s


# ---------------------------------------------------------------- gating
class MeritBoard:
    """Per-slot merit (EMA of routed accuracy) and bandit scores turned into a gate bias.

    UCB1 (Auer et al. 2002): merit + c * sqrt(2 ln N / n_e).  Exp3 (Auer et al. 2002):
    weights w_e <- w_e * exp(gamma * r_e / (p_e K)), p = (1 - gamma) w / sum w + gamma / K,
    bias = log(p K).  Greedy: log(1 + cumulative credit), credit = correct predictions routed
    to the expert so far: pure exploitation where traffic earns credit earns traffic.  The bias follows its target
    with momentum so routing does not jump between batches."""

    def __init__(self, slots: int, cfg: BioMoEConfig):
        self.cfg = cfg
        self.merit = np.full(slots, 0.5)
        self.pulls = np.zeros(slots)
        self.credit = np.zeros(slots)
        self.exp3_w = np.ones(slots)
        self.bias = np.zeros(slots)

    def update(self, active: list[int], routed: np.ndarray, correct: np.ndarray) -> None:
        """routed[i]: compact top-1 expert of sample i; correct[i]: prediction was right."""
        cfg, K = self.cfg, len(active)
        for j, slot in enumerate(active):
            mask = routed == j
            n = int(mask.sum())
            if n == 0:
                continue
            acc = float(correct[mask].mean())
            self.merit[slot] = 0.9 * self.merit[slot] + 0.1 * acc
            self.pulls[slot] += n
            self.credit[slot] += float(correct[mask].sum())
            if cfg.bandit == "exp3":
                p = self._exp3_p(active)[j]
                self.exp3_w[slot] *= math.exp(cfg.exp3_gamma * acc / (p * K) * min(1.0, n / len(routed)))
        w = self.exp3_w[active]
        self.exp3_w[active] = w / w.max()
        target = self.scores(active)
        m = cfg.bandit_momentum
        self.bias[active] = m * self.bias[active] + (1 - m) * target

    def _exp3_p(self, active):
        w = self.exp3_w[active]
        K = len(active)
        return (1 - self.cfg.exp3_gamma) * w / w.sum() + self.cfg.exp3_gamma / K

    def scores(self, active: list[int]) -> np.ndarray:
        cfg = self.cfg
        if cfg.bandit == "greedy":
            s = np.log1p(self.credit[active])
        elif cfg.bandit == "exp3":
            s = np.log(self._exp3_p(active) * len(active))
        elif cfg.bandit == "ucb":
            total = self.pulls[active].sum() + 1.0
            s = self.merit[active] + cfg.ucb_c * np.sqrt(2 * np.log(total) / (self.pulls[active] + 1.0))
        else:
            raise ValueError(f"unknown bandit {cfg.bandit!r}: ucb, exp3 or greedy")
        return s - s.mean()

    def reset_slot(self, slot: int, like: int | None = None) -> None:
        """Fresh statistics for a (re)activated slot; a clone inherits merit and bias of ``like``."""
        self.merit[slot] = self.merit[like] if like is not None else 0.5
        self.pulls[slot] = 0.0
        self.credit[slot] = 0.0
        self.exp3_w[slot] = 1.0
        self.bias[slot] = self.bias[like] if like is not None else 0.0

    def state(self) -> dict:
        return {k: getattr(self, k).copy() for k in ("merit", "pulls", "credit", "exp3_w", "bias")}

    def load(self, st: dict) -> None:
        for k, v in st.items():
            getattr(self, k)[:] = v


class BioRouter(nn.Module):
    """Gate over the active slots: (hierarchical) temperature softmax + bandit bias, top-k."""

    chrono_router = True

    def __init__(self, cfg: BioMoEConfig):
        super().__init__()
        self.cfg = cfg
        self.layer_id = 0
        self.gate = nn.Linear(cfg.d_hidden, cfg.max_experts)
        n_groups = max(1, math.ceil(cfg.max_experts / cfg.group_size)) if cfg.group_size else 1
        self.group_gate = nn.Linear(cfg.d_hidden, n_groups)
        self.board = MeritBoard(cfg.max_experts, cfg)
        self.active: list[int] = [0]
        self.temperature = cfg.temperature
        self.last: dict = {}

    @property
    def n_experts(self) -> int:
        return len(self.active)

    @property
    def top_k(self) -> int:
        return min(self.cfg.top_k, len(self.active))

    def probs(self, h):
        """Gate probabilities over active experts [B, n] and the biased logits."""
        act = torch.tensor(self.active, device=h.device)
        bias = torch.as_tensor(self.board.bias[self.active], dtype=h.dtype, device=h.device)
        logits = self.gate(h)[:, act] / self.temperature + bias        # [B, n]
        if self.cfg.group_size and len(self.active) > 1:
            groups = act // self.cfg.group_size                          # group of each active slot
            g_logits = self.group_gate(h) / self.temperature             # [B, G]
            present = torch.unique(groups)
            g_logp = torch.full_like(g_logits, float("-inf"))
            g_logp[:, present] = F.log_softmax(g_logits[:, present], -1)
            logp = torch.empty_like(logits)
            for g in present.tolist():  # within-group softmax times group probability
                cols = (groups == g).nonzero(as_tuple=True)[0]
                logp[:, cols] = F.log_softmax(logits[:, cols], -1) + g_logp[:, g:g + 1]
        else:
            logp = F.log_softmax(logits, -1)
        return logp.exp(), logp

    def forward(self, h):
        # h: [B, H] -> logits [B, n], weights [B, k], indices [B, k] (compact expert ids)
        p, logp = self.probs(h)
        top_p, idx = torch.topk(p, self.top_k, dim=-1)
        weights = top_p / top_p.sum(-1, keepdim=True)                  # soft top-k mixture
        self.last = {"probs": p, "idx": idx}
        return logp, weights, idx


class BioMoE(nn.Module):
    def __init__(self, cfg: BioMoEConfig):
        super().__init__()
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.proj = nn.Linear(cfg.n_in, cfg.d_proj)
        self.phasors = PhasorBank(cfg.d_proj, cfg.n_phasors, cfg.phasor_damping)
        self.hidden = nn.Linear(cfg.d_proj + 2 * cfg.n_phasors, cfg.d_hidden)
        self.kwta = KWTAAttention(cfg.kwta_k, cfg.kwta_gain)
        self.router = BioRouter(cfg)
        self.experts = nn.ModuleList(LiquidExpert(cfg.d_hidden, cfg.liquid_steps, cfg.liquid_dt)
                                     for _ in range(cfg.max_experts))
        self.classifier = nn.Linear(cfg.d_hidden, cfg.n_classes)
        self.register_buffer("frozen", torch.zeros(cfg.max_experts, dtype=torch.bool))

    def features(self, x):
        u = torch.tanh(self.proj(x))                                    # [B, P]
        f = torch.cat([u, self.phasors(u)], -1)                         # [B, P + 2F]
        return self.kwta(torch.tanh(self.hidden(f)))                    # [B, H]

    def forward(self, x):
        h = self.features(x)
        _, w, idx = self.router(h)                                      # [B, k], [B, k]
        y = torch.zeros_like(h)
        for j, slot in enumerate(self.router.active):
            b, k = torch.nonzero(idx == j, as_tuple=True)
            if b.numel():
                y = y.index_add(0, b, w[b, k, None] * self.experts[slot](h[b]))
        self.last_hidden = h
        return self.classifier(y)                                       # [B, 10]

    # ---- expert set management (slots)
    @property
    def active(self) -> list[int]:
        return self.router.active

    def free_slot(self) -> int | None:
        free = [s for s in range(self.cfg.max_experts) if s not in self.router.active]
        return free[0] if free else None

    def freeze_mask(self) -> torch.Tensor:
        """Bool [max_experts]: True = this expert's parameters get no update."""
        return self.frozen

    def set_frozen(self, slots, frozen: bool = True) -> None:
        for s in slots:
            self.frozen[s] = frozen

    def zero_frozen_grads(self) -> None:
        for s in range(self.cfg.max_experts):
            if self.frozen[s]:
                for p in self.experts[s].parameters():
                    p.grad = None

    def grow_clone(self, teacher_slot: int, seed: int) -> int | None:
        """Activate a free slot as a noisy copy of ``teacher_slot`` (gate row copied too)."""
        slot = self.free_slot()
        if slot is None:
            return None
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.experts[slot].load_state_dict(self.experts[teacher_slot].state_dict())
            for p in self.experts[slot].parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g).to(p.device))
            self.router.gate.weight[slot] = self.router.gate.weight[teacher_slot]
            self.router.gate.bias[slot] = self.router.gate.bias[teacher_slot]
        self.router.board.reset_slot(slot, like=teacher_slot)
        self.router.active = sorted(self.router.active + [slot])
        return slot

    def spawn(self, seed: int) -> int | None:
        """Neurogenesis: activate a free slot with fresh weights."""
        slot = self.free_slot()
        if slot is None:
            return None
        torch.manual_seed(seed)
        fresh = LiquidExpert(self.cfg.d_hidden, self.cfg.liquid_steps, self.cfg.liquid_dt)
        self.experts[slot].load_state_dict(fresh.state_dict())
        with torch.no_grad():
            self.router.gate.weight[slot].normal_(0, 0.01)
            self.router.gate.bias[slot] = self.router.gate.bias[self.router.active].mean()
        self.router.board.reset_slot(slot)
        self.router.active = sorted(self.router.active + [slot])
        return slot

    def prune(self, slot: int) -> bool:
        """Mask a slot from gating (its weights stay in the slot, reusable by growth)."""
        if slot not in self.router.active or len(self.router.active) <= 1:
            return False
        self.router.active = [s for s in self.router.active if s != slot]
        return True

    # ---- per-expert checkpoints
    def save_expert(self, slot: int, path) -> None:
        torch.save({"expert": self.experts[slot].state_dict(),
                    "gate_w": self.router.gate.weight[slot].detach().clone(),
                    "gate_b": self.router.gate.bias[slot].detach().clone(),
                    "merit": {k: v[slot] for k, v in self.router.board.state().items()},
                    "config": asdict(self.cfg)}, path)

    def load_expert(self, slot: int, path, activate: bool = True) -> None:
        ck = torch.load(path, map_location=self.router.gate.weight.device, weights_only=False)
        if ck["config"]["d_hidden"] != self.cfg.d_hidden:
            raise ValueError(f"expert checkpoint has d_hidden {ck['config']['d_hidden']}, "
                             f"model has {self.cfg.d_hidden}")
        self.experts[slot].load_state_dict(ck["expert"])
        with torch.no_grad():
            self.router.gate.weight[slot] = ck["gate_w"]
            self.router.gate.bias[slot] = ck["gate_b"]
        for k, v in ck["merit"].items():
            getattr(self.router.board, k)[slot] = v
        if activate and slot not in self.router.active:
            self.router.active = sorted(self.router.active + [slot])

    def save(self, path) -> None:
        torch.save({"state": self.state_dict(), "active": list(self.router.active),
                    "board": self.router.board.state(), "config": asdict(self.cfg)}, path)

    @classmethod
    def load(cls, path) -> "BioMoE":
        ck = torch.load(path, weights_only=False)
        m = cls(BioMoEConfig(**ck["config"]))
        m.load_state_dict(ck["state"])
        m.router.active = list(ck["active"])
        m.router.board.load(ck["board"])
        return m
