"""The per-forward fast paths (``probes.forwards``): a stack call with nothing per token to read
gets the shared ``probes.context.BARE`` context instead of a captured one, and a forward's end
with nothing staged or watched skips the flush.

Each variant that must *not* take the fast path (a padding mask, ``h.set_mask``, sampled tokens)
is checked against truth counted here from the routers' own outputs (``field_truth``), and the
fast path is checked to be taken where it should be (white-box: the context a router call sees).
Run once per counting backend (``backend`` fixture)."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import chrono
import probes
import probe_models as T
from field_truth import capture, count, router_modules, stored
from probes import context as C
from probes.recorder import EVAL, INFER, TRAIN
from probes.staging import STAGED


def _ids(b=3, s=10, seed=0):
    return torch.randint(1, T.VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def _left_padded(b=3, s=10):
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, :4] = 0
    mask[2, :7] = 0
    return mask


def _seen_contexts(h, model):
    """Record the context each router call sees (a hook registered after the probes' own)."""
    seen = []
    hs = [r.register_forward_hook(lambda mod, a, o: seen.append(h._fwd.tls.ctx[0]))
          for r in router_modules(model)]
    return seen, hs


def _assert_bare_untouched():
    for m in (TRAIN, EVAL, INFER):
        b = C.BARE[m]
        assert (b.mode, b.ids, b.batch, b.seq, b.positions, b.keep, b.pad, b.used_user_mask) == \
            (m, None, None, None, None, None, None, False)


@pytest.mark.parametrize("mode", ["TRAIN", "EVAL", "INFER"])
def test_no_mask_no_sampling_takes_the_bare_context_and_counts_every_token(store_root, backend, mode):
    m = T.mixtral()
    m.train(mode == "TRAIN")
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    with probes.attach(m, run="bare", root=store_root, steps="manual") as h:
        seen, hs = _seen_contexts(h, m)
        truths = []
        for step in range(3):
            ids = _ids(seed=step)
            if mode == "TRAIN":
                truths.append(capture(m, lambda: m(input_ids=ids, labels=ids).loss.backward()))
                opt.step()
                opt.zero_grad()
            elif mode == "EVAL":
                with torch.no_grad():
                    truths.append(capture(m, lambda: m(input_ids=ids)))
            else:
                with torch.inference_mode():
                    truths.append(capture(m, lambda: m(input_ids=ids)))
            h.step()
        for x in hs:
            x.remove()
    idx = {"TRAIN": TRAIN, "EVAL": EVAL, "INFER": INFER}[mode]
    assert seen and all(c is C.BARE[idx] for c in seen)
    got = stored(store_root, "bare")
    n_layers = len(router_modules(m))
    assert len(got) == 3 * n_layers
    for step, truth in enumerate(truths):
        for layer in range(n_layers):
            np.testing.assert_array_equal(got[(step, mode, layer)], count(truth[layer], 6))
    _assert_bare_untouched()


def test_a_padding_mask_is_captured_and_excludes_padding(store_root, backend):
    m = T.mixtral().eval()
    ids, mask = _ids(), _left_padded()
    with torch.no_grad(), probes.attach(m, run="pad", root=store_root) as h:
        seen, hs = _seen_contexts(h, m)
        truth = capture(m, lambda: m(input_ids=ids, attention_mask=mask))
        for x in hs:
            x.remove()
    assert seen and all(c is not C.BARE[EVAL] and c.keep is not None for c in seen)
    keep = mask.reshape(-1).numpy().astype(bool)
    got = stored(store_root, "pad")
    for layer in range(len(router_modules(m))):
        np.testing.assert_array_equal(got[(0, "EVAL", layer)], count(truth[layer], 6, [keep]))
        assert got[(0, "EVAL", layer)].sum() == 2 * keep.sum() < 2 * keep.size
    _assert_bare_untouched()


def test_padding_count_with_a_mask_counts_everything_from_the_bare_context(store_root, backend):
    m = T.mixtral().eval()
    ids, mask = _ids(), _left_padded()
    with torch.inference_mode(), probes.attach(m, run="cnt", root=store_root, padding="count") as h:
        seen, hs = _seen_contexts(h, m)
        truth = capture(m, lambda: m(input_ids=ids, attention_mask=mask))
        for x in hs:
            x.remove()
    assert seen and all(c is C.BARE[INFER] for c in seen)
    got = stored(store_root, "cnt")
    for layer in range(len(router_modules(m))):
        np.testing.assert_array_equal(got[(0, "INFER", layer)], count(truth[layer], 6))
        assert got[(0, "INFER", layer)].sum() == 2 * ids.numel()


@pytest.mark.parametrize("padding", ["exclude", "count"])
def test_set_mask_is_captured_under_either_padding_rule(store_root, backend, padding, caplog):
    m = T.NativeMoE().eval()
    ids = _ids(2, 6, seed=3)
    user = torch.ones(2, 6, dtype=torch.long)
    user[1, 4:] = 0
    got_ctx = []
    hook = m.routers[0].register_forward_hook(lambda mod, a, o: got_ctx.append(h._fwd.tls.ctx[0]))
    with caplog.at_level(logging.WARNING, logger="probes"), torch.no_grad(), \
            probes.attach(m, run="um", root=store_root, padding=padding) as h:
        h.set_mask(user)
        truth = capture(m, lambda: m(ids))
    hook.remove()
    assert got_ctx and got_ctx[0] is not C.BARE[EVAL] and got_ctx[0].used_user_mask
    assert "matched no [batch, seq]" not in caplog.text   # the mask fitted the forward: no warning
    keep = user.reshape(-1).numpy().astype(bool) if padding == "exclude" else None
    got = stored(store_root, "um")
    np.testing.assert_array_equal(got[(0, "EVAL", 0)], count(truth[0], 4, None if keep is None else [keep]))


def test_sampled_tokens_get_ids_and_positions(store_root, backend):
    m = T.mixtral().eval()
    ids = _ids(2, 8, seed=5)
    with torch.no_grad(), probes.attach(m, run="tok", root=store_root, tokens=1.0) as h:
        seen, hs = _seen_contexts(h, m)
        m(input_ids=ids)
        for x in hs:
            x.remove()
    assert seen and all(c is not C.BARE[EVAL] and c.ids is ids for c in seen)
    rows = chrono.connect(store_root).execute(
        "SELECT batch_idx, position, token_id FROM tokens WHERE run_id = 'tok' AND layer = 0").fetchall()
    assert len(rows) == 2 * ids.numel()   # top-2: every token twice
    for b, p, tid in rows:
        assert tid == int(ids[b, p])


def test_a_forward_end_judges_probation_with_nothing_staged(store_root, backend):
    """The first training forward's calls are on probation (watched, counted at once): nothing is
    staged, but the forward's end must still judge them, or they never get staged."""
    m = T.mixtral().train()
    with probes.attach(m, run="prob", root=store_root, steps="manual") as h:
        stage = h._window.rec.stage
        ids = _ids()
        truth = capture(m, lambda: m(input_ids=ids, labels=ids).loss.backward())
        assert not stage.calls and not stage.watch
        assert stage.state == [STAGED] * len(router_modules(m))
        truth2 = capture(m, lambda: m(input_ids=ids, labels=ids).loss.backward())
        h.step()
    got = stored(store_root, "prob")
    for layer in range(len(router_modules(m))):
        np.testing.assert_array_equal(got[(0, "TRAIN", layer)],
                                      count(truth[layer] + truth2[layer], 6))
