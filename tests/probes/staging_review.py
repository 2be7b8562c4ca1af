"""Shared by the third review's staging tests (``test_staging_break3*.py``): routers whose
expert count, logits form and dtype can change, a model calling them in any order, and the
ground truth: the test's own forward hook, registered on each router before probes attach,
clones each router output as it returns (indices, weights, logits), counted with NumPy;
stored values are read back from the ``routing`` and ``signals`` tables after detach.
"""
from __future__ import annotations

import threading

import numpy as np
import torch

import chrono
import probes

from . import probe_models as T

K, D, W = 2, 8, 48   # top-k, model width, widest projection (the largest expert count used)
IDS = torch.randint(1, T.VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))


class Router(torch.nn.Module):
    """Declares ``n_experts`` and routes to the first ``width`` of ``W`` projections.
    ``logit_scale`` multiplies the returned logits only (selection and weights unchanged);
    ``dtype``: dtype of the returned logits."""
    chrono_router = True

    def __init__(self, n=8, dtype=None):
        super().__init__()
        self.proj = torch.nn.Linear(D, W)
        self.n_experts = self.width = n
        self.top_k, self.dtype, self.logit_scale = K, dtype, None

    def forward(self, x):
        logits = self.proj(x)[..., : self.width]
        w, idx = torch.topk(logits.softmax(-1), K, dim=-1)
        out = logits if self.dtype is None else logits.to(self.dtype)
        if self.logit_scale is not None:
            out = out * self.logit_scale
        return out, w, idx


class MoE(torch.nn.Module):
    """Routers called in ``order`` (indices into ``routers``; a router may repeat); after each
    call ``after(position, router index)`` runs (a lifecycle change, a pause...)."""

    def __init__(self, routers, order=None):
        super().__init__()
        torch.manual_seed(0)
        for r in routers:   # (built before this seed: made deterministic here)
            r.proj.reset_parameters()
        self.emb = torch.nn.Embedding(T.VOCAB, D)
        self.routers = torch.nn.ModuleList(routers)
        self.table = torch.nn.Parameter(torch.randn(W, D) * 0.1)
        self.order = list(range(len(routers))) if order is None else order
        self.after = None

    def forward(self, input_ids):
        x = self.emb(input_ids).reshape(-1, D)
        for pos, i in enumerate(self.order):
            _, w, idx = self.routers[i](x)[:3]
            x = x + (w[..., None] * self.table[idx]).sum(1)
            if self.after is not None:
                self.after(pos, i)
        return x.sum()


def truth_hooks(model) -> list:
    """Thread-safe list of (layer, indices, weights float64, logits all finite) per call."""
    calls: list = []
    for i, r in enumerate(model.routers):
        r.register_forward_hook(lambda m, a, out, i=i: calls.append(
            (i, out[2].detach().clone().long(),
             torch.zeros(out[2].shape, dtype=torch.float64) if out[1] is None else out[1].detach().clone().double(),
             out[0] is None or bool(torch.isfinite(out[0]).all()))))
    return calls


def count(calls, n_layers=None) -> dict:
    """{(layer, expert): (tokens, weight sum)} of ``calls``."""
    out: dict = {}
    for layer, idx, w, _ in calls:
        tok = np.zeros(W, np.int64)
        ws = np.zeros(W)
        np.add.at(tok, idx.reshape(-1).numpy(), 1)
        np.add.at(ws, idx.reshape(-1).numpy(), w.reshape(-1).numpy())
        for e in np.nonzero(tok)[0]:
            t, s = out.get((layer, int(e)), (0, 0.0))
            out[layer, int(e)] = (t + int(tok[e]), s + float(ws[e]))
    return out


def stored(root, run_id) -> dict:
    """{step: {(layer, expert): (tokens, weight sum)}} of the rows with tokens (all modes summed)."""
    out: dict = {}
    for step, layer, e, n, w in chrono.connect(root).execute(
            "select step, layer, expert, tokens, weight_sum from routing where run_id = ? and tokens > 0",
            [run_id]).fetchall():
        t, s = out.setdefault(step, {}).get((layer, e), (0, 0.0))
        out[step][layer, e] = (t + n, s + (w or 0.0))
    return out


def signals(root, run_id, name) -> list:
    return chrono.connect(root).execute(
        "select step, layer, value from signals where run_id = ? and name = ? and value > 0 order by all",
        [run_id, name]).fetchall()


def diff(truth: list, got: dict) -> list:
    """(step, key, truth, stored) of every cell whose tokens or weight sum differ."""
    bad = []
    for s, want in enumerate(truth):
        have = got.get(s, {})
        for key in sorted(set(want) | set(have)):
            a, b = want.get(key, (0, 0.0)), have.get(key, (0, 0.0))
            if a[0] != b[0] or not np.isclose(a[1], b[1] or 0.0, rtol=1e-5, atol=1e-9):
                bad.append((s, key, a, b))
    return bad


def run(model, root, run_id, steps=6, ctx=torch.no_grad, before=None, call=None, flush_every=2,
        hooks=truth_hooks, **attach):
    """``steps`` manual steps of one forward each; returns truth, stored, stats, stage states.
    ``hooks(model)`` registers the truth hooks and returns their list of calls."""
    calls = hooks(model)
    truth = []
    with probes.attach(model, run=run_id, root=root, steps="manual", flush_every=flush_every, **attach) as h:
        for s in range(steps):
            if before is not None:
                before(s, h)
            del calls[:]
            with ctx():
                (model if call is None else call)(IDS)
            truth.append(count(calls, len(model.routers)))
            h.step()
        states = list(h._window.rec.stage.state)
    return truth, stored(root, run_id), h.stats(), states


class Variant(Router):
    """From ``switch_at`` on (a count of its calls), returns its output as ``variant``."""

    def __init__(self, variant=None, switch_at=10**9):
        super().__init__()
        self.variant, self.switch_at, self.calls = variant, switch_at, 0

    def forward(self, x):
        logits, w, idx = super().forward(x)
        self.calls += 1
        v = self.variant if self.calls > self.switch_at else None
        if v == "no_logits":
            logits = None
        elif v == "no_weights":
            w = None
        elif v == "int32":
            idx = idx.to(torch.int32)
        elif v == "three_d":
            idx, w, logits = idx.reshape(3, 7, K), w.reshape(3, 7, K), logits.reshape(3, 7, -1)
        elif v == "non_contiguous":
            idx, w, logits = idx.t().contiguous().t(), w.t().contiguous().t(), logits.t().contiguous().t()
        elif v == "expanded":   # every token's logits are the first token's (stride 0)
            logits = logits[:1].expand_as(logits)
        elif v == "float64":
            w, logits = w.double(), logits.double()
        elif v == "fewer_tokens":
            idx, w, logits = idx[:10], w[:10], logits[:10]
        return logits, w, idx


class VariantMoE(MoE):
    def forward(self, input_ids):
        x = self.emb(input_ids).reshape(-1, D)
        for i in self.order:
            _, w, idx = self.routers[i](x)
            idx = idx.reshape(-1, K).long()
            w = torch.ones(idx.shape) if w is None else w.reshape(-1, K).float()
            moe = (w[..., None] * self.table[idx]).sum(1)
            x = x + torch.nn.functional.pad(moe, (0, 0, 0, x.shape[0] - idx.shape[0]))   # fewer tokens
        return x.sum()


VARIANTS = ["no_logits", "no_weights", "int32", "three_d", "non_contiguous", "expanded", "float64", "fewer_tokens"]


def run_threads(target, args: list) -> None:
    """``target(a)`` in one thread per ``a`` of ``args``, all started, then all joined."""
    threads = [threading.Thread(target=target, args=(a,)) for a in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
