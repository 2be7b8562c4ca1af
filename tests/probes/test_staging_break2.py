"""Second review of staged counting (probes/staging.py): cases that store wrong or lost values.

Ground truth: the plain forward hook of ``test_staging.truth_hooks`` (registered on each
router before probes attach, cloning indices and weights as the router returns), counted
with NumPy; stored values are read back from the ``routing`` table. Unlike
``test_staging_break.wrong_cells``, a call dropped with a fault is *not* accepted here where
nothing changed the router's outputs in place: the model did nothing a probe may refuse.
"""
from __future__ import annotations

import types

import numpy as np
import torch

import probes

from .test_staging import E, K, L, MoE, counted, stored, truth_hooks

IDS = torch.randint(1, 97, (3, 7), generator=torch.Generator().manual_seed(0))


def exact(truth, got) -> list:
    """(step, stored tokens per layer, truth tokens per layer, stored weight sum, truth weight
    sum) of every step whose stored tokens or weight sums differ from the truth."""
    bad = []
    for s, (tok, w) in enumerate(truth):
        g_tok, g_w = got.get(s, (np.zeros((L, E), np.int64), np.zeros((L, E))))
        if not (np.array_equal(g_tok, tok) and np.allclose(g_w, w, rtol=1e-5)):
            bad.append((s, g_tok.sum(1).tolist(), tok.sum(1).tolist(),
                        round(float(g_w.sum()), 4), round(float(w.sum()), 4)))
    return bad


def run(model, root, run_id, steps=4, ctx=torch.no_grad, call=None, between=None):
    """``steps`` manual steps of one forward each under ``ctx()``; returns truth, stored, stats."""
    calls = truth_hooks(model)
    truth = []
    with probes.attach(model, run=run_id, root=root, steps="manual", flush_every=2) as h:
        for s in range(steps):
            if between is not None:
                between(s, h)
            del calls[:]
            with ctx():
                (call or model)(IDS)
            truth.append(counted(calls))
            h.step()
        stats = h.stats()
    return truth, stored(root, run_id), stats


def test_float64_model_under_inference_mode_is_counted(store_root):
    """A float64 model (``model.double()``, common in numerics tests and small research
    models) served under ``torch.inference_mode``: every call is staged as a private copy,
    whose logits norm is taken with ``torch.linalg.vector_norm(logits, dtype=torch.float32)``,
    which refuses a narrowing cast from float64 and raises in the router hook. Every call is
    a telemetry fault and nothing at all is stored."""
    truth, got, stats = run(MoE().double(), store_root, "f64", ctx=torch.inference_mode)
    assert exact(truth, got) == [] and stats["faults"] == 0, (exact(truth, got), stats["faults"])
