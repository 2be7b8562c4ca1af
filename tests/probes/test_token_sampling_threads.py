"""Review 8: two threads' forwards share one handle while their router calls are staged and
sampled at the flush (1c2b081). Each forward passes a barrier after its third router call, so
both threads are in mid-forward at once and the first to end flushes (and samples) the other's
staged calls: each of them must be sampled with its own forward's context.

Ground truth: the test's own forward hooks (registered before probes attach) record, per call,
the calling thread's token ids ``[B, S]`` and the router's indices ``[B*S, k]``; with rate 1
every assignment is a row ``(layer, batch_idx, position, k, expert, token_id)``, so per step
the stored rows must equal the hooks' rows as a multiset (NumPy). The threads use different
batch shapes and vocabulary ranges, so a row sampled with the other thread's context differs.
"""
from __future__ import annotations

import threading

import numpy as np
import torch

import chrono
import probes

from .staging_review import MoE, Router

ORDER = [0, 1, 0, 2, 3]
SHAPES = {0: (2, 5, 1, 40), 1: (3, 4, 60, 97)}   # thread: (B, S, lowest id, highest id)


def test_threads_sampled_at_another_threads_flush_keep_their_own_contexts(store_root):
    model = MoE([Router() for _ in range(4)], order=ORDER)
    local = threading.local()
    truth: list = []
    lock = threading.Lock()
    for i, r in enumerate(model.routers):
        def hook(m, a, out, i=i):
            ids, idx = local.ids, out[2].detach().clone().numpy()
            B, S = ids.shape
            rows = [(local.step, i, b, s, kk, int(idx[b * S + s, kk]), int(ids[b, s]))
                    for b in range(B) for s in range(S) for kk in range(idx.shape[1])]
            with lock:
                truth.extend(rows)
        r.register_forward_hook(hook)
    barrier = threading.Barrier(2, timeout=30)
    errors: list = []

    def work(t, step):
        B, S, lo, hi = SHAPES[t]
        g = torch.Generator().manual_seed(100 * step + t)
        try:
            local.step = step
            for _ in range(3):
                local.ids = torch.randint(lo, hi, (B, S), generator=g)
                with torch.no_grad():
                    model(local.ids)
        except Exception as e:  # reported below
            errors.append(e)

    def after(pos, i):
        if pos == 2:
            barrier.wait()

    with probes.attach(model, run="thr", root=store_root, tokens=1.0, seed=2, steps="manual",
                       flush_every=1) as h:
        for step in range(3):
            model.after = after if step else None   # step 0: one thread (probation, then staged)
            threads = [threading.Thread(target=work, args=(t, step)) for t in ((0, 1) if step else (0,))]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            h.step()
        staged = h._window.rec.stage.state
        faults = h.stats()["faults"]
    assert not errors and faults == 0
    assert staged == [probes.staging.STAGED] * 4
    got = chrono.connect(store_root).execute(
        "SELECT step, layer, batch_idx, position, k, expert, token_id FROM tokens WHERE run_id = 'thr' "
        "ORDER BY ALL").fetchall()
    assert got == sorted(truth)
    assert {r[0] for r in got} == {0, 1, 2}
    assert np.isin(np.array([r[6] for r in got if r[0] > 0]), np.arange(60, 97)).any()
