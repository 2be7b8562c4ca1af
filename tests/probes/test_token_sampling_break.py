"""Review 7 of token sampling's host path (``TokenSampler._sample_host``): router outputs in
shapes and dtypes ``Recorder.record`` accepts, sampled on both paths, every pre-filter row
(``token_rows``) checked against the ground truth: the test's own forward hooks (registered
before probes attach) clone each router output and the forward's token ids, and the row of
token ``t``, slot ``kk`` must hold what the router returned for assignment ``t * k + kk`` in
flat order (``k``: assignments per token of the call's indices), the token id the model got
(only when the router saw batch x sequence tokens) and the dropped flag; counted with NumPy.
The two paths must also store identical rows. Faults found: a float (e.g. bfloat16) dropped
mask made the host path's one ``cat`` of int columns a float tensor (token ids rounded: 7945
stored as 7936); 2-D weights of another shape than the indices' ``[T, k]`` (``[T*k, 1]``,
``[1, T*k]``) lost the whole window's write (weights misaligned with rows) or, with indices
``[T*k, 1]``, stored other assignments' weights; a call of 0 tokens was a telemetry fault;
``[B, S, k]`` indices (a native router's own shape) were sampled as B tokens of S*k
assignments (log_tokens refused the window's rows: k beyond the run's top_k) and, seeing B
and not B*S tokens, got no token ids or positions.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import chrono
import probes
from probes import window

from .sampling_review import patch_paths
from .staging_review import D, K, Router

VOCAB = 40000   # token ids above 256: a bfloat16 column rounds them
IDS = [torch.randint(300, 30000, (3, 7), generator=torch.Generator().manual_seed(s)) for s in range(3)]


class Shaped(Router):
    """Returns ``(logits, weights, indices[, dropped])`` in the form ``variant`` names."""

    def __init__(self, variant):
        super().__init__()
        self.variant = variant

    def forward(self, x):
        logits, w, idx = super().forward(x)
        v = self.variant
        if v.startswith("drop_"):   # a capacity-drop mask in another dtype than bool
            return logits, w, idx, (idx % 3 == 0).to(getattr(torch, v[5:]))
        if v == "drop_bool":
            return logits, w, idx, idx % 3 == 0
        if v == "weights_column":      # [T*k, 1]: one weight per assignment, as a column
            return logits, w.reshape(-1, 1), idx
        if v == "weights_row":         # [1, T*k]
            return logits, w.reshape(1, -1), idx
        if v == "indices_column":      # indices [T*k, 1], weights [T, k]: flat order pairs them
            return logits, w, idx.reshape(-1, 1)
        if v == "three_d":             # [B, S, k] indices and weights (a native router's own shape)
            return logits, w.reshape(3, -1, K), idx.reshape(3, -1, K)
        if v == "empty":               # every call of the first forward has 0 tokens
            return logits, w, idx
        return logits, w, idx


class Model(torch.nn.Module):
    def __init__(self, variant, n=2):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(VOCAB, D)
        self.routers = torch.nn.ModuleList(Shaped(variant) for _ in range(n))
        self.table = torch.nn.Parameter(torch.randn(8, D) * 0.1)

    def forward(self, input_ids, attention_mask=None):   # (the mask is for probes only)
        x = self.emb(input_ids).reshape(-1, D)
        for r in self.routers:
            out = r(x)
            idx = out[2].reshape(-1, K).long()
            x = x + (out[1].reshape(-1, K)[..., None] * self.table[idx]).sum(1)
        return x.sum()


def _record(monkeypatch, root, run, variant, rate, host):
    """Three steps of one forward each (the first with 0 tokens for ``empty``); returns the
    truth calls ``{(step, layer): (ids, indices, weights, dropped)}``, the pre-filter rows
    and weights of ``token_rows``, the stored rows, stats and how many calls took the host path."""
    m = Model(variant)
    calls: dict = {}
    step = [0]
    for i, r in enumerate(m.routers):
        r.register_forward_hook(lambda mod, a, out, i=i: calls.__setitem__((step[0], i), tuple(
            None if t is None else t.detach().clone() for t in (cur[0], out[2], out[1], out[3] if len(out) > 3 else None))))
    cur = [None]
    with monkeypatch.context() as mp:
        host_calls, sampled = patch_paths(mp, host)
        with torch.no_grad(), probes.attach(m, run=run, root=root, tokens=rate, seed=4, steps="manual") as h:
            for s in range(3):
                step[0] = s
                cur[0] = IDS[s][:, :0] if variant == "empty" and s == 0 else IDS[s]
                m(cur[0])
                h.step()
            stats = h.stats()
    ints = np.concatenate([i for i, _ in sampled]) if sampled else np.zeros((0, 10), np.int64)
    weights = np.concatenate([w for _, w in sampled]) if sampled else np.zeros(0, np.float32)
    stored = chrono.connect(root).execute(
        "SELECT step, layer, batch_idx, position, k, expert, weight, token_id FROM tokens WHERE run_id = ? "
        "ORDER BY ALL", [run]).fetchall()
    return calls, ints, weights, stored, stats, len(host_calls)


def _truth_errors(calls, ints, weights, rate) -> list:
    """Rows that disagree with the routers' outputs, and (step, layer) whose row count is not
    ``ceil(rate * T) * k``."""
    bad, per_call = [], {}
    for row, w in zip(ints.tolist(), weights.tolist()):
        step, layer, _, b, p, kk, e, tid, dropped, padding = row
        ids, idx, wts, drop = calls[step, layer]
        k = idx.shape[-1] if idx.dim() > 1 else 1   # assignments per token: the last axis
        T = idx.numel() // k
        B, S = ids.shape
        ctx = T == B * S
        t = b * S + p if ctx else p
        a = t * k + kk
        want = (int(idx.reshape(-1)[a]), int(ids.reshape(-1)[t]) if ctx else -1,
                0 if drop is None else int(drop.reshape(-1)[a] != 0), 0)
        if (e, tid, dropped, padding) != want or not (ctx or b == 0) \
                or not np.isclose(w, float(wts.reshape(-1)[a]), rtol=1e-6):
            bad.append((row, w, want, float(wts.reshape(-1)[a])))
        per_call[step, layer] = per_call.get((step, layer), 0) + 1
    for (step, layer), (_, idx, _, _) in calls.items():
        k = idx.shape[-1] if idx.dim() > 1 else 1
        T = idx.numel() // max(k, 1)
        want = math.ceil(rate * T) * k if T else 0
        if per_call.get((step, layer), 0) != want:
            bad.append(("rows", step, layer, per_call.get((step, layer), 0), want))
    return bad


VARIANTS = ["drop_bfloat16", "drop_float16", "drop_float32", "drop_uint8", "weights_column", "weights_row",
            "indices_column", "three_d", "empty"]


@pytest.mark.parametrize("rate", [0.3, 1.0])
@pytest.mark.parametrize("variant", VARIANTS)
def test_sampled_rows_are_the_routers_outputs_on_both_paths(store_root, monkeypatch, variant, rate):
    results = {}
    for host in (True, False):
        run = f"{variant}-{'host' if host else 'dev'}"
        calls, ints, weights, stored, stats, n_host = _record(monkeypatch, store_root, run, variant, rate, host)
        assert (n_host > 0) == host   # each run took the path it is named after
        assert _truth_errors(calls, ints, weights, rate)[:4] == [], run
        assert stats["faults"] == 0 and stats["write_errors"] == 0, (run, stats)
        assert len(ints) and stored, run
        results[host] = (ints, weights, stored)
    (ih, wh, sh), (idv, wd, sd) = results[True], results[False]
    np.testing.assert_array_equal(ih, idv)
    np.testing.assert_array_equal(wh, wd)
    assert sh == sd


@pytest.mark.parametrize("transform", ["vmap", "grad"])
def test_token_sampling_inside_torch_func_transforms_keeps_the_window(store_root, transform):
    """A forward inside ``torch.func.vmap`` (or ``grad``) over ``functional_call``, then a plain
    one, in one window: the routing rows of both steps are written (truth from the shapes: every
    token makes K assignments, 21 tokens per forward, 2 x 21 under ``vmap``), the plain
    forward's tokens are sampled; under ``vmap`` the sampler escaped batched tensors into the window and
    its write failed: every row of the window was lost."""
    from torch.func import functional_call, grad, vmap

    m = Model("plain")
    params = dict(m.named_parameters())
    with probes.attach(m, run=transform, root=store_root, tokens=0.5, seed=3, steps="manual") as h:
        if transform == "vmap":
            with torch.no_grad():
                vmap(lambda i: functional_call(m, params, (i,)))(torch.stack([IDS[0], IDS[0]]))
        else:
            grad(lambda p: functional_call(m, p, (IDS[0],)))(params)
        h.step()
        with torch.no_grad():
            m(IDS[1])
        h.step()
    con = chrono.connect(store_root)
    per_step = con.execute("SELECT step, layer, sum(tokens) FROM routing WHERE run_id = ? GROUP BY ALL ORDER BY ALL",
                           [transform]).fetchall()
    first = 2 * 21 * K if transform == "vmap" else 21 * K
    assert per_step == [(0, 0, first), (0, 1, first), (1, 0, 21 * K), (1, 1, 21 * K)]
    tokens = con.execute("SELECT step, layer, count(*) FROM tokens WHERE run_id = ? GROUP BY ALL ORDER BY ALL",
                         [transform]).fetchall()
    assert (1, 0, math.ceil(0.5 * 21) * K) in tokens and (1, 1, math.ceil(0.5 * 21) * K) in tokens
    if transform == "grad":
        assert (0, 0, math.ceil(0.5 * 21) * K) in tokens


def test_host_path_rows_from_concurrent_forwards_belong_to_one_forward(store_root, monkeypatch):
    """4 threads, 10 forwards each, one step: every sampled row (before the writer's filter)
    must be the output of some forward's router at its token, with that forward's token id at
    (batch, position): the per-forward columns (``_columns``, cached per context) of one
    thread's forward never serve another's. Truth: the test's own hooks, per thread."""
    import threading

    m = Model("drop_bool")
    seen, local = [], threading.local()
    for i, r in enumerate(m.routers):
        r.register_forward_hook(lambda mod, a, out, i=i: seen.append(
            (local.ids, i, out[2].detach().clone(), out[1].detach().clone())))
    captured, orig_rows = [], window.token_rows
    monkeypatch.setattr(window, "token_rows", lambda ready: captured.append(orig_rows(ready)) or captured[-1])

    def work(seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(10):
            local.ids = torch.randint(300, 30000, (3, 7), generator=g)
            with torch.no_grad():
                m(local.ids)

    with probes.attach(m, run="threads", root=store_root, tokens=0.3, seed=2, steps="manual") as h:
        threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        h.step()
        stats = h.stats()
    ints = np.concatenate([c[0] for c in captured if c is not None])
    weights = np.concatenate([c[1] for c in captured if c is not None])
    assert len(ints) == 40 * 2 * math.ceil(0.3 * 21) * K and stats["faults"] == 0
    truth = {}
    for ids, layer, idx, w in seen:
        for t in range(21):
            for kk in range(K):
                truth.setdefault((layer, t // 7, t % 7, kk, int(ids.reshape(-1)[t]), int(idx[t, kk])), []).append(
                    float(w[t, kk]))
    bad = [(row, w) for row, w in zip(ints.tolist(), weights.tolist())
           if not any(np.isclose(w, x, rtol=1e-6) for x in truth.get((row[1], row[3], row[4], row[5], row[7], row[6]), ()))]
    assert bad == []


@pytest.mark.parametrize("host", [True, False], ids=["host", "device"])
def test_attach_under_inference_mode_then_steps_outside_it(store_root, monkeypatch, host):
    """``probes.attach`` inside ``torch.inference_mode()`` (a serving setup), forwards and
    ``h.step()`` outside it: the sampler's random words were an inference tensor, redrawn in
    place at every step outside inference mode: every step was a fault and the window's
    routing rows were lost. Truth: 21 tokens x K per router per step, and the rows' token ids
    and experts against the test's own hooks."""
    host_calls, _ = patch_paths(monkeypatch, host)
    m = Model("plain")
    outs = []
    for i, r in enumerate(m.routers):
        r.register_forward_hook(lambda mod, a, out, i=i: outs.append((i, out[2].detach().clone())))
    with torch.inference_mode():
        h = probes.attach(m, run="inf", root=store_root, tokens=1.0, seed=1, steps="manual")
    for s in range(2):
        with torch.no_grad():
            m(IDS[s])
        h.step()
    stats = h.stats()
    h.detach()
    assert stats["faults"] == 0 and bool(host_calls) == host
    con = chrono.connect(store_root)
    assert con.execute("SELECT step, layer, sum(tokens) FROM routing WHERE run_id = 'inf' GROUP BY ALL ORDER BY ALL"
                       ).fetchall() == [(s, i, 21 * K) for s in range(2) for i in range(2)]
    rows = con.execute("SELECT step, layer, batch_idx, position, k, expert, token_id FROM tokens "
                       "WHERE run_id = 'inf' ORDER BY ALL").fetchall()
    want = sorted((s, i, t // 7, t % 7, kk, int(idx[t, kk]), int(IDS[s].reshape(-1)[t]))
                  for (i, idx), s in zip(outs, [0, 0, 1, 1]) for t in range(21) for kk in range(K))
    assert rows == want


def test_three_d_router_with_a_padding_mask_counts_and_samples_only_real_tokens(store_root):
    """A native router returning ``[B, S, k]`` and a padding mask: its counts exclude the
    padding tokens (before, seeing B and not B*S tokens, it got no mask: padding was counted)
    and its sampled rows carry token ids and positions. Truth: the test's own hooks and the
    mask, counted with NumPy."""
    m = Model("three_d")
    ids = IDS[0]
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, :3] = mask[2, :5] = 0   # left padding
    outs = []
    for i, r in enumerate(m.routers):
        r.register_forward_hook(lambda mod, a, out, i=i: outs.append((i, out[2].detach().reshape(-1, K).clone())))
    with torch.no_grad(), probes.attach(m, run="3d", root=store_root, tokens=1.0, seed=1, steps="manual") as h:
        m(ids, attention_mask=mask)
        h.step()
        stats = h.stats()
    keep = mask.reshape(-1).numpy() != 0
    want = []
    for layer, idx in outs:
        n = np.bincount(idx.numpy()[keep].reshape(-1), minlength=8)
        want += [(layer, e, int(n[e])) for e in range(8) if n[e]]
    con = chrono.connect(store_root)
    got = con.execute("SELECT layer, expert, sum(tokens) FROM routing WHERE run_id = '3d' AND tokens > 0 "
                      "GROUP BY ALL ORDER BY ALL").fetchall()
    assert got == sorted(want) and stats["faults"] == 0
    rows = con.execute("SELECT layer, batch_idx, position, k, expert, token_id FROM tokens WHERE run_id = '3d' "
                       "ORDER BY ALL").fetchall()
    assert rows == sorted((layer, t // 7, t % 7, kk, int(idx[t, kk]), int(ids.reshape(-1)[t]))
                          for layer, idx in outs for t in range(21) if keep[t] for kk in range(K))
