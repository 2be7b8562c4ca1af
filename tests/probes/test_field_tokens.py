"""Exact in the field (issue 15): padding, and per-token metadata in every calling convention.

Truth comes from the routers' own outputs and the arguments the model really
received, captured by the test's own hooks and counted with NumPy.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import chrono
import probe_models as T
import probes
from field_truth import capture, count, stored

torch.set_num_threads(1)
LENGTHS = (12, 7, 3)


def _padded(side: str, lengths=LENGTHS, s=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, T.VOCAB, (len(lengths), s), generator=g)
    mask = torch.zeros(len(lengths), s, dtype=torch.long)
    for b, n in enumerate(lengths):
        if side == "right":
            mask[b, :n] = 1
        else:
            mask[b, s - n:] = 1
    ids[mask == 0] = 0
    return ids, mask


def _signal(root, run, name):
    con = chrono.connect(root)
    return dict(con.execute("SELECT layer, sum(value) FROM signals WHERE run_id = ? AND name = ? "
                            "GROUP BY ALL", [run, name]).fetchall())


def _token_rows(root, run, layer=None):
    con = chrono.connect(root)
    q = "SELECT step, batch_idx, position, token_id, k, expert FROM tokens WHERE run_id = ?"
    args = [run]
    if layer is not None:
        q += " AND layer = ?"
        args.append(layer)
    return con.execute(q, args).fetchall()


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_is_excluded_and_counted_apart(store_root, side):
    m = T.mixtral().eval()
    ids, mask = _padded(side)
    keep = [mask.reshape(-1).numpy().astype(bool)]
    with torch.no_grad(), probes.attach(m, run="pad", root=store_root, tokens=1.0):
        truth = capture(m, lambda: m(input_ids=ids, attention_mask=mask))
    got = stored(store_root, "pad")
    for layer in (0, 1):
        want = count(truth[layer], 6, keep)
        assert want.sum() == 44                           # 22 real tokens x top-2
        np.testing.assert_array_equal(got[(0, "EVAL", layer)], want)
    assert _signal(store_root, "pad", "probes.padding_excluded") == {0: 28.0, 1: 28.0}
    snaps = chrono.connect(store_root).execute(
        "SELECT layer, token_count FROM snapshots WHERE run_id = 'pad' AND layer >= 0 ORDER BY 1").fetchall()
    assert snaps == [(0, 44), (1, 44)]
    real = {(b, p) for b, p in zip(*np.nonzero(mask.numpy()))}
    rows = _token_rows(store_root, "pad", layer=0)
    assert {(b, p) for _, b, p, _, _, _ in rows} == real
    assert all(tid == int(ids[b, p]) for _, b, p, tid, _, _ in rows)


def test_padding_count_option_and_unmasked_batches(store_root):
    m = T.mixtral().eval()
    ids, mask = _padded("right")
    with torch.no_grad():
        with probes.attach(m, run="all", root=store_root, padding="count"):
            truth = capture(m, lambda: m(input_ids=ids, attention_mask=mask))
        with probes.attach(m, run="packed", root=store_root):   # packed sequences: no mask at all
            truth2 = capture(m, lambda: m(input_ids=ids))
    for run, tr in (("all", truth), ("packed", truth2)):
        got = stored(store_root, run)
        for layer in (0, 1):
            np.testing.assert_array_equal(got[(0, "EVAL", layer)], count(tr[layer], 6))
            assert got[(0, "EVAL", layer)].sum() == 72
        assert _signal(store_root, run, "probes.padding_excluded") == {}


def test_native_model_mask_through_set_mask(store_root):
    m = T.NativeMoE().eval()
    ids, mask = _padded("right", s=12)
    with torch.no_grad(), probes.attach(m, run="nat", root=store_root) as h:
        h.set_mask(mask)
        truth = capture(m, lambda: m(ids))
        truth_b = capture(m, lambda: m(ids))       # the mask applies to one forward only
    got = stored(store_root, "nat")
    keep = [mask.reshape(-1).numpy().astype(bool)]
    for layer in (0, 1):
        np.testing.assert_array_equal(got[(0, "EVAL", layer)], count(truth[layer], 4, keep))
        np.testing.assert_array_equal(got[(1, "EVAL", layer)], count(truth_b[layer], 4))
    with pytest.raises(probes.ProbeError):
        h.set_mask([1, 0])


def test_encoder_decoder_masks_and_token_positions(store_root):
    m = T.switch_transformers().eval()
    g = torch.Generator().manual_seed(4)
    enc = torch.randint(1, T.VOCAB, (4, 8), generator=g)
    dec = torch.randint(1, T.VOCAB, (4, 4), generator=g)
    emask = torch.ones(4, 8, dtype=torch.long)
    emask[2, 5:] = 0
    dmask = torch.ones(4, 4, dtype=torch.long)
    dmask[3, 2:] = 0
    with torch.no_grad(), probes.attach(m, run="sw", root=store_root, tokens=1.0):
        truth = capture(m, lambda: m(input_ids=enc, attention_mask=emask, decoder_input_ids=dec,
                                     decoder_attention_mask=dmask))
    got = stored(store_root, "sw")
    # Switch routers: 2 encoder (layers 0, 1) then 2 decoder (layers 2, 3), top-1
    for layer in range(4):
        mask = (emask if layer < 2 else dmask).reshape(-1).numpy().astype(bool)
        np.testing.assert_array_equal(got[(0, "EVAL", layer)], count(truth[layer], 4, [mask]))
    rows = _token_rows(store_root, "sw", layer=2)        # a decoder router
    dropped = truth[2][0][:, 0].numpy() < 0
    want = {(b, p, int(dec[b, p])) for b in range(4) for p in range(4)
            if dmask[b, p] and not dropped[b * 4 + p]}
    assert {(b, p, tid) for _, b, p, tid, _, _ in rows} == want


def test_labels_only_decoder_tokens_have_their_ids(store_root):
    m = T.switch_transformers().eval()
    g = torch.Generator().manual_seed(5)
    enc = torch.randint(1, T.VOCAB, (2, 6), generator=g)
    labels = torch.randint(1, T.VOCAB, (2, 4), generator=g)
    shifted = m._shift_right(labels)                         # what HF feeds the decoder
    with torch.no_grad(), probes.attach(m, run="lab", root=store_root, tokens=1.0):
        m(input_ids=enc, labels=labels)
    rows = _token_rows(store_root, "lab", layer=3)
    assert rows and all(r[3] is not None for r in rows)      # token ids known, never NULL or -1
    assert {(b, p, tid) for _, b, p, tid, _, _ in rows} <= {
        (b, p, int(shifted[b, p])) for b in range(2) for p in range(4)}


def _forward_args(model):
    """Capture (input_ids, cache_position) of every top-level forward of ``model``."""
    calls = []

    def pre(mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        calls.append((None if ids is None else ids.clone(), kwargs.get("cache_position")))
    return calls, model.register_forward_pre_hook(pre, with_kwargs=True)


def test_generate_decoder_only_positions_batch_and_ids(store_root):
    m = T.mixtral().eval()
    prompt = torch.randint(1, T.VOCAB, (2, 6), generator=torch.Generator().manual_seed(6))
    calls, hk = _forward_args(m)
    with probes.attach(m, run="gen", root=store_root, tokens=1.0):
        m.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    hk.remove()
    want = set()
    past = 0
    for step, (ids, cache_pos) in enumerate(calls):
        S = ids.shape[1]
        pos = list(range(past, past + S))
        if cache_pos is not None:
            assert cache_pos.tolist() == pos
        for b in range(ids.shape[0]):
            for j in range(S):
                want.add((step, b, pos[j], int(ids[b, j])))
        past += S
    assert len(calls) >= 4 and past >= 9                       # prefill 0-5, then 6, 7, 8, ...
    rows = _token_rows(store_root, "gen", layer=1)
    assert {(s, b, p, t) for s, b, p, t, _, _ in rows} == want
    positions = sorted({p for _, _, p, _, _, _ in rows})
    assert positions == list(range(past))


def test_generate_encoder_decoder_batch_index(store_root):
    m = T.switch_transformers().eval()
    enc = torch.randint(1, T.VOCAB, (3, 5), generator=torch.Generator().manual_seed(7))
    with probes.attach(m, run="sgen", root=store_root, tokens=1.0):
        out = m.generate(enc, max_new_tokens=3, do_sample=False)
    rows = _token_rows(store_root, "sgen", layer=2)          # decoder layer
    assert {b for _, b, _, _, _, _ in rows} == {0, 1, 2}
    # each decoder row's token id is the token the decoder was fed at that position
    for _, b, p, tid, _, _ in rows:
        assert tid == int(out[b, p])


def test_inputs_embeds_token_ids_are_null_not_a_sentinel(store_root):
    m = T.mixtral().eval()
    ids = torch.randint(1, T.VOCAB, (2, 5), generator=torch.Generator().manual_seed(8))
    emb = m.get_input_embeddings()(ids).detach()
    with torch.no_grad(), probes.attach(m, run="emb", root=store_root, tokens=1.0):
        m(inputs_embeds=emb)
    rows = _token_rows(store_root, "emb")
    assert rows and all(tid is None for _, _, _, tid, _, _ in rows)
    assert {(b, p) for _, b, p, _, _, _ in rows} == {(b, p) for b in range(2) for p in range(5)}


def test_sampled_tokens_are_the_same_at_every_layer(store_root):
    """At tokens < 1 every layer samples the same positions, so a token can be followed across layers."""
    m = T.mixtral().eval()
    with torch.no_grad(), probes.attach(m, run="same", root=store_root, tokens=0.25) as h:
        for i in range(3):
            m(input_ids=torch.randint(1, T.VOCAB, (4, 16), generator=torch.Generator().manual_seed(i)))
    con = chrono.connect(store_root)
    per_layer = {}
    for layer, step, b, p in con.execute("SELECT DISTINCT layer, step, batch_idx, position FROM tokens "
                                         "WHERE run_id = 'same'").fetchall():
        per_layer.setdefault(layer, set()).add((step, b, p))
    assert set(per_layer) == {0, 1}
    assert per_layer[0] == per_layer[1] and len(per_layer[0]) == 3 * 16   # 25 % of 64 per step
