"""Staged router calls (probes/staging.py) count exactly what the routers returned.

Ground truth: a plain forward hook of the test's own, registered on each router before
probes attach, clones indices and weights when the router returns (before the model can
touch them) and counts them with NumPy. Cases: training and inference, several steps after
probation; a model that changes router outputs in place after the router (always, or only
once the slot is staged); non-finite logits on the staged path; a padding mask (eager)
mixed with staged calls; early flushes at the logits bound and batches at the assignments
bound; a router called twice per forward; int32 indices; routers without weights; and the
fallback when a batch cannot be counted at once.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import chrono
import probes
from probes import staging

from . import probe_models as T

# every test runs with both counting backends (tests/probes/conftest.py)
pytestmark = pytest.mark.usefixtures("backend")

L, E, K = 3, 5, 2


class Router(torch.nn.Module):
    chrono_router = True

    def __init__(self, d, weights=True, int32=False):
        super().__init__()
        self.proj = torch.nn.Linear(d, E)
        self.n_experts, self.top_k = E, K
        self.weights, self.int32, self.poison = weights, int32, False

    def forward(self, x):
        logits = self.proj(x)
        if self.poison:
            logits = logits + float("inf")   # weights stay finite below: only the logits tell
        w, idx = torch.topk(logits.softmax(-1), K, dim=-1)
        if self.poison:
            w = torch.full_like(w, 0.5)
        if self.int32:
            idx = idx.to(torch.int32)
        return logits, (w if self.weights else None), idx


class MoE(torch.nn.Module):
    """L routers; ``mutate`` changes router outputs in place after each router returns:
    "weights" (always: a renormalisation), "indices" (only while ``mutate_now``)."""

    def __init__(self, mutate=None, twice=False, weights=True, int32=False, d=8):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(T.VOCAB, d)
        self.routers = torch.nn.ModuleList(Router(d, weights, int32) for _ in range(L))
        self.table = torch.nn.Parameter(torch.randn(E, d) * 0.1)
        self.mutate, self.mutate_now, self.twice = mutate, False, twice

    def forward(self, input_ids, attention_mask=None):
        x = self.emb(input_ids).reshape(-1, self.emb.embedding_dim)
        for r in self.routers:
            for _ in range(2 if self.twice else 1):
                _, w, idx = r(x)
                use = idx.long().clone()   # (autograd saves what it gathers with)
                if self.mutate == "weights" and w is not None:
                    w.div_(2.0)
                if self.mutate == "indices" and self.mutate_now:
                    idx.copy_((idx + 1) % E)
                gate = w if w is not None else torch.ones(idx.shape, dtype=x.dtype)
                x = x + (gate[..., None] * self.table[use]).sum(1)
        return x.sum()


def truth_hooks(model):
    """Per step: [layer] list of (indices, weights) clones taken as each router returns."""
    calls: list = []

    def hook(layer):
        def h(mod, args, out):
            w = None if out[1] is None else out[1].detach().clone().double()
            calls.append((layer, out[2].detach().clone().long(), w))
        return h

    for i, r in enumerate(model.routers):
        r.register_forward_hook(hook(i))
    return calls


def counted(calls) -> tuple[np.ndarray, np.ndarray]:
    tokens, weight = np.zeros((L, E), np.int64), np.zeros((L, E))
    for layer, idx, w in calls:
        np.add.at(tokens[layer], idx.reshape(-1).numpy(), 1)
        if w is not None:
            np.add.at(weight[layer], idx.reshape(-1).numpy(), w.reshape(-1).numpy())
    return tokens, weight


def stored(root, run) -> dict:
    rows = chrono.connect(root).execute(
        "select step, layer, expert, tokens, weight_sum from routing where run_id = ?", [run]).fetchall()
    out: dict = {}
    for step, layer, e, n, w in rows:
        t, ws = out.setdefault(step, (np.zeros((L, E), np.int64), np.zeros((L, E))))
        t[layer, e] += n
        ws[layer, e] += 0.0 if w is None else w
    return out


def run_steps(model, root, run, steps=5, infer=False, grad=True, before_step=None, **attach):
    calls = truth_hooks(model)
    truth = []
    ids = torch.randint(1, T.VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))
    with probes.attach(model, run=run, root=root, steps="manual", flush_every=2, **attach) as h:
        for s in range(steps):
            if before_step is not None:
                before_step(s, h)
            del calls[:]
            if infer:
                with torch.inference_mode():
                    model(ids)
            elif not grad:
                with torch.no_grad():
                    model(ids)
            else:
                model(ids).backward()
            truth.append(counted(calls))
            h.step()
        states = list(h._window.rec.stage.state)
        stats = h.stats()
    return truth, stored(root, run), states, stats


def assert_equal_per_step(truth, got, skip=()):
    for s, (tok, w) in enumerate(truth):
        if s in skip:
            continue
        np.testing.assert_array_equal(got[s][0], tok, err_msg=f"tokens of step {s}")
        np.testing.assert_allclose(got[s][1], w, rtol=1e-5, err_msg=f"weight sums of step {s}")


@pytest.fixture(autouse=True)
def copies_always(monkeypatch):
    """Stage inference-mode calls (as copies) in these 3-router models too, so that the tests
    here check that path; ``test_few_routers_count_inference_calls_at_once`` checks the default."""
    monkeypatch.setattr(staging, "COPIES_MIN_ROUTERS", 1)


def eager_calls(monkeypatch) -> list:
    """Record the (mode, slot) of every call counted at once (``Recorder.record``)."""
    from probes.recorder import Recorder
    seen, orig = [], Recorder.record

    def record(self, mode, slot, *a, **k):
        seen.append((mode, slot))
        return orig(self, mode, slot, *a, **k)

    monkeypatch.setattr(Recorder, "record", record)
    return seen


@pytest.mark.parametrize("infer", [False, True], ids=["train", "inference"])
def test_staged_counts_equal_the_routers_outputs(store_root, infer, monkeypatch):
    eager = eager_calls(monkeypatch)
    truth, got, states, stats = run_steps(MoE(), store_root, "st", infer=infer)
    if infer:   # inference: private copies are staged from the first call, no probation
        assert eager == []
    else:       # probation: the first forward's calls are counted at once, then staged
        assert states == [staging.STAGED] * L and len(eager) == L
    assert stats["faults"] == 0 and stats["nonfinite"] == 0
    assert_equal_per_step(truth, got)


def test_a_model_that_changes_weights_in_place_stays_eager_and_exact(store_root):
    """``w.div_(2)`` after every router: staged references would read halved weights."""
    truth, got, states, stats = run_steps(MoE(mutate="weights"), store_root, "mw")
    assert states == [staging.EAGER] * L
    assert stats["faults"] == 0
    assert_equal_per_step(truth, got)


def test_indices_changed_in_place_after_probation_are_not_counted_and_reported(store_root):
    """The model starts changing indices in place only at step 3 (under no_grad: top-k's
    backward needs its indices unchanged): staged calls of that step are dropped (not
    miscounted) with one fault per router, the routers turn eager, and the steps after are
    exact again."""
    model = MoE(mutate="indices")

    def before(s, h):
        model.mutate_now = s >= 3

    truth, got, states, stats = run_steps(model, store_root, "mi", steps=6, grad=False, before_step=before)
    assert states == [staging.EAGER] * L
    assert stats["faults"] == L
    assert_equal_per_step(truth, got, skip=(3,))
    assert 3 not in got or got[3][0].sum() == 0   # lost, never counted as the changed values


@pytest.mark.parametrize("infer", [False, True], ids=["no_grad", "inference"])
def test_nonfinite_logits_are_flagged_on_the_staged_path(store_root, infer, monkeypatch):
    model = MoE()
    eager = eager_calls(monkeypatch)

    def before(s, h):
        model.routers[1].poison = s == 3

    truth, got, states, stats = run_steps(model, store_root, "nf", infer=infer, grad=False,
                                          before_step=before)
    assert len(eager) == (0 if infer else L)   # only the probation forward (step 0) was eager
    assert stats["nonfinite"] == 1
    sig = chrono.connect(store_root).sql(
        "select step, layer from signals where name = 'probes.nonfinite' and value > 0").fetchall()
    assert sig == [(3, 1)]


def test_padding_mask_calls_mix_with_staged_ones(store_root):
    """Forwards with a padding mask are counted eagerly (without the padding tokens), the
    others staged; the per-step totals stay exact."""
    model = T.mixtral()
    ids = T.batch(model)["input_ids"]
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    calls = []
    routers = [m for m in model.modules() if type(m).__name__ == "MixtralTopKRouter"]
    for i, r in enumerate(routers):
        r.register_forward_hook(lambda mod, a, out, i=i: calls.append((i, out[2].detach().clone())))
    want = {}
    with probes.attach(model, run="pad", root=store_root, steps="manual") as h:
        for s in range(4):
            del calls[:]
            masked = s % 2 == 1
            model(input_ids=ids, attention_mask=mask if masked else None)
            keep = (mask.reshape(-1) > 0) if masked else torch.ones(ids.numel(), dtype=torch.bool)
            n = np.zeros((len(routers), 6), np.int64)
            for i, idx in calls:
                np.add.at(n[i], idx[keep].reshape(-1).numpy(), 1)
            want[s] = n
            h.step()
        assert h._window.rec.stage.state == [staging.STAGED] * len(routers)
    rows = chrono.connect(store_root).execute(
        "select step, layer, expert, sum(tokens) from routing where run_id = 'pad' group by all").fetchall()
    for s, n in want.items():
        got = np.zeros_like(n)
        for step, layer, e, c in rows:
            if step == s:
                got[layer, e] = c
        np.testing.assert_array_equal(got, n, err_msg=f"step {s}")


def test_bounds_flush_early_and_batch_without_losing_a_count(store_root, monkeypatch):
    monkeypatch.setattr(staging, "MAX_LOGITS", 3 * 7 * E * 2 - 1)    # < 2 calls' logits
    monkeypatch.setattr(staging, "MAX_ASSIGNMENTS", 3 * 7 * K + 1)   # 1 call per batch
    flushes = []
    orig = staging.Stage._count

    def count(self, batch, n):
        flushes.append(len(batch))
        return orig(self, batch, n)

    monkeypatch.setattr(staging.Stage, "_count", count)
    truth, got, states, _ = run_steps(MoE(twice=True), store_root, "bd")
    assert states == [staging.STAGED] * L
    assert flushes and max(flushes) == 1
    assert_equal_per_step(truth, got)


@pytest.mark.parametrize("variant", ["twice", "int32", "no_weights"])
def test_variants_of_router_output(store_root, variant):
    model = MoE(twice=variant == "twice", int32=variant == "int32", weights=variant != "no_weights")
    truth, got, states, stats = run_steps(model, store_root, variant)
    assert states == [staging.STAGED] * L and stats["faults"] == 0
    assert_equal_per_step(truth, got)


def test_a_batch_that_cannot_be_counted_at_once_is_counted_eagerly(store_root, monkeypatch):
    """``torch.cat`` refuses tensors on another device than the recorder's; simulated by a
    failing ``_count``: every call is then counted eagerly, none lost, routers turn eager."""
    def fail(self, batch, n):
        raise RuntimeError("Expected all tensors to be on the same device")

    monkeypatch.setattr(staging.Stage, "_count", fail)
    truth, got, states, stats = run_steps(MoE(), store_root, "fb")
    assert states == [staging.EAGER] * L
    assert_equal_per_step(truth, got)


@pytest.mark.torch_ops_only   # checks the PyTorch ops' own buffers / branches
def test_few_routers_count_inference_calls_at_once(store_root, monkeypatch):
    """Below ``COPIES_MIN_ROUTERS`` routers an inference-mode call is counted at once (copies
    would cost more than they save), exactly."""
    monkeypatch.setattr(staging, "COPIES_MIN_ROUTERS", L + 1)
    eager = eager_calls(monkeypatch)
    truth, got, _, stats = run_steps(MoE(), store_root, "few", infer=True)
    assert len(eager) == 5 * L and stats["faults"] == 0
    assert_equal_per_step(truth, got)


@pytest.mark.torch_ops_only   # checks the PyTorch ops' own buffers / branches
@pytest.mark.parametrize("infer", [False, True], ids=["train", "inference"])
def test_calls_above_max_call_are_counted_at_once(store_root, monkeypatch, infer):
    """A call of more than ``MAX_CALL`` top-k assignments (here 3 x 7 x 2 = 42 > 41) is counted
    at once, every step, exactly; none is staged."""
    monkeypatch.setattr(staging, "MAX_CALL", 3 * 7 * K - 1)
    eager = eager_calls(monkeypatch)
    truth, got, states, stats = run_steps(MoE(), store_root, "big", infer=infer)
    assert len(eager) == 5 * L and stats["faults"] == 0
    if not infer:
        assert states == [staging.EAGER] * L
    assert_equal_per_step(truth, got)
