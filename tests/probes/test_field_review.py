"""Exact in the field (issue 15), cases found by a hostile review of the first fix."""
from __future__ import annotations

import copy
import logging
import threading

import numpy as np
import pytest
import torch

import chrono
import probe_models as T
import probes
from field_truth import capture, count, duplicate_keys, stored

torch.set_num_threads(1)


def _ids(b=2, s=8, seed=0):
    return torch.randint(1, T.VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def test_resume_at_step_zero_with_single_step_parts(store_root):
    """A part holding only step 0 must be truncated too (its largest step is 0, not 'none')."""
    m = T.NativeMoE()
    for session in range(2):
        kw = {} if session == 0 else {"start_step": 0, "overwrite": True}
        with probes.attach(m, run="z", root=store_root, flush_every=1, tokens=1.0, **kw) as h:
            for s in range(3):
                m(_ids(seed=s)); h.step()
    got = stored(store_root, "z")
    assert duplicate_keys(store_root, "z") == 0
    assert [int(got[(s, "TRAIN", 0)].sum()) for s in range(3)] == [32, 32, 32]
    n = chrono.connect(store_root).execute(
        "SELECT count(*) FROM tokens WHERE run_id = 'z' AND step = 0 AND layer = 0").fetchone()[0]
    assert n == 32


class Wrapper(torch.nn.Module):
    """Calls the attached model's forward directly, as PEFT's BaseTuner does."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *a, **k):
        return self.model.forward(*a, **k)


def test_steps_when_a_wrapper_bypasses_the_models_hooks(store_root):
    m = T.mixtral()
    w = Wrapper(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    with probes.attach(m, run="peft", root=store_root):
        m.eval()
        with torch.no_grad():
            for i in range(3):
                w(input_ids=_ids(seed=i))
        m.train()
        for i in range(3):
            w(input_ids=_ids(seed=10 + i), labels=_ids(seed=10 + i)).loss.backward()
            opt.step(); opt.zero_grad()
    got = stored(store_root, "peft")
    # as with the model's own hooks: forwards before the first optimizer step are its step (0),
    # then one step per optimizer step
    assert sorted(k[:2] for k in got if k[2] == 0) == [(0, "EVAL"), (0, "TRAIN"), (1, "TRAIN"), (2, "TRAIN")]
    assert got[(0, "EVAL", 0)].sum() == 3 * 2 * 8 * 2
    assert all(got[(s, "TRAIN", 0)].sum() == 2 * 8 * 2 for s in range(3))


def test_deepcopy_of_an_attached_model(store_root):
    m = T.NativeMoE()
    with probes.attach(m, run="dc", root=store_root) as h:
        m(_ids(seed=0)); h.step()
        twin = copy.deepcopy(m)                 # EMA / a frozen reference model, made while attached
        twin(_ids(seed=1)); twin(_ids(seed=2))  # not recorded: it is another model
        m(_ids(seed=3)); h.step()
    got = stored(store_root, "dc")
    assert sorted({k[0] for k in got}) == [0, 1]
    assert all(v.sum() == 32 for v in got.values())
    out_twin = twin(_ids(seed=4))               # the copy still works after detach
    assert torch.allclose(out_twin, m(_ids(seed=4)))


def test_deepcopy_of_a_method_wrapped_model_routes_like_the_original(store_root):
    m = T.dbrx().eval()
    ids = _ids(1, 6, seed=5)
    with probes.attach(m, run="dcd", root=store_root), torch.no_grad():
        twin = copy.deepcopy(m)
        ffn = next(x for x in twin.modules() if type(x).__name__ == "DbrxFFN")
        assert getattr(ffn.route_tokens_to_experts, "__self__", None) is ffn   # its own method
        a, b = m(input_ids=ids).logits, twin(input_ids=ids).logits
    assert torch.equal(a, b)
    total = sum(v.sum() for k, v in stored(store_root, "dcd").items() if k[2] == 0)
    assert total == 6 * 2                        # only the original's forward


def test_set_mask_applies_only_to_the_stack_of_its_shape(store_root):
    m = T.switch_transformers().eval()
    g = torch.Generator().manual_seed(4)
    enc, dec = torch.randint(1, T.VOCAB, (2, 8), generator=g), torch.randint(1, T.VOCAB, (2, 4), generator=g)
    emask = torch.ones(2, 8, dtype=torch.long)
    emask[1, 5:] = 0
    with torch.no_grad(), probes.attach(m, run="sm", root=store_root, tokens=1.0) as h:
        h.set_mask(emask)
        truth = capture(m, lambda: m(input_ids=enc, decoder_input_ids=dec))
    got = stored(store_root, "sm")
    keep = emask.reshape(-1).numpy().astype(bool)
    for layer in (0, 1):
        np.testing.assert_array_equal(got[(0, "EVAL", layer)], count(truth[layer], 4, [keep]))
    for layer in (2, 3):                         # decoder: unmasked, positions 0..3
        np.testing.assert_array_equal(got[(0, "EVAL", layer)], count(truth[layer], 4))
    pos = chrono.connect(store_root).execute(
        "SELECT DISTINCT position FROM tokens WHERE run_id = 'sm' AND layer = 2 ORDER BY 1").fetchall()
    assert [p for (p,) in pos] <= [0, 1, 2, 3]


def test_set_mask_that_fits_nothing_is_reported(store_root, caplog):
    m = T.NativeMoE().eval()
    with caplog.at_level(logging.WARNING, logger="probes"), torch.no_grad(), \
            probes.attach(m, run="bad", root=store_root) as h:
        h.set_mask(torch.ones(5, 3))
        m(_ids())
    assert "matched no [batch, seq]" in caplog.text


def test_threads_do_not_share_masks(store_root):
    m = T.mixtral().eval()
    ids_a, ids_b = _ids(3, 12, seed=1), _ids(2, 12, seed=2)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 9:] = 0
    with torch.no_grad():
        ta = capture(m, lambda: m(input_ids=ids_a))
        tb = capture(m, lambda: m(input_ids=ids_b))
    keep = mask.reshape(-1).numpy().astype(bool)
    want = count(ta[0], 6, [keep]) * 8 + count(tb[0], 6) * 8
    barrier = threading.Barrier(2)
    errors = []

    def serve(ids, attn):
        try:
            barrier.wait()
            with torch.no_grad():
                for _ in range(8):
                    m(input_ids=ids, attention_mask=attn)
        except Exception as e:   # pragma: no cover - reported below
            errors.append(e)

    with probes.attach(m, run="thr", root=store_root, flush_every=1000):
        ts = [threading.Thread(target=serve, args=(ids_a, mask)),
              threading.Thread(target=serve, args=(ids_b, None))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    assert not errors
    got = stored(store_root, "thr")
    have = sum(v for k, v in got.items() if k[2] == 0)
    np.testing.assert_array_equal(have, want)


def test_overwrite_without_start_step_says_it_replaces_nothing(store_root, caplog):
    m = T.NativeMoE()
    with probes.attach(m, run="ow", root=store_root) as h:
        m(_ids()); h.step()
    with caplog.at_level(logging.WARNING, logger="probes"), \
            probes.attach(m, run="ow", root=store_root, overwrite=True) as h:
        assert h.current_step == 1
    assert "replaces nothing" in caplog.text


@pytest.mark.parametrize("steps", ["auto", "manual"])
def test_a_handle_the_caller_does_not_keep_still_records(tmp_path, steps):
    """``probes.attach(model, ...)`` without keeping the result records like a registered hook:
    the handle lives as long as the model (until detach). Found by review: after the handle
    split a dropped handle never closed a window and wrote nothing, silently."""
    import gc

    import probes.handle as H

    torch.manual_seed(0)
    m = T.NativeMoE(layers=1, n_experts=4)
    opt = torch.optim.SGD(m.parameters(), lr=1e-2)
    truth = []   # per step: this router's own choices, counted here
    m.routers[0].register_forward_hook(
        lambda mod, inp, out: truth[-1].append(np.bincount(out[2].reshape(-1).numpy(), minlength=4)))
    probes.attach(m, run="r", root=tmp_path, flush_every=2, steps=steps, start_step=0)   # not kept
    gc.collect()
    for _ in range(6):
        truth.append([])
        m(torch.randint(1, T.VOCAB, (2, 5))).sum().backward()
        opt.step()
        opt.zero_grad()
        if steps == "manual":
            (h,) = H._ATTACHED[m]   # the only way to reach it now: what a user's own step() would be
            h.step()
        gc.collect()
    # the windows closed so far are on disk before any detach (0 parts when the handle died)
    written = {r[0] for r in chrono.connect(tmp_path).execute(
        "SELECT DISTINCT step FROM routing WHERE run_id = 'r'").fetchall()}
    assert {0, 1, 2, 3} <= written, written
    (h,) = H._ATTACHED[m]
    h.detach()
    assert m not in H._ATTACHED or not H._ATTACHED[m]
    rows = chrono.connect(tmp_path).execute(
        "SELECT step, expert, sum(tokens) FROM routing WHERE run_id = 'r' GROUP BY ALL ORDER BY ALL").fetchall()
    got = np.zeros((6, 4), dtype=np.int64)
    for step, e, n in rows:
        got[step, e] = n
    np.testing.assert_array_equal(got, np.array([sum(t) for t in truth]))
