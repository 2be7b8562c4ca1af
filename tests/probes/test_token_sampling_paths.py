"""Token sampling's two paths store the same rows, and the host path stores the truth.

Eager on CPU, ``TokenSampler`` reads the step's random offset on the host and slices the
sampled tokens (``_sample_host``); on CUDA or under ``torch.compile`` it computes them with
tensor ops (``sample``'s device path). Both must store identical ``tokens`` rows (every
column) in every calling convention: padding masks, token ids, KV-cache positions, capacity
drops, routers that see other than batch x sequence tokens. The truth test checks every
column of the host path's rows against the routers' outputs and the inputs, captured by the
test's own hooks.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import chrono
import probe_models as T
import probes
from probes import window

from . import staging_review as R
from .sampling_review import patch_paths

torch.set_num_threads(1)


def _padded(b=3, s=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, T.VOCAB, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    for i, n in enumerate((s, 7, 3)[:b]):
        mask[i, : s - n] = 0   # left padding
    return ids, mask


def _mixtral_padded(m):
    ids, mask = _padded()
    with torch.no_grad():
        for _ in range(2):
            m(input_ids=ids, attention_mask=mask)


def _mixtral_generate(m):
    prompt = torch.randint(1, T.VOCAB, (2, 6), generator=torch.Generator().manual_seed(6))
    m.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)


def _switch_drops(m):
    enc = torch.randint(1, T.VOCAB, (4, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        m(input_ids=enc, decoder_input_ids=enc[:, :5])


def _two_forwards(m):
    with torch.no_grad():
        for s in range(2):
            m(torch.randint(1, T.VOCAB, (3, 7), generator=torch.Generator().manual_seed(s)))


def _switch():
    m = T.switch_transformers().eval()
    for block in m.modules():   # a capacity small enough to drop tokens
        if type(block).__name__ == "SwitchTransformersTop1Router":
            block.expert_capacity = 2
    return m


SCENARIOS = {
    "padded_mask_ids": (lambda: T.mixtral().eval(), _mixtral_padded),
    "generate_kv_positions": (lambda: T.mixtral().eval(), _mixtral_generate),
    "switch_capacity_drops": (_switch, _switch_drops),
    # router 0 sees 10 of the 21 tokens: no batch x sequence context (flat positions, no ids)
    "fewer_tokens_no_context": (lambda: R.VariantMoE([R.Variant("fewer_tokens", 0), R.Router()]), _two_forwards),
}


COLUMNS = "step, mode, layer, batch_idx, position, k, expert, weight, token_id"


def _rows(root, run):
    return chrono.connect(root).execute(
        f"SELECT {COLUMNS} FROM tokens WHERE run_id = ? ORDER BY ALL", [run]).fetchall()


def _record(monkeypatch, root, run, scenario, rate, host: bool, seed=11):
    """``scenario`` recorded at ``rate`` with the host path on or off: the stored rows, every
    sampled row before the writer drops padding and dropped assignments (``token_rows``:
    ``[rows, 10]`` int64 sorted, then the weights in that order), and how many calls took the
    host path."""
    build, work = SCENARIOS[scenario]
    with monkeypatch.context() as mp:
        host_calls, sampled = patch_paths(mp, host)
        m = build()
        with probes.attach(m, run=run, root=root, tokens=rate, seed=seed):
            work(m)
    ints = np.concatenate([i for i, _ in sampled])
    weights = np.concatenate([w for _, w in sampled])
    order = np.lexsort(ints.T[::-1])
    return _rows(root, run), ints[order], weights[order], len(host_calls)


@pytest.mark.parametrize("rate", [0.3, 1.0])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_host_and_device_paths_store_identical_token_rows(store_root, monkeypatch, scenario, rate):
    stored_h, ints_h, w_h, calls_h = _record(monkeypatch, store_root, "host", scenario, rate, host=True)
    stored_d, ints_d, w_d, calls_d = _record(monkeypatch, store_root, "dev", scenario, rate, host=False)
    assert calls_h > 0 and calls_d == 0   # each run took the path it is named after
    assert stored_h and stored_h == stored_d
    np.testing.assert_array_equal(ints_h, ints_d)
    np.testing.assert_array_equal(w_h, w_d)
    # the scenario exercises what it is named after (columns 7-9: token id, dropped, padding)
    if scenario == "switch_capacity_drops":
        assert ints_h[:, 8].any()
    if scenario == "padded_mask_ids":
        assert ints_h[:, 9].any() and (ints_h[:, 7] >= 0).all()
    if scenario == "generate_kv_positions":
        assert ints_h[:, 4].max() >= 6   # positions past the prompt (KV cache)
    if scenario == "fewer_tokens_no_context":
        flat = ints_h[ints_h[:, 1] == 0]
        assert len(flat) and (flat[:, 3] == 0).all() and (flat[:, 7] == -1).all()
        assert rate < 1 or flat[:, 4].max() == 9   # flat positions 0-9, not p % 7


def test_host_path_rows_are_the_routers_outputs_at_the_sampled_tokens(store_root, monkeypatch):
    """Every column of the host path's rows against the truth: ``n = ceil(rate * T)`` tokens per
    call, at ``off + i * stride`` (``stride = T // n``; one ``off`` per call index, the same at
    every layer); batch ``p // S``, position ``p % S``, k, expert, weight, token id and padding
    flag of token ``p`` as the router returned them and the model received them; the stored
    rows are these minus the padding tokens'."""
    m = T.mixtral().eval()
    ids, mask = _padded()
    B, S = ids.shape
    outs: dict = {}
    routers = [r for r in m.modules() if type(r).__name__.endswith("TopKRouter")]
    hooks = [r.register_forward_hook(lambda mod, a, out, i=i: outs.setdefault(i, []).append(
        (out[2].detach().clone(), out[1].detach().clone()))) for i, r in enumerate(routers)]
    captured, orig_rows = [], window.token_rows
    monkeypatch.setattr(window, "token_rows", lambda ready: captured.append(orig_rows(ready)) or captured[-1])
    rate, k = 0.3, 2
    with torch.no_grad(), probes.attach(m, run="t", root=store_root, tokens=rate, seed=5) as h:
        for _ in range(3):
            m(input_ids=ids, attention_mask=mask)
            h.step()
    for hk in hooks:
        hk.remove()
    ints = np.concatenate([c[0] for c in captured if c is not None])
    weights = np.concatenate([c[1] for c in captured if c is not None])
    n = math.ceil(rate * B * S)
    stride = (B * S) // n
    flat_ids, pad = ids.reshape(-1).numpy(), (mask.reshape(-1) == 0).numpy()
    tokens: dict = {}
    for (step, layer, mode, b, p, kk, e, tid, dropped, padding), w in zip(ints.tolist(), weights.tolist()):
        t = b * S + p
        idx, wts = outs[layer][step]
        assert (mode, dropped) == (2 - 1, 0)   # EVAL (no_grad, eval()), no capacity drops
        assert e == int(idx[t, kk]) and w == pytest.approx(float(wts[t, kk]), rel=1e-6)
        assert tid == flat_ids[t] and padding == pad[t]
        tokens.setdefault((step, layer), []).append((t, kk))
    assert set(tokens) == {(s, layer) for s in range(3) for layer in range(len(routers))}
    offsets = set()
    for (step, layer), got in tokens.items():
        assert sorted(got) == sorted((t, kk) for t in {t for t, _ in got} for kk in range(k))
        ts = sorted({t for t, _ in got})
        assert len(ts) == n and 0 <= ts[0] < stride and ts == [ts[0] + i * stride for i in range(n)]
        assert ts == sorted({t for t, _ in tokens[step, 0]})   # the same tokens at every layer
        offsets.add(ts[0])
    assert len(offsets) > 1   # the offset is redrawn per step (3 steps)
    stored = chrono.connect(store_root).execute(
        "SELECT step, layer, batch_idx, position, k, expert FROM tokens WHERE run_id = 't' ORDER BY ALL").fetchall()
    want = sorted(tuple(r) for r in ints[ints[:, 9] == 0][:, [0, 1, 3, 4, 5, 6]].tolist())
    assert stored == want and len(stored) < len(ints)   # padding rows are not written
