"""VAR: cache TTL/LRU with an injectable clock, eligibility, batch path == per-token path, store output."""
from __future__ import annotations

import math
import random

import pytest
import torch

from reference_models.var.moe_lm import MoEConfig, MoELM
from reference_models.var.var import (VAR, BatchContextCache, ContextCache, TokenStats, VARConfig,
                                      context_key, context_keys, precompute_statistics)


class FakeClock:
    def __init__(self, t=0.0):
        self.t = t

    def __call__(self):
        return self.t


# ---------------------------------------------------------------- caches
def test_cache_ttl_expires_with_injected_clock():
    clock = FakeClock()
    c = ContextCache(ttl=60, max_size=10, clock=clock)
    c.put(1, 3, 0.9)
    clock.t = 59.9
    assert c.get(1) == (3, 0.9)
    clock.t = 60.0                      # exactly TTL after the write: expired
    assert c.get(1) is None and len(c) == 0
    c.put(1, 4, 0.5)                    # rewritten at t=60, fresh again until 120
    clock.t = 119.0
    assert c.get(1) == (4, 0.5)


def test_cache_hit_does_not_extend_ttl():
    clock = FakeClock()
    c = ContextCache(ttl=60, max_size=10, clock=clock)
    c.put(7, 1, 1.0)
    clock.t = 50
    assert c.get(7) is not None
    clock.t = 61
    assert c.get(7) is None


def test_cache_lru_bound_evicts_least_recently_used():
    c = ContextCache(ttl=60, max_size=3, clock=FakeClock())
    for k in (1, 2, 3):
        c.put(k, k, 1.0)
    assert c.get(1) is not None         # 1 becomes most recent; 2 is now the LRU entry
    c.put(4, 4, 1.0)
    assert [k for k, *_ in c.items()] == [3, 1, 4]
    assert c.get(2) is None and len(c) == 3


def _sequential(keys, now, cache, values):
    out = []
    for i, k in enumerate(keys):
        got = cache.get(k, now)
        if got is None:
            cache.put(k, values[i], 0.5, now)
            out.append((values[i], False))
        else:
            out.append((got[0], True))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_batch_cache_equals_sequential_cache(seed):
    """Random key streams with evictions inside a batch and expiry across batches."""
    rnd = random.Random(seed)
    seq = ContextCache(ttl=60, max_size=7, clock=FakeClock())
    bat = BatchContextCache(ttl=60, max_size=7, clock=FakeClock())
    now = 0.0
    for _ in range(12):
        n = rnd.randint(1, 30)
        keys = [rnd.randint(0, 14) for _ in range(n)]
        values = [rnd.randint(0, 7) for _ in range(n)]
        want = _sequential(keys, now, seq, values)
        e, w, hit = bat.access(torch.tensor(keys),
                               lambda pos: (torch.tensor(values)[pos], torch.full((len(pos),), 0.5)), now)
        assert [(int(a), bool(b)) for a, b in zip(e, hit)] == want
        assert [(k, ex, t) for k, ex, _, t in bat.items()] == [(k, ex, t) for k, ex, _, t in seq.items()]
        now += rnd.choice([0.0, 10.0, 45.0, 61.0])


# ----------------------------------------------------------- eligibility
def _stats(freq, entropy_counts):
    """One layer, vocab 12, 2 experts: token t seen freq[t] times with expert counts entropy_counts[t]."""
    s = TokenStats(1, 12, 2)
    for t, (f, (a, b)) in enumerate(zip(freq, entropy_counts)):
        assert a + b == f
        s.freq[0, t] = f
        s.expert_counts[0, t] = torch.tensor([a, b])
        s.conf_sum[0, t] = 0.8 * f
    return s


def test_eligibility_rule_thresholds_and_faithful_token_limit():
    # token: 0 pure & frequent; 1 exactly 50 (not > 50); 2 frequent but mixed (entropy ln 2 > 0.5);
    # 3 frequent, mildly mixed 95/5 (entropy 0.199 < 0.5); 10 and 11 pure & frequent but id >= 10
    freq = [100, 50, 100, 100, 0, 0, 0, 0, 0, 0, 100, 100]
    counts = [(100, 0), (50, 0), (50, 50), (95, 5)] + [(0, 0)] * 6 + [(0, 100), (100, 0)]
    s = _stats(freq, counts)
    assert float(s.entropy[0, 3]) == pytest.approx(-(0.95 * math.log(0.95) + 0.05 * math.log(0.05)))
    intended = s.eligible(VARConfig(mode="intended"))[0].nonzero().flatten().tolist()
    faithful = s.eligible(VARConfig(mode="faithful"))[0].nonzero().flatten().tolist()
    assert intended == [0, 3, 10, 11]
    assert faithful == [0, 3]
    assert int(s.fast_expert[0, 10]) == 1 and float(s.confidence[0, 0]) == pytest.approx(0.8)


# ------------------------------------------------------------------ VAR
def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return MoELM(MoEConfig(d_model=16, n_layers=2, n_heads=2, n_experts=4, d_ff=16, seq_len=16)).eval()


@pytest.mark.parametrize("context", [1, 2, 4, 7])
def test_context_keys_match_per_token_keys(context):
    idx = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(context))
    keys = context_keys(1, idx, 256, 2, context)
    rows = idx.tolist()
    c = context - 1
    want = [context_key(1, row[max(0, t - c):t + 1], 256, 2, context) for row in rows for t in range(9)]
    assert keys.tolist() == want
    assert len(set(want)) == len({(tuple(row[max(0, t - c):t + 1]), t < c) for row in rows for t in range(9)})


def test_batch_path_equals_per_token_path():
    model = _tiny_model()
    text = torch.tensor(list(b"for x in range(10): print(x)  # a loop, and a loop, and a loop" * 8))
    batches = [text[i:i + 64].view(4, 16) for i in range(0, 448, 64)]
    stats = precompute_statistics(model, batches[:4])
    cfg = VARConfig(mode="intended", freq_threshold=5, cache_size=24)   # small cache: evictions
    clock_a, clock_b = FakeClock(), FakeClock()
    var_a, var_b = VAR(model, stats, cfg, clock_a), VAR(model, stats, cfg, clock_b)
    assert var_a.eligible.any() and not var_a.eligible.all()
    for step, idx in enumerate(batches):
        cap_a, cap_b = {}, {}

        def route_a(layer, h, idx_):
            e, w, t = var_a.route_batch(layer, h, idx_)
            cap_a[layer] = (e, w, t)
            return w[:, None], e[:, None]

        def route_b(layer, h, idx_):
            out = [var_b.route_token(layer, tok, row[max(0, t - 3):t + 1], h[n])
                   for n, (row, t, tok) in enumerate((r, t, r[t]) for r in idx_.tolist()
                                                     for t in range(len(r)))]
            e = torch.tensor([o[0] for o in out])
            w = torch.tensor([o[1] for o in out])
            cap_b[layer] = (e, w, torch.tensor([o[2] for o in out]))
            return w[:, None], e[:, None]

        with torch.no_grad():
            la, lb = model(idx, route=route_a), model(idx, route=route_b)
        for layer in (0, 1):
            ea, wa, ta = cap_a[layer]
            eb, wb, tb = cap_b[layer]
            assert torch.equal(ta, tb) and torch.equal(ea, eb), (step, layer)
            assert torch.allclose(wa.float(), wb.float(), atol=1e-6)
        assert torch.allclose(la, lb, atol=1e-5)
        clock_a.t = clock_b.t = clock_a.t + 25.0            # entries expire every third batch
    assert var_a.fractions()["tokens"] == var_b.fractions()["tokens"] > 0
    for k in ("fast_fraction", "cached_fraction", "learned_fraction", "cache_hit_rate"):
        assert var_a.fractions()[k] == var_b.fractions()[k]
    fr = var_a.fractions()
    assert fr["fast_fraction"] > 0 and fr["cached_fraction"] > 0 and fr["learned_fraction"] > 0
    assert [(k, e) for k, e, *_ in var_a.batch_cache.items()] == \
        [(k, e) for k, e, *_ in var_b.token_cache.items()]


def test_learned_tier_is_the_models_own_router():
    model = _tiny_model()
    idx = torch.randint(0, 256, (2, 16))
    stats = TokenStats(2, 256, 4)                           # empty stats: nothing is eligible
    var = VAR(model, stats, VARConfig(cache_size=0))        # no cache: everything is learned
    with torch.no_grad():
        assert torch.allclose(model(idx, route=var.route), model(idx), atol=1e-6)
    assert var.fractions()["expensive_fraction"] == 1.0


def test_quick_workload_lands_in_store(store_root):
    import chrono
    from reference_models import registry

    run = registry.resolve("var")                     # what `chrono workload var` calls
    s = run(mode="intended", steps=20, run="v", seed=0, root=store_root, progress=False)
    assert "expensive_fraction" in s.summary()
    for k in ("expensive_fraction", "val_loss_var", "val_loss_own", "cache_hit_rate", "fast_fraction"):
        assert math.isfinite(s[k])
    assert 0 <= s["expensive_fraction"] <= 1
    con = chrono.connect(store_root)
    names = {r[0] for r in con.sql("SELECT DISTINCT name FROM signals WHERE run_id='v'").fetchall()}
    assert {"loss", "val_loss", "var.expensive_fraction", "var.cache_hit_rate", "var.fast_fraction",
            "var.fast_coverage"} <= names
    layers = {r[0] for r in con.sql("SELECT DISTINCT layer FROM routing WHERE run_id='v'").fetchall()}
    assert {0, 1, 100, 101, 200, 201, 300, 301} <= layers    # model layers + one virtual layer per tier
    # every evaluated token's decision is in the tokens table, one tier row per (layer, token)
    n_tok, n_rows = con.sql("SELECT sum(tokens), (SELECT count(*) FROM tokens WHERE run_id='v') FROM routing "
                            "WHERE run_id='v' AND layer >= 100 AND mode='EVAL'").fetchall()[0]
    assert n_tok == n_rows > 0



def test_prefix_count_leq_equals_brute_force():
    from reference_models.var.cache import prefix_count_leq

    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        m = int(torch.randint(1, 300, (1,), generator=g))
        vals = torch.randint(-1, m, (m,), generator=g)
        ends = torch.randint(-1, m, (40,), generator=g)
        bounds = torch.randint(-3, m + 3, (40,), generator=g)
        want = [int((vals[:e + 1] <= b).sum()) for e, b in zip(ends.tolist(), bounds.tolist())]
        assert prefix_count_leq(vals, ends, bounds).tolist() == want                  # dense mask
        assert prefix_count_leq(vals, ends, bounds, dense_limit=0).tolist() == want   # merge-sort tree


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dense_limit", [0, 1 << 22])
def test_batch_cache_equals_sequential_cache_large(seed, dense_limit, monkeypatch):
    """Bigger caches and batches than the capacity: many accesses need their stack distance
    (counted by the merge-sort tree, dense_limit 0, and by the dense mask)."""
    import reference_models.var.cache as var_mod

    monkeypatch.setattr(var_mod, "DENSE_LIMIT", dense_limit)
    rnd = random.Random(100 + seed)
    size = rnd.choice([16, 50, 120])
    seq = ContextCache(ttl=60, max_size=size, clock=FakeClock())
    bat = BatchContextCache(ttl=60, max_size=size, clock=FakeClock())
    for b in range(6):
        n = rnd.randint(size, 5 * size)
        keys = [rnd.randint(0, 3 * size) for _ in range(n)]
        values = [rnd.randint(0, 7) for _ in range(n)]
        want = _sequential(keys, float(b), seq, values)
        e, _, hit = bat.access(torch.tensor(keys),
                               lambda pos: (torch.tensor(values)[pos], torch.full((len(pos),), 0.5)), float(b))
        assert [(int(a), bool(h)) for a, h in zip(e, hit)] == want
        assert [(k, ex) for k, ex, _, _ in bat.items()] == [(k, ex) for k, ex, _, _ in seq.items()]
