"""VAR: verifiable adaptive routing, three tiers in front of an MoE router.

Why: most tokens of real text go to the same expert every time; VAR tries to
skip the learned router for them. Per token, per MoE layer:

1. **fast** — the token is *eligible* (offline statistics: frequency > 50 and
   routing entropy < 0.5 nats; faithful mode also keeps the original's
   ``token_id < 10`` rule): use its most frequent expert and mean confidence.
2. **cached** — the last 4 tokens (context hash) were routed recently: reuse that
   decision. The cache has a TTL (60 s, injectable clock) and an LRU bound (1000).
3. **learned** — the expensive path: a linear router over the hidden state
   (initialised from the model's own router, so this tier *is* the model's own
   decision); the result is written to the cache.

``route_token`` is the online per-token path (a readable reference, used by
faithful mode). ``route_batch`` (intended mode) does the same on a whole batch
with tensor ops: its result — tiers, experts, weights, counters and the cache
contents afterwards — equals calling ``route_token`` on the batch's tokens in
row-major order with the clock read once per batch. It uses the LRU stack
property (Mattson et al. 1970): under LRU with capacity C, an access finds its
key present iff fewer than C distinct keys were accessed since the key's
previous access.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from .cache import BatchContextCache, ContextCache, context_key, context_keys

TIERS = ("fast", "cached", "learned")
FAST, CACHED, LEARNED = 0, 1, 2


@dataclass
class VARConfig:
    mode: str = "intended"          # intended | faithful
    freq_threshold: int = 50         # eligible: frequency > this
    entropy_threshold: float = 0.5   # eligible: routing entropy (nats) < this
    faithful_token_limit: int = 10   # faithful only: eligible tokens also need token_id < this
    context: int = 4                 # tokens hashed for the cache key (current + 3 before)
    cache_ttl: float = 60.0          # seconds
    cache_size: int = 1000           # LRU bound

    def __post_init__(self):
        if self.mode not in ("intended", "faithful"):
            raise ValueError(f"mode must be 'intended' or 'faithful', got {self.mode!r}")


# ----------------------------------------------------------------- statistics
class TokenStats:
    """Per (layer, token id) routing statistics gathered offline.

    ``freq`` occurrences, ``expert_counts`` how often each expert was chosen,
    ``conf_sum`` summed top-1 router probability; ``entropy_history`` holds the
    routing entropy table after each ``snapshot()`` (how stable it was over the
    corpus).
    """

    def __init__(self, n_layers: int, vocab_size: int, n_experts: int):
        self.freq = torch.zeros(n_layers, vocab_size, dtype=torch.long)
        self.expert_counts = torch.zeros(n_layers, vocab_size, n_experts, dtype=torch.long)
        self.conf_sum = torch.zeros(n_layers, vocab_size, dtype=torch.float64)
        self.entropy_history: list[torch.Tensor] = []

    def update(self, layer: int, token_ids, indices, weights) -> None:
        ids = token_ids.reshape(-1).cpu()
        e = indices.reshape(-1).cpu()
        E = self.expert_counts.shape[2]
        self.freq[layer].index_add_(0, ids, torch.ones_like(ids))
        self.expert_counts[layer].view(-1).index_add_(0, ids * E + e, torch.ones_like(ids))
        self.conf_sum[layer].index_add_(0, ids, weights.reshape(-1).detach().cpu().double())

    @property
    def entropy(self) -> torch.Tensor:
        """Entropy (nats) of each token's empirical expert distribution; 0 for unseen tokens."""
        c = self.expert_counts.double()
        p = c / c.sum(-1, keepdim=True).clamp_min(1)
        return -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(-1)

    @property
    def confidence(self) -> torch.Tensor:
        return self.conf_sum / self.freq.clamp_min(1)

    @property
    def fast_expert(self) -> torch.Tensor:
        return self.expert_counts.argmax(-1)

    def snapshot(self) -> None:
        self.entropy_history.append(self.entropy.float())

    def eligible(self, cfg: VARConfig) -> torch.Tensor:
        """``[L, V]`` bool: which tokens take the fast path."""
        ok = (self.freq > cfg.freq_threshold) & (self.entropy < cfg.entropy_threshold)
        if cfg.mode == "faithful":
            ok &= (torch.arange(self.freq.shape[1]) < cfg.faithful_token_limit)[None, :]
        return ok

    def coverage(self, cfg: VARConfig) -> float:
        """Fraction of the corpus's token occurrences (all layers) whose token is eligible."""
        f = self.freq.double()
        return float((f * self.eligible(cfg)).sum() / f.sum().clamp_min(1))


@torch.no_grad()
def precompute_statistics(model, batches, snapshot_every: int = 10, progress: bool = False) -> TokenStats:
    """Run ``model`` (its own routers) over ``batches`` of ``[B, T]`` ids and build the fast-path table."""
    from tqdm import tqdm

    cfg = model.cfg
    stats = TokenStats(cfg.n_layers, cfg.vocab_size, cfg.n_experts)

    def record(layer, h, idx):
        _, w, ind = model.routers()[layer](h)
        stats.update(layer, idx, ind, w)
        return w, ind

    was = model.training
    model.eval()
    for i, b in enumerate(tqdm(batches, disable=not progress, desc="statistics", unit="batch")):
        model(b, route=record)
        if (i + 1) % snapshot_every == 0:
            stats.snapshot()
    stats.snapshot()
    model.train(was)
    return stats


# ------------------------------------------------------------------------ VAR
@dataclass
class Counters:
    fast: int = 0
    cached: int = 0
    learned: int = 0
    router_seconds: float = 0.0

    @property
    def total(self) -> int:
        return self.fast + self.cached + self.learned

    def fractions(self) -> dict:
        t = max(self.total, 1)
        lookups = self.cached + self.learned
        return {"fast_fraction": self.fast / t, "cached_fraction": self.cached / t,
                "learned_fraction": self.learned / t, "expensive_fraction": self.learned / t,
                "cache_hit_rate": self.cached / lookups if lookups else 0.0, "tokens": self.total}


class VAR(nn.Module):
    """Tiered router for every MoE layer of ``model`` (a ``MoELM``).

    Use ``model(idx, route=var.route)`` to run the model routed by VAR.
    """

    def __init__(self, model, stats: TokenStats, cfg: VARConfig | None = None, clock=time.monotonic):
        super().__init__()
        self.cfg = cfg or VARConfig()
        mc = model.cfg
        self.vocab_size, self.n_layers, self.n_experts = mc.vocab_size, mc.n_layers, mc.n_experts
        # learned tier: linear routers over hidden states, starting from the model's own
        self.learned = nn.ModuleList(nn.Linear(mc.d_model, mc.n_experts, bias=False)
                                     for _ in range(mc.n_layers))
        for lin, r in zip(self.learned, model.routers()):
            lin.weight.data.copy_(r.gate.weight.data)
        self.stats = stats
        self.eligible = stats.eligible(self.cfg)                 # [L, V] bool
        self.fast_expert = stats.fast_expert                     # [L, V]
        self.fast_weight = stats.confidence.float()              # [L, V]
        self._eligible_py = self.eligible.tolist()               # for the per-token path
        self._fast_e_py = self.fast_expert.tolist()
        self._fast_w_py = self.fast_weight.tolist()
        self.clock = clock
        self.token_cache = ContextCache(self.cfg.cache_ttl, self.cfg.cache_size, clock)
        self.batch_cache = BatchContextCache(self.cfg.cache_ttl, self.cfg.cache_size, clock)
        self.counters = [Counters() for _ in range(mc.n_layers)]
        self.last_tiers: dict[int, torch.Tensor] = {}           # layer -> [N] tier of each token
        self.last_experts: dict[int, torch.Tensor] = {}

    def reset_counters(self) -> None:
        self.counters = [Counters() for _ in range(self.n_layers)]

    def fractions(self) -> dict:
        tot = Counters()
        for c in self.counters:
            tot.fast += c.fast
            tot.cached += c.cached
            tot.learned += c.learned
            tot.router_seconds += c.router_seconds
        return dict(tot.fractions(), router_seconds=tot.router_seconds)

    def _learned(self, layer: int, h: torch.Tensor):
        probs = self.learned[layer](h).float().softmax(-1)
        w, e = probs.max(-1)
        return e, w

    # ------------------------------------------------------------ per token
    def route_token(self, layer: int, token_id: int, last_ids, hidden: torch.Tensor):
        """Online path for one token: returns (expert, weight, tier)."""
        c = self.counters[layer]
        if self._eligible_py[layer][token_id]:
            c.fast += 1
            return self._fast_e_py[layer][token_id], self._fast_w_py[layer][token_id], FAST
        key = context_key(layer, last_ids, self.vocab_size, self.n_layers, self.cfg.context)
        got = self.token_cache.get(key)
        if got is not None:
            c.cached += 1
            return got[0], got[1], CACHED
        e, w = self._learned(layer, hidden[None])
        e, w = int(e), float(w)
        self.token_cache.put(key, e, w)
        c.learned += 1
        return e, w, LEARNED

    # ---------------------------------------------------------------- batch
    def route_batch(self, layer: int, h: torch.Tensor, idx: torch.Tensor):
        """Vectorised path: ``h [B·T, D]``, ``idx [B, T]`` → (experts ``[N]``, weights ``[N]``, tiers ``[N]``)."""
        ids = idx.reshape(-1)
        fast = self.eligible[layer].to(ids.device)[ids]
        experts = self.fast_expert[layer].to(ids.device)[ids].clone()
        weights = self.fast_weight[layer].to(ids.device)[ids].clone()
        tiers = torch.zeros_like(ids)
        slow = (~fast).nonzero(as_tuple=True)[0]
        if slow.numel():
            keys = context_keys(layer, idx, self.vocab_size, self.n_layers, self.cfg.context)[slow]

            def learned_fn(pos):
                return self._learned(layer, h[slow[pos]])

            e, w, hit = self.batch_cache.access(keys, learned_fn)
            experts[slow], weights[slow] = e, w.to(weights.dtype)
            tiers[slow] = torch.where(hit, CACHED, LEARNED)
        c = self.counters[layer]
        n_fast = int(fast.sum())
        n_hit = int((tiers == CACHED).sum())
        c.fast += n_fast
        c.cached += n_hit
        c.learned += ids.numel() - n_fast - n_hit
        return experts, weights, tiers

    # ------------------------------------------------- model integration
    @torch.no_grad()
    def route(self, layer: int, h: torch.Tensor, idx: torch.Tensor):
        """``MoELM`` hook: intended mode → batch path; faithful → per-token loop (row-major)."""
        t0 = time.perf_counter()
        if self.cfg.mode == "intended":
            e, w, tiers = self.route_batch(layer, h, idx)
        else:
            rows = idx.tolist()
            out = []
            n = 0
            for row in rows:
                for t, tok in enumerate(row):
                    out.append(self.route_token(layer, tok, row[max(0, t - self.cfg.context + 1):t + 1], h[n]))
                    n += 1
            e = torch.tensor([o[0] for o in out], dtype=torch.long, device=h.device)
            w = torch.tensor([o[1] for o in out], dtype=torch.float32, device=h.device)
            tiers = torch.tensor([o[2] for o in out], dtype=torch.long, device=h.device)
        self.counters[layer].router_seconds += time.perf_counter() - t0
        self.last_tiers[layer], self.last_experts[layer] = tiers, e
        return w.to(h.dtype)[:, None], e[:, None]
