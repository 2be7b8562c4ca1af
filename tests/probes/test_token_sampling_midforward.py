"""Review 8: staged calls sampled at the flush (1c2b081) when something flushes the stage in the
middle of a forward: ``h.metrics()``, ``h.step()``, ``h.flush()``, a load cursor's read, the
``MAX_LOGITS`` bound, a detach; a sampler fault at the flush; two forwards per step.

Ground truth: the test's own forward hooks (registered before probes attach) clone each
router output; with rate 1 every assignment of every counted call is a stored row, in the
step the call ran in (a call before a mid-forward ``h.step()`` belongs to the step it ends),
so per (step, layer) the stored experts (as a multiset) and the ``routing`` table's tokens
must equal the hooks', counted with NumPy. Stored rows must also equal
``attach(staging=False)``'s.
"""
from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

import chrono
import probes
from probes import sampling, staging

from .sampling_review import patch_paths
from .staging_review import MoE, Router

ORDER = [0, 1, 0, 2, 1, 3]   # routers 0 and 1 are called twice per forward
MID = 2                      # the action runs after the third call


def _truth(model, steps_of):
    calls: list = []
    for i, r in enumerate(model.routers):
        r.register_forward_hook(lambda m, a, out, i=i: calls.append(
            (steps_of(), i, out[2].detach().clone().reshape(-1).numpy())))
    return calls


def _run(root, run, action, staging_on, monkeypatch=None):
    model = MoE([Router() for _ in range(4)], order=ORDER)
    h = probes.attach(model, run=run, root=root, tokens=1.0, seed=1, steps="manual", flush_every=2,
                      staging=staging_on)
    calls = _truth(model, lambda: h.current_step if h._active else None)
    done = []

    def after(pos, i):
        if pos != MID or done:
            return
        done.append(1)
        if action == "metrics":
            h.metrics()
        elif action == "step":
            h.step()
        elif action == "flush":
            h.flush()
        elif action == "cursor":
            h.load_cursor(0).take()
        elif action == "detach":
            h.detach()
    for s in range(4):
        done.clear()
        model.after = after if s >= 1 else None
        with torch.no_grad():
            for f in range(2):
                model(torch.randint(1, 50, (2, 5), generator=torch.Generator().manual_seed(10 * s + f)))
        if h._active:
            h.step()
    h.detach()
    con = chrono.connect(root)
    rows = con.execute("SELECT step, layer, batch_idx, position, k, expert FROM tokens WHERE run_id = ? "
                       "ORDER BY ALL", [run]).fetchall()
    routed = dict(((s, l), int(n)) for s, l, n in con.execute(
        "SELECT step, layer, sum(tokens) FROM routing WHERE run_id = ? GROUP BY ALL", [run]).fetchall())
    return calls, rows, routed, h


def _check(calls, rows, routed):
    want = collections.defaultdict(list)
    for step, layer, experts in calls:
        if step is None:   # after a detach
            continue
        want[step, layer].append(experts)
    got = collections.defaultdict(list)
    for step, layer, _, _, _, e in rows:
        got[step, layer].append(e)
    assert sorted(got) == sorted(want)
    for key, parts in want.items():
        e = np.sort(np.concatenate(parts))
        np.testing.assert_array_equal(np.sort(got[key]), e, err_msg=str(key))
        assert routed.get(key) == len(e), key


@pytest.mark.parametrize("action", ["metrics", "step", "flush", "cursor", "detach"])
def test_a_flush_in_mid_forward_keeps_sampled_rows_and_steps(store_root, action):
    calls, rows, routed, _ = _run(store_root, action, action, True)
    _check(calls, rows, routed)
    _, rows_once, _, _ = _run(store_root, action + "_once", action, False)
    assert rows == rows_once


def test_a_sampler_fault_at_the_flush_loses_no_counts(store_root, monkeypatch):
    orig = sampling.TokenSampler.sample
    at_flush = []

    def sample(self, layer, *a):
        if layer == 1:
            raise RuntimeError("sampler broke")
        return orig(self, layer, *a)
    orig_stage = staging.Stage._sample
    monkeypatch.setattr(staging.Stage, "_sample", lambda self, *a: at_flush.append(1) or orig_stage(self, *a))
    monkeypatch.setattr(sampling.TokenSampler, "sample", sample)
    calls, rows, routed, h = _run(store_root, "fault", "none", True)
    assert at_flush and h.stats()["faults"] > 0
    counts = collections.Counter()
    for step, layer, experts in calls:
        counts[step, layer] += len(experts)
    assert routed == dict(counts)   # every call counted
    _check([c for c in calls if c[1] != 1], [r for r in rows if r[1] != 1], {k: v for k, v in routed.items()
                                                                            if k[1] != 1})
    assert not [r for r in rows if r[1] == 1]


def _accumulate(root, run, rate, staging_on, steps_rule):
    """Three forwards (training, gradients accumulated) per optimizer step, 3 optimizer steps."""
    model = MoE([Router() for _ in range(4)], order=ORDER)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    calls = _truth(model, lambda: None)
    per_call_step = []
    with probes.attach(model, run=run, root=root, tokens=rate, seed=4, steps=steps_rule, flush_every=8,
                       staging=staging_on) as h:
        model.train()
        for s in range(3):
            for f in range(3):
                start = len(calls)
                model(torch.randint(1, 50, (2, 5), generator=torch.Generator().manual_seed(10 * s + f))).backward()
                per_call_step += [s] * (len(calls) - start)
            opt.step()
            opt.zero_grad()
        staged = list(h._window.rec.stage.state)
    con = chrono.connect(root)
    rows = con.execute("SELECT step, layer, batch_idx, position, k, expert, token_id FROM tokens "
                       "WHERE run_id = ? ORDER BY ALL", [run]).fetchall()
    routed = dict(((s, l), int(n)) for s, l, n in con.execute(
        "SELECT step, layer, sum(tokens) FROM routing WHERE run_id = ? GROUP BY ALL", [run]).fetchall())
    return [(s, l, e) for s, (_, l, e) in zip(per_call_step, calls)], rows, routed, staged


@pytest.mark.parametrize("steps_rule", ["auto", "optimizer"])
def test_steps_of_accumulated_forwards_merged_at_the_optimizer_step(store_root, steps_rule):
    calls, rows, routed, staged = _accumulate(store_root, "acc" + steps_rule, 1.0, True, steps_rule)
    assert staged == [staging.STAGED] * 4
    _check(calls, [r[:6] for r in rows], routed)
    for rate in (1.0, 0.3):
        on = _accumulate(store_root, f"acc{steps_rule}{rate}", rate, True, steps_rule)[1]
        off = _accumulate(store_root, f"acc{steps_rule}{rate}_once", rate, False, steps_rule)[1]
        assert on and on == off


@pytest.mark.parametrize("host", [True, False])
@pytest.mark.parametrize("staging_on", [True, False])
def test_a_merged_step_keeps_the_per_step_sampling_budget(store_root, monkeypatch, staging_on, host):
    """steps='auto': the 3 forwards before the first optimizer step were provisional steps, each
    with a fresh budget; folded into one step they keep ``max_tokens_per_step`` tokens per layer
    (was: 3 x), first come, first served; a forward over the rest of the budget is thinned
    evenly, not cut to its first tokens. Every kept row is one the routers returned (the test's own hooks), with the
    forward's token id; on both sampling paths (host; device, as on CUDA or compiled)."""
    patch_paths(monkeypatch, host)
    model = MoE([Router() for _ in range(2)])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    budget, run, truth = 7, f"merge{int(staging_on)}{int(host)}", set()
    step_of, by_forward = [0], collections.defaultdict(set)
    for i, r in enumerate(model.routers):
        r.register_forward_hook(lambda m, a, out, i=i: by_forward[step_of[0], model.forward_no].update(
            (step_of[0], i, t // model.ids.shape[1], t % model.ids.shape[1], kk, int(out[2][t, kk]),
             int(model.ids.reshape(-1)[t]))
            for t in range(out[2].shape[0]) for kk in range(out[2].shape[1])))
        r.register_forward_hook(lambda m, a, out, i=i: truth.update(
            (step_of[0], i, t // model.ids.shape[1], t % model.ids.shape[1], kk, int(out[2][t, kk]),
             int(model.ids.reshape(-1)[t]))
            for t in range(out[2].shape[0]) for kk in range(out[2].shape[1])))
    with probes.attach(model, run=run, root=store_root, tokens=1.0, max_tokens_per_step=budget, steps="auto",
                       flush_every=8, staging=staging_on):
        model.train()
        for s in range(2):
            step_of[0] = s
            for f, seq in enumerate((2, 8, 8)):   # 3 forwards (2 x seq tokens) per optimizer step
                model.forward_no = f
                model.ids = torch.randint(1, 50, (2, seq), generator=torch.Generator().manual_seed(10 * s + f))
                model(model.ids).backward()
            opt.step()
            opt.zero_grad()
    rows = chrono.connect(store_root).execute(
        "SELECT step, layer, batch_idx, position, k, expert, token_id FROM tokens WHERE run_id = ? ORDER BY ALL",
        [run]).fetchall()
    assert set(rows) <= truth   # each kept row is what a router returned for that token
    per = collections.Counter((r[0], r[1]) for r in rows)
    assert per == {(s, layer): budget * 2 for s in (0, 1) for layer in (0, 1)}   # k = 2 rows per token
    # merged step: the first forward's 4 tokens, then 3 of the second's 7 (stride 2) thinned to
    # stride 4 (tokens off, off + 4, off + 8 of 16: both sequences), the third's none
    for layer in (0, 1):
        mine = [r for r in rows if r[0] == 0 and r[1] == layer]
        first = {r[2:4] for r in mine if r in by_forward[0, 0]}
        second = sorted({r[2] * 8 + r[3] for r in mine if r in by_forward[0, 1] and r not in by_forward[0, 0]})
        assert len(first) == 4 and len(second) == 3 and not [r for r in mine if r in by_forward[0, 2]
                                                              and r not in by_forward[0, 1]]
        assert np.diff(second).tolist() == [4, 4], second
