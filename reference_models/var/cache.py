"""VAR's context keys and its two context caches (per token, and batched with the same result).

The cached tier of ``var.py``: a key packs the last ``context`` token ids and the layer; the
cache maps key -> (expert, weight, written_at) under a TTL and an LRU bound. ``BatchContextCache``
answers a whole batch with tensor ops and equals ``ContextCache`` fed the batch's tokens in
row-major order with one clock read (the LRU stack property, Mattson et al. 1970).
"""
from __future__ import annotations

import time
from collections import OrderedDict

import torch


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
