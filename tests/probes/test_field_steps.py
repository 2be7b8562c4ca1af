"""Exact in the field (issue 15): recomputation, steps = optimizer steps, resuming a run.

Truth is counted in the test from the routers' own outputs (``field_truth``);
for checkpointing it comes from an identical model run without checkpointing.
"""
from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from torch.utils.checkpoint import checkpoint

import chrono
import probe_models as T
import probes
from chrono.store import StoreError
from field_truth import capture, count, duplicate_keys, stored

torch.set_num_threads(1)


def _ids(b=2, s=8, seed=0):
    return torch.randint(1, T.VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ recomputation
class CkptNative(T.NativeMoE):
    """NativeMoE whose layers run under torch.utils.checkpoint (reentrant or not)."""

    def __init__(self, reentrant: bool, **kw):
        super().__init__(**kw)
        self.reentrant = reentrant

    def forward(self, input_ids):
        x = self.emb(input_ids)
        B, S, D = x.shape

        def layer(x, router, table):
            _, w, idx = router(x)[:3]
            return x + (w[..., None] * table[idx]).sum(1).reshape(B, S, D)

        for router, table in zip(self.routers, self.expert_out):
            x = checkpoint(layer, x, router, table, use_reentrant=self.reentrant)
        return self.head(x)


class FloatMoE(torch.nn.Module):
    """Routers over float inputs, so the whole model call can be checkpointed."""

    def __init__(self, layers=2, d=8, n_experts=4):
        super().__init__()
        torch.manual_seed(0)
        self.routers = torch.nn.ModuleList(T.NativeRouter(d, n_experts, 2) for _ in range(layers))

    def forward(self, x):
        for r in self.routers:
            _, w, idx = r(x)[:3]
            x = x + w.sum(-1, keepdim=True).reshape(*x.shape[:-1], 1)
        return x


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _train_step(model, batch):
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    loss = out.loss if hasattr(out, "loss") and out.loss is not None else out.float().pow(2).mean()
    loss.backward()


@pytest.mark.parametrize("reentrant", [False, True])
def test_torch_checkpoint_inside_model_counts_once_as_train(store_root, reentrant):
    m = CkptNative(reentrant)
    ref = copy.deepcopy(m)
    ids = _ids(2, 8)
    truth = capture(ref, lambda: ref(ids))           # the same forward without recompute
    with probes.attach(m, run="ck", root=store_root):
        m(ids).sum().backward()
    got = stored(store_root, "ck")
    assert set(got) == {(0, "TRAIN", 0), (0, "TRAIN", 1)}
    for layer in (0, 1):
        np.testing.assert_array_equal(got[(0, "TRAIN", layer)], count(truth[layer], 4))
        assert got[(0, "TRAIN", layer)].sum() == 2 * 8 * 2


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_the_whole_model_call(store_root, reentrant):
    m = FloatMoE()
    ref = copy.deepcopy(m)
    x = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(3), requires_grad=True)
    truth = capture(ref, lambda: ref(x))
    with probes.attach(m, run="whole", root=store_root):
        checkpoint(m, x, use_reentrant=reentrant).pow(2).mean().backward()
    got = stored(store_root, "whole")
    assert set(got) == {(0, "TRAIN", 0), (0, "TRAIN", 1)}
    for layer in (0, 1):
        np.testing.assert_array_equal(got[(0, "TRAIN", layer)], count(truth[layer], 4))


@pytest.mark.parametrize("api,reentrant,extra", [
    ("activation_checkpointing_enable", False, {}), ("activation_checkpointing_enable", True, {}),
    ("activation_checkpointing_enable", False, {"every_n_layers": 2}),
    ("gradient_checkpointing_enable", True, {})])
def test_hf_activation_checkpointing(store_root, api, reentrant, extra):
    m = T.mixtral()
    m.train()
    ref = copy.deepcopy(m)
    ids = _ids(2, 8, seed=1)
    truth = capture(ref, lambda: ref(input_ids=ids, labels=ids))
    kw = {("activation_checkpointing_kwargs" if api.startswith("activation") else
           "gradient_checkpointing_kwargs"): {"use_reentrant": reentrant}, **extra}
    with pytest.warns(FutureWarning) if api.startswith("gradient") else _nothing():
        getattr(m, api)(**kw)
    with probes.attach(m, run="hfck", root=store_root):
        m(input_ids=ids, labels=ids).loss.backward()
    got = stored(store_root, "hfck")
    assert set(got) == {(0, "TRAIN", 0), (0, "TRAIN", 1)}     # no EVAL copy, no second TRAIN copy
    for layer in (0, 1):
        np.testing.assert_array_equal(got[(0, "TRAIN", layer)], count(truth[layer], 6))
        assert got[(0, "TRAIN", layer)].sum() == 32


# ------------------------------------------------------------ optimizer steps
def _accumulation_run(root, run, n_steps, micro=3, evals_after=(), **attach_kw):
    """``n_steps`` optimizer steps of ``micro`` micro-batches; eval forwards after the listed steps.

    Returns the truth ``{(step, mode, layer): counts}`` built from the test's own capture,
    assigning each forward to the optimizer step it belongs to.
    """
    m = T.NativeMoE()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    truth: dict = {}

    def add(step, mode, cap):
        for layer, calls in cap.items():
            key = (step, mode, layer)
            truth[key] = truth.get(key, 0) + count(calls, 4)

    with probes.attach(m, run=run, root=root, **attach_kw) as h:
        for s in range(n_steps):
            m.train()
            for i in range(micro):
                add(s, "TRAIN", capture(m, lambda: m(_ids(seed=100 * s + i)).sum().backward()))
            opt.step()
            opt.zero_grad()
            if s in evals_after:
                m.eval()
                with torch.no_grad():
                    add(s, "EVAL", capture(m, lambda: [m(_ids(seed=999 + j)) for j in range(2)]))
    return truth, h


@pytest.mark.parametrize("kw", [dict(), dict(steps="optimizer"), dict(steps="optimizer", flush_every=1)],
                         ids=["auto", "optimizer", "optimizer-flush1"])
def test_gradient_accumulation_one_step_per_optimizer_step(store_root, kw):
    truth, h = _accumulation_run(store_root, "acc", n_steps=4, evals_after=(1, 3), **kw)
    got = stored(store_root, "acc")
    assert set(got) == set(truth)
    for key in truth:
        np.testing.assert_array_equal(got[key], truth[key], err_msg=str(key))
    assert h.stats()["optimizer_steps"] == 4
    assert sorted({k[0] for k in got}) == [0, 1, 2, 3]
    assert duplicate_keys(store_root, "acc") == 0


def test_auto_rule_with_a_window_shorter_than_one_step_warns_and_loses_nothing(store_root, caplog):
    with caplog.at_level(logging.WARNING, logger="probes"):
        truth, _ = _accumulation_run(store_root, "short", n_steps=2, flush_every=2)
    assert "did not fit in one window" in caplog.text
    got = stored(store_root, "short")
    for layer in (0, 1):
        want = sum(v for k, v in truth.items() if k[2] == layer)
        have = sum(v for k, v in got.items() if k[2] == layer)
        np.testing.assert_array_equal(have, want)


def test_policy_and_reference_forwards_are_one_step(store_root):
    """DPO-like: chosen + rejected policy forwards, a frozen reference copy (not attached) and the
    policy itself under no_grad as reference; one optimizer step each."""
    pol = T.NativeMoE()
    ref = copy.deepcopy(pol).eval()
    opt = torch.optim.SGD(pol.parameters(), lr=0.1)
    truth: dict = {}
    with probes.attach(pol, run="dpo", root=store_root):
        for s in range(3):
            pol.train()
            cap = capture(pol, lambda: (pol(_ids(seed=s)).sum() + pol(_ids(seed=50 + s)).sum()).backward())
            for layer, calls in cap.items():
                truth[(s, "TRAIN", layer)] = count(calls, 4)
            with torch.no_grad():
                ref(_ids(seed=s))                     # another model: not recorded
                pol.eval()
                cap = capture(pol, lambda: pol(_ids(seed=7 + s)))
                pol.train()
            for layer, calls in cap.items():
                truth[(s, "EVAL", layer)] = count(calls, 4)
            opt.step()
            opt.zero_grad()
    got = stored(store_root, "dpo")
    assert set(got) == set(truth)
    for key in truth:
        np.testing.assert_array_equal(got[key], truth[key], err_msg=str(key))


def test_another_models_optimizer_does_not_end_steps(store_root):
    a, b = T.NativeMoE(), T.NativeMoE(layers=1)
    oa, ob = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.Adam(b.parameters(), lr=0.1)
    with probes.attach(a, run="a", root=store_root) as ha, probes.attach(b, run="b", root=store_root) as hb:
        for s in range(3):
            a(_ids(seed=s)).sum().backward(); oa.step(); oa.zero_grad()
            for _ in range(2):           # b steps twice per a step
                b(_ids(seed=s)).sum().backward(); ob.step(); ob.zero_grad()
    assert sorted({k[0] for k in stored(store_root, "a")}) == [0, 1, 2]
    assert sorted({k[0] for k in stored(store_root, "b")}) == list(range(6))
    assert (ha.stats()["optimizer_steps"], hb.stats()["optimizer_steps"]) == (3, 6)


def test_explicit_step_numbers_follow_a_trainer(store_root):
    m = T.NativeMoE()
    with probes.attach(m, run="gs", root=store_root, steps="manual", start_step=1) as h:
        m(_ids()); h.step(next_step=5)
        m(_ids()); h.step()
        with pytest.raises(probes.ProbeError):
            h.step(next_step=3)
    assert sorted({k[0] for k in stored(store_root, "gs")}) == [1, 5]


def test_inference_forwards_are_steps(store_root):
    m = T.NativeMoE().eval()
    with torch.no_grad(), probes.attach(m, run="inf", root=store_root, flush_every=3):
        for i in range(7):
            m(_ids(seed=i))
    assert sorted({k[0] for k in stored(store_root, "inf")}) == list(range(7))


# --------------------------------------------------------------------- resuming
def _session(root, run, seeds, **kw):
    m = T.NativeMoE()
    truth = []
    with probes.attach(m, run=run, root=root, flush_every=2, **kw) as h:
        for s in seeds:
            cap = capture(m, lambda: m(_ids(seed=s)))
            truth.append({layer: count(c, 4) for layer, c in cap.items()})
            h.step()
    return truth


def test_reattach_continues_after_the_stored_steps(store_root):
    t1 = _session(store_root, "r", [0, 1, 2])
    t2 = _session(store_root, "r", [3, 4, 5])
    got = stored(store_root, "r")
    assert sorted({k[0] for k in got}) == [0, 1, 2, 3, 4, 5]
    assert duplicate_keys(store_root, "r") == 0
    for step, t in enumerate(t1 + t2):
        for layer, c in t.items():
            np.testing.assert_array_equal(got[(step, "TRAIN", layer)], c)
    assert got[(0, "TRAIN", 0)].sum() == 2 * 8 * 2      # 24 in the 2x6 example; here 2x8 top-2
    snaps = chrono.connect(store_root).execute(
        "SELECT step, layer, count(*) FROM snapshots WHERE run_id = 'r' GROUP BY ALL HAVING count(*) > 1"
    ).fetchall()
    assert snaps == []


def test_overlapping_start_step_is_refused_and_writes_nothing(store_root):
    _session(store_root, "o", [0, 1, 2])
    before = stored(store_root, "o")
    with pytest.raises(StoreError, match="already has steps up to 2"):
        _session(store_root, "o", [9], start_step=0)
    assert {k: v.tolist() for k, v in stored(store_root, "o").items()} == \
        {k: v.tolist() for k, v in before.items()}


def test_resume_from_a_checkpoint_replaces_the_redone_steps(store_root):
    t1 = _session(store_root, "ck", [0, 1, 2, 3, 4])      # crashed after step 4; checkpoint at 3
    t2 = _session(store_root, "ck", [30, 40], start_step=3, overwrite=True)
    got = stored(store_root, "ck")
    assert sorted({k[0] for k in got}) == [0, 1, 2, 3, 4]
    assert duplicate_keys(store_root, "ck") == 0
    for step, t in enumerate(t1[:3] + t2):
        for layer, c in t.items():
            np.testing.assert_array_equal(got[(step, "TRAIN", layer)], c)


def test_writer_refuses_duplicate_routing_keys(store_root):
    model = {"layers": [0], "experts_per_layer": {"0": 2}, "top_k": 1}
    with chrono.open_run(store_root, "w", model=model) as w:
        w.log_routing([0, 1], 0, [[1, 1], [2, 2]])
        with pytest.raises(StoreError):
            w.log_routing(1, 0, [5, 5])
        w.log_routing(1, 0, [5, 5], mode="EVAL")          # another mode: another key
    with chrono.open_run(store_root, "w") as w:
        assert w.next_step == 2
        with pytest.raises(StoreError):
            w.log_routing(0, 0, [1, 1])
        with pytest.raises(StoreError):
            w.log_signal(1, "loss", 0.5)
        w.log_routing(2, 0, [3, 3])
    assert duplicate_keys(store_root, "w") == 0


def test_frozen_reference_model_follows_the_policys_steps(store_root):
    """DPO with both models attached: the reference run's steps are the policy's optimizer steps."""
    pol = T.NativeMoE()
    ref = copy.deepcopy(pol).eval()
    opt = torch.optim.SGD(pol.parameters(), lr=0.1)
    truth: dict = {}
    with probes.attach(pol, run="pol", root=store_root) as hp, \
            probes.attach(ref, run="ref", root=store_root, steps=hp):
        for s in range(3):
            (pol(_ids(seed=s)).sum() + pol(_ids(seed=50 + s)).sum()).backward()
            with torch.no_grad():
                for j in range(2):                      # reference log-probs of chosen and rejected
                    cap = capture(ref, lambda: ref(_ids(seed=10 * s + j)))
                    for layer, calls in cap.items():
                        truth[(s, "EVAL", layer)] = truth.get((s, "EVAL", layer), 0) + count(calls, 4)
            opt.step()
            opt.zero_grad()
    got = stored(store_root, "ref")
    assert set(got) == set(truth)
    for key in truth:
        np.testing.assert_array_equal(got[key], truth[key], err_msg=str(key))
    assert sorted({k[0] for k in stored(store_root, "pol")}) == [0, 1, 2]


def test_evaluation_before_training_lands_in_the_first_training_step(store_root):
    """steps='auto' records what steps='optimizer' would: forwards before the first update are step 0."""
    m = T.NativeMoE()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with probes.attach(m, run="pre", root=store_root):
        m.eval()
        with torch.no_grad():
            m(_ids(seed=1)); m(_ids(seed=2))            # a sanity-check evaluation
        m.train()
        for s in range(2):
            for i in range(2):
                m(_ids(seed=10 * s + i)).sum().backward()
            opt.step(); opt.zero_grad()
    got = stored(store_root, "pre")
    assert sorted({(k[0], k[1]) for k in got}) == [(0, "EVAL"), (0, "TRAIN"), (1, "TRAIN")]
    assert got[(0, "EVAL", 0)].sum() == 2 * 32 and got[(0, "TRAIN", 0)].sum() == 2 * 32
