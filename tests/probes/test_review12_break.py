"""Hostile review of the per-forward fast paths (``probes.forwards``, commit 4757ba4): a stack call
with nothing per token to read gets the shared ``probes.context.BARE`` context, and a forward's end
with nothing staged or watched skips the flush.

Each test mixes, in one run, forwards that take the fast path with forwards (or stacks, or
handles, or threads) that must not, and checks the stored rows against truth counted here from
the routers' own outputs (``field_truth``) and the masks the test passed. White-box checks make
sure the fast path really ran where it should (else the test would not cover it). Run once per
counting backend (``backend`` fixture)."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import chrono
import probe_models as T
import probes
from field_truth import capture, count, router_modules, stored
from probes import context as C
from probes.recorder import EVAL
from probes.staging import STAGED
from test_forward_fast_path import _ids, _left_padded   # the same inputs as the fast path's own tests

torch.set_num_threads(1)


def _signals(root, run, name="probes.padding_excluded"):
    con = chrono.connect(root)
    return {(s, l): v for s, l, v in con.execute(
        "SELECT step, layer, sum(value) FROM signals WHERE run_id = ? AND name = ? GROUP BY ALL",
        [run, name]).fetchall()}


TOP_K = 2   # probe_models.mixtral(); probes.padding_excluded counts excluded (token, k) assignments


def _keep(mask):
    return mask.reshape(-1).numpy().astype(bool)


def _ctx_log(h, model):
    """(stack index, context) each router call sees, from a hook registered after the probes'."""
    seen = []
    paths = h._fwd.stack_paths
    hs = []
    for name, mod in model.named_modules():
        if mod in router_modules(model):
            i = max((j for j, p in enumerate(paths) if p == "" or name.startswith(p + ".")),
                    key=lambda j: len(paths[j]))
            hs.append(mod.register_forward_hook(
                lambda m, a, o, i=i: seen.append((i, h._fwd.tls.ctx[i]))))
    return seen, hs


@pytest.mark.parametrize("call", ["model", "forward_direct"])
def test_encoder_and_decoder_masks_apart_without_sampling(store_root, backend, call):
    """Switch: encoder and decoder stacks get their own masks (or none) in each forward; a stack
    without one takes the fast path while the other captures. ``forward_direct`` calls
    ``type(m).forward`` (the model's hooks bypassed, as PEFT does): the encoder acts as the top
    level and the decoder continues the same forward (one step each under steps="forward")."""
    m = T.switch_transformers().eval()
    enc_mask = _left_padded()
    dec_mask = torch.ones(3, 7, dtype=torch.long)
    dec_mask[1, 5:] = 0
    dec_mask[2, 2:] = 0
    plan = [(enc_mask, None), (None, dec_mask), (None, None), (enc_mask, dec_mask)]
    fwd = m if call == "model" else (lambda **kw: type(m).forward(m, **kw))
    truths = []
    with torch.no_grad(), probes.attach(m, run="ed", root=store_root, steps="forward") as h:
        seen, hs = _ctx_log(h, m)
        for step, (em, dm) in enumerate(plan):
            kw = dict(input_ids=_ids(seed=step), decoder_input_ids=_ids(3, 7, seed=10 + step))
            if em is not None:
                kw["attention_mask"] = em
            if dm is not None:
                kw["decoder_attention_mask"] = dm
            truths.append(capture(m, lambda: fwd(**kw)))
        for x in hs:
            x.remove()
    assert any(c is C.BARE[EVAL] for _, c in seen)                  # the fast path ran
    assert any(c is not None and c.keep is not None for _, c in seen)  # and so did capture
    got, sig = stored(store_root, "ed"), _signals(store_root, "ed")
    assert sorted({k[0] for k in got}) == [0, 1, 2, 3]             # one step per forward
    for step, ((em, dm), truth) in enumerate(zip(plan, truths)):
        for layer, mask in ((0, em), (1, em), (2, dm), (3, dm)):
            keep = None if mask is None else [_keep(mask)] * len(truth[layer])
            np.testing.assert_array_equal(got[(step, "EVAL", layer)], count(truth[layer], 4, keep))
            want_pad = None if mask is None else float((mask == 0).sum())   # Switch: top-1
            assert sig.get((step, layer)) == want_pad, (step, layer)


def test_two_handles_one_sampling_one_not_on_one_model(store_root, backend):
    """One handle samples tokens (captures every stack call), the other does not (fast path
    where no mask applies): each stores the truth, and the sampling one's token rows carry the
    right ids; the non-sampling one still excludes padding when a mask comes."""
    m = T.mixtral().eval()
    mask = _left_padded()
    forwards = [(_ids(seed=0), mask), (_ids(seed=1), None), (_ids(seed=2), mask)]
    truths = []
    with torch.no_grad(), probes.attach(m, run="tok", root=store_root, tokens=1.0, steps="forward") as h1, \
            probes.attach(m, run="bare", root=store_root, steps="forward") as h2:
        seen1, hs1 = _ctx_log(h1, m)
        seen2, hs2 = _ctx_log(h2, m)
        for ids, mk in forwards:
            truths.append(capture(m, lambda: m(input_ids=ids) if mk is None else
                                  m(input_ids=ids, attention_mask=mk)))
        for x in hs1 + hs2:
            x.remove()
    assert all(c is not C.BARE[EVAL] and c.ids is not None for _, c in seen1)
    assert any(c is C.BARE[EVAL] for _, c in seen2)
    for run in ("tok", "bare"):
        got, sig = stored(store_root, run), _signals(store_root, run)
        for step, ((ids, mk), truth) in enumerate(zip(forwards, truths)):
            for layer in (0, 1):
                keep = None if mk is None else [_keep(mk)]
                np.testing.assert_array_equal(got[(step, "EVAL", layer)], count(truth[layer], 6, keep))
                assert sig.get((step, layer)) == (None if mk is None else TOP_K * float((mk == 0).sum()))
    rows = chrono.connect(store_root).execute(
        "SELECT step, batch_idx, position, token_id FROM tokens WHERE run_id = 'tok' AND layer = 1").fetchall()
    assert rows and all(tid == int(forwards[s][0][b, p]) for s, b, p, tid in rows)
    assert {(s, b, p) for s, b, p, _ in rows if s == 1} == {(1, b, p) for b in range(3) for p in range(10)}
    assert not chrono.connect(store_root).execute(
        "SELECT count(*) FROM tokens WHERE run_id = 'bare'").fetchone()[0]


def test_generate_left_padding_with_kv_cache_without_sampling(store_root, backend):
    """generate() with left padding: the prefill's padding is excluded (and signalled), every
    decode forward (one new token per row, all real) counts in full."""
    m = T.mixtral().eval()
    m.generation_config.pad_token_id = 0
    mask = _left_padded()
    ids = _ids()
    ids[mask == 0] = 0
    with probes.attach(m, run="gen", root=store_root, steps="manual") as h:
        truth = capture(m, lambda: m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4,
                                              do_sample=False))
        h.step()
    got, sig = stored(store_root, "gen"), _signals(store_root, "gen")
    for layer in (0, 1):
        calls = truth[layer]
        assert len(calls) == 4 and calls[0].shape[0] == 30 and all(c.shape[0] == 3 for c in calls[1:])
        keep = [_keep(mask)] + [np.ones(3, bool)] * 3
        want = count(calls, 6, keep)
        assert want.sum() == 2 * (19 + 9)
        np.testing.assert_array_equal(got[(0, "EVAL", layer)], want)   # generate runs under no_grad
        assert sig[(0, layer)] == TOP_K * 11.0


def test_pseudo_root_training_alternating_masks(store_root, backend):
    """Training through ``type(m).forward`` (model hooks bypassed): steps follow the optimizer,
    forwards alternate a padding mask (captured) and none (fast path); probation is judged at
    the pseudo-root's end, so the routers end up staged."""
    m = T.mixtral().train()
    opt = torch.optim.SGD(m.parameters(), lr=1e-2)
    mask = _left_padded()
    truths = []
    with probes.attach(m, run="pr", root=store_root) as h:
        for i in range(4):
            x = _ids(seed=i)
            mk = mask if i % 2 else None
            truths.append(capture(m, lambda: type(m).forward(m, input_ids=x, labels=x,
                                                             attention_mask=mk).loss.backward()))
            opt.step()
            opt.zero_grad()
        assert h._window.rec.stage.state == [STAGED, STAGED]
    got, sig = stored(store_root, "pr"), _signals(store_root, "pr")
    for i, truth in enumerate(truths):
        keep = [_keep(mask)] if i % 2 else None
        for layer in (0, 1):
            np.testing.assert_array_equal(got[(i, "TRAIN", layer)], count(truth[layer], 6, keep))
            assert sig.get((i, layer)) == (TOP_K * 11.0 if i % 2 else None)


@pytest.mark.parametrize("training", [False, True])
def test_threads_mixing_fast_and_captured_forwards(store_root, backend, training):
    """Three threads run forwards at once, each alternating a padding mask and none (so one
    thread's stack captures while another's takes the fast path, and a forward's end reads the
    stage without the lock while other threads stage calls). Truth: the same forwards re-run
    one by one without probes. Training: probation is judged per thread, staged calls of one
    thread may be flushed at another's end; nothing may be lost or counted twice."""
    m = T.mixtral().train(training)
    mask = _left_padded()
    plan = {k: [(_ids(seed=10 * k + i), mask if (i + k) % 2 else None) for i in range(6)] for k in range(3)}
    errors = []

    def run(ids, mk):
        kw = {"input_ids": ids} if mk is None else {"input_ids": ids, "attention_mask": mk}
        if training:
            m(**kw, labels=ids).loss.backward()
        else:
            with torch.no_grad():
                m(**kw)

    with probes.attach(m, run="thr", root=store_root, steps="manual") as h:
        start = threading.Barrier(3)

        def work(k):
            try:
                start.wait()
                for ids, mk in plan[k]:
                    run(ids, mk)
            except Exception as e:   # pragma: no cover - reported below
                errors.append(e)

        ts = [threading.Thread(target=work, args=(k,)) for k in range(3)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        h.step()
        if training:
            assert h._window.rec.stage.state == [STAGED, STAGED]
    assert not errors
    want = {0: np.zeros(6, np.int64), 1: np.zeros(6, np.int64)}
    pad = 0
    for k in range(3):
        for ids, mk in plan[k]:
            kw = {"input_ids": ids} if mk is None else {"input_ids": ids, "attention_mask": mk}
            with torch.no_grad():
                truth = capture(m, lambda: m(**kw))
            for layer in (0, 1):
                want[layer] += count(truth[layer], 6, None if mk is None else [_keep(mk)])
            pad += 0 if mk is None else int((mk == 0).sum())
    mode = "TRAIN" if training else "EVAL"
    got, sig = stored(store_root, "thr"), _signals(store_root, "thr")
    for layer in (0, 1):
        np.testing.assert_array_equal(got[(0, mode, layer)], want[layer])
        assert sig[(0, layer)] == TOP_K * float(pad)


def test_staged_calls_are_counted_when_their_forward_ends(store_root, backend):
    """The forward's end must still flush when calls are staged (only an empty stage may skip
    it): user code that rewrites a router output it kept, after the forward returned and before
    the step ends, must not change (or drop) what was counted. Truth: the outputs as returned."""
    m = T.NativeMoE(layers=2).eval()
    kept = []
    hooks = [r.register_forward_hook(lambda mod, a, out: kept.append(out)) for r in m.routers]
    truths = []
    with torch.no_grad(), probes.attach(m, run="end", root=store_root, steps="manual") as h:
        for i in range(4):
            kept.clear()
            truths.append(capture(m, lambda: m(_ids(2, 6, seed=i))))
            if i:   # (the first forward is on probation: counted at once)
                assert not h._window.rec.stage.calls   # flushed at the forward's end
            for _, w, idx in kept:
                idx.zero_()   # the caller reuses the buffers it kept
                w.mul_(3.0)
        h.step()
        assert h._window.rec.stage.state == [STAGED, STAGED]
    for x in hooks:
        x.remove()
    got = stored(store_root, "end")
    for layer in (0, 1):
        np.testing.assert_array_equal(got[(0, "EVAL", layer)], count([t[layer][0] for t in truths], 4))
    assert h.stats()["faults"] == 0   # no call found changed in place: all counted in time
