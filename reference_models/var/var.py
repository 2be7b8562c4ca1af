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
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn

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


# ---------------------------------------------------------------------- keys
def context_keys(layer: int, idx: torch.Tensor, vocab_size: int, n_layers: int, context: int = 4):
    """``[B·T]`` int64 keys: the last ``context`` token ids (padding before the start) and the layer.

    The ids are packed exactly (base vocab_size + 1), so distinct contexts never collide.
    """
    B, T = idx.shape
    base = vocab_size + 1
    if base ** context * n_layers >= 2 ** 63:
        raise ValueError("vocabulary too large to pack the context exactly")
    padded = torch.cat([torch.full((B, context - 1), vocab_size, dtype=torch.long, device=idx.device),
                        idx.long()], 1)
    powers = base ** torch.arange(context - 1, -1, -1, dtype=torch.long, device=idx.device)
    key = (padded.unfold(1, context, 1) * powers).sum(-1)      # [B, T, context] windows -> [B, T]
    return (key * n_layers + layer).reshape(-1)


def context_key(layer: int, last_ids, vocab_size: int, n_layers: int, context: int = 4) -> int:
    """Key of one token from its last ``context`` ids (fewer at the start of a sequence)."""
    ids = [vocab_size] * (context - len(last_ids)) + [int(t) for t in last_ids][-context:]
    key = 0
    for t in ids:
        key = key * (vocab_size + 1) + t
    return key * n_layers + layer


DENSE_LIMIT = 1 << 22     # prefix_count_leq: up to this many (query, position) pairs, one dense mask


def prefix_count_leq(values: torch.Tensor, ends: torch.Tensor, bounds: torch.Tensor,
                     dense_limit: int = DENSE_LIMIT) -> torch.Tensor:
    """``out[q] = #{j <= ends[q] : values[j] <= bounds[q]}``, all queries at once.

    ``values`` ``[m]`` int64 in ``[-1, m)``; ``ends``, ``bounds`` ``[Q]`` int64 (``ends`` in
    ``[-1, m)``). Up to ``dense_limit`` pairs Q·m: one ``[Q, m]`` mask. Beyond: a merge-sort
    tree walked level by level: the prefix ``[0, ends]`` splits into aligned blocks of 2^k, one
    for each set bit k of its length (as in a Fenwick tree); each level sorts ``values`` within
    its blocks once and answers every query with one ``searchsorted``, O((m + Q) log² m)
    tensor work. No Python loop over queries either way (the tree loops over log2(m) levels).
    """
    m = values.numel()
    out = torch.zeros(ends.numel(), dtype=torch.long)
    if m == 0 or ends.numel() == 0:
        return out
    if ends.numel() * m <= dense_limit:
        j = torch.arange(m)
        return ((j[None, :] <= ends[:, None]) & (values[None, :] <= bounds[:, None])).sum(1)
    big = m + 2                                   # shifted values and bounds lie in [-1, m + 1]
    v = values.long() + 1
    pos = torch.arange(m)
    n = ends.long() + 1                           # prefix lengths
    y = bounds.long().clamp(-2, m) + 1                # -2: nothing qualifies
    for k in range(max(1, m.bit_length())):
        keyed = torch.sort((pos >> k) * big + v).values   # sorted within aligned blocks of 2^k
        start = (n >> (k + 1)) << (k + 1)          # this level's block of each prefix
        has = ((n >> k) & 1).bool()
        idx = torch.searchsorted(keyed, (start >> k) * big + y, right=True)
        out += torch.where(has, idx - start, 0)
    return out


# --------------------------------------------------------------------- caches
class ContextCache:
    """Per-token LRU cache with a TTL: key → (expert, weight, written_at)."""

    def __init__(self, ttl: float = 60.0, max_size: int = 1000, clock=time.monotonic):
        self.ttl, self.max_size, self.clock = ttl, max_size, clock
        self.entries: OrderedDict[int, tuple[int, float, float]] = OrderedDict()

    def get(self, key: int, now: float | None = None):
        now = self.clock() if now is None else now
        hit = self.entries.get(key)
        if hit is None:
            return None
        if now - hit[2] >= self.ttl:              # expired: drop it
            del self.entries[key]
            return None
        self.entries.move_to_end(key)
        return hit[0], hit[1]

    def put(self, key: int, expert: int, weight: float, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        self.entries[key] = (expert, weight, now)
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_size:
            self.entries.popitem(last=False)

    def __len__(self):
        return len(self.entries)

    def items(self):
        """(key, expert, weight, written_at) from least to most recently used."""
        return [(k, e, w, t) for k, (e, w, t) in self.entries.items()]


class BatchContextCache:
    """The same LRU + TTL cache held as tensors (oldest → newest) and accessed a batch at a time."""

    def __init__(self, ttl: float = 60.0, max_size: int = 1000, clock=time.monotonic):
        self.ttl, self.max_size, self.clock = ttl, max_size, clock
        self.keys = torch.zeros(0, dtype=torch.long)
        self.experts = torch.zeros(0, dtype=torch.long)
        self.weights = torch.zeros(0, dtype=torch.float32)
        self.written = torch.zeros(0, dtype=torch.float64)

    def __len__(self):
        return int(self.keys.numel())

    def items(self):
        return list(zip(self.keys.tolist(), self.experts.tolist(), self.weights.tolist(),
                        self.written.tolist()))

    def access(self, keys: torch.Tensor, learned_fn, now: float | None = None):
        """Look up ``keys`` in order; misses get ``learned_fn(miss_positions) -> (experts, weights)``
        and are written. Returns (experts, weights, hit mask)."""
        now = self.clock() if now is None else now
        dev = keys.device
        keys = keys.cpu()
        S, n, C = len(self), keys.numel(), self.max_size
        allk = torch.cat([self.keys, keys])                      # pre-batch entries as virtual accesses
        m = S + n
        order = torch.sort(allk, stable=True).indices             # by key, then by access order
        sk = allk[order]
        same_prev = torch.zeros(m, dtype=torch.bool)
        same_prev[1:] = sk[1:] == sk[:-1]
        same_next = torch.zeros(m, dtype=torch.bool)
        same_next[:-1] = same_prev[1:]
        prev = torch.full((m,), -1, dtype=torch.long)
        prev[order[1:]] = torch.where(same_prev[1:], order[:-1], torch.full_like(order[1:], -1))
        # stack distance of each batch access: distinct keys touched strictly between prev and it.
        # It is at most the gap i − prev − 1, so only accesses with a gap >= C need counting.
        i = torch.arange(S, m)
        p = prev[S:]
        present = p >= 0
        need = (present & (i - p - 1 >= C)).nonzero(as_tuple=True)[0]
        if need.numel():
            # distinct keys in (p, i) = accesses j in (p, i) that are their key's first there,
            # i.e. prev[j] <= p; the j <= p all qualify, so it is #{j < i: prev[j] <= p} − (p + 1)
            pn, in_ = p[need], i[need]
            present[need] = prefix_count_leq(prev, in_ - 1, pn, DENSE_LIMIT) - (pn + 1) < C
        fresh = p >= S                                            # touched earlier in this batch
        if S:
            old = (p >= 0) & (p < S)
            fresh |= old & (now - self.written[p.clamp(0, S - 1)] < self.ttl)
        hit = present & fresh
        miss_pos = (~hit).nonzero(as_tuple=True)[0]
        all_e = torch.cat([self.experts, torch.zeros(n, dtype=torch.long)])
        all_w = torch.cat([self.weights, torch.zeros(n, dtype=torch.float32)])
        all_t = torch.cat([self.written, torch.full((n,), float(now), dtype=torch.float64)])
        if miss_pos.numel():
            e, w = learned_fn(miss_pos.to(dev))
            all_e[S + miss_pos] = e.reshape(-1).cpu().long()
            all_w[S + miss_pos] = w.reshape(-1).detach().cpu().float()
        # value of every access = value at the key's most recent write (pre-batch entry or miss)
        is_write = torch.ones(m, dtype=torch.bool)
        is_write[S:] = ~hit
        ranks = torch.arange(m)
        last_write_sorted = torch.cummax(torch.where(is_write[order], ranks, torch.full_like(ranks, -1)),
                                         0).values
        src = order[last_write_sorted]                            # position holding each access's value
        val_src = torch.empty(m, dtype=torch.long)
        val_src[order] = src
        out_e = all_e[val_src[S:]]
        out_w = all_w[val_src[S:]]
        # new state: the C most recently accessed distinct keys, oldest first
        last_acc = order[~same_next]                             # last access of each distinct key
        last_src = src[~same_next]
        keep = torch.argsort(last_acc)[-C:] if C > 0 else torch.zeros(0, dtype=torch.long)
        self.keys = allk[last_acc[keep]]
        self.experts = all_e[last_src[keep]]
        self.weights = all_w[last_src[keep]]
        self.written = all_t[last_src[keep]]
        return out_e.to(dev), out_w.to(dev), hit.to(dev)


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
