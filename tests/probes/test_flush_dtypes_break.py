"""Review 7 of the staged flush's own-dtype buffers (``Stage._layout``'s ``wbuf`` / ``sbuf``):
weights whose dtype changes between forwards of the same shapes (the layout cache key), in
the flat path (3-D, int32 indices, non-contiguous, ``[T*k, 1]`` columns), weights None in
some calls, batches split by ``MAX_ASSIGNMENTS``, copies' precomputed logit sums mixed with
references' in one flush, threads. Ground truth: the review harness's own hooks on each
router (``staging_review.truth_hooks``), counted with NumPy; every stored cell must match
(``_strict``, from the recorder's float64 cells), and the layouts built must have taken the own-dtype branch where one applies.
"""
from __future__ import annotations

import threading

import pytest
import torch

from probes import staging

from .staging_review import D, IDS, K, Router, VariantMoE, count, run_threads, truth_hooks

# every test runs with both counting backends (tests/probes/conftest.py)
pytestmark = pytest.mark.usefixtures("backend")

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16


class Shifting(Router):
    """Weights in ``wdtype`` (None: no weights), shaped as ``shape`` names, logits in ``ldtype``;
    the test changes them between forwards."""

    def __init__(self, wdtype=F32, shape="plain", ldtype=None):
        super().__init__()
        self.wdtype, self.shape, self.ldtype, self.infer = wdtype, shape, ldtype, False

    def forward(self, x):
        if self.infer:   # this router's outputs are inference tensors in a normal forward
            with torch.inference_mode():
                return self._route(x)
        return self._route(x)

    def _route(self, x):
        logits, w, idx = super().forward(x)
        if self.ldtype is not None:
            logits = logits.to(self.ldtype)
        if self.wdtype == F64:   # float64 weights of float64 precision (not float32 values)
            w = (super().forward(x)[0].double() * 1.1).softmax(-1).gather(-1, idx)
        w = None if self.wdtype is None else w.to(self.wdtype)
        s = self.shape
        if s == "three_d":
            idx, w = idx.reshape(3, 7, K), None if w is None else w.reshape(3, 7, K)
        elif s == "int32":
            idx = idx.to(torch.int32)
        elif s == "non_contiguous":
            idx = idx.t().contiguous().t()
            w = None if w is None else w.t().contiguous().t()
        elif s == "column":
            w = None if w is None else w.reshape(-1, 1)
        return logits, w, idx


DTYPES = [F32, BF16, F16, F64]


def _strict(truth, got) -> list:
    """Cells whose tokens differ or whose weight sums differ by more than 1e-12 (summation
    order only: a float64 weight rounded through a float32 buffer, ~1e-8, is caught; the
    store's ``weight_sum`` column is float32, so ``got`` comes from the recorder, ``_exact``)."""
    bad = []
    for s, want in enumerate(truth):
        have = got.get(s, {})
        for key in sorted(set(want) | set(have)):
            a, b = want.get(key, (0, 0.0)), have.get(key, (0, 0.0))
            if a[0] != b[0] or abs(a[1] - b[1]) > 1e-12 * max(1.0, abs(a[1])):
                bad.append((s, key, a, b))
    return bad


def _exact(model, root, run_id, steps, ctx=torch.no_grad, before=None):
    """``staging_review.run``'s loop in one window, read from the recorder in float64
    (``Window.live``) before detach: truth per step and ``{step: {(layer, expert): (tokens,
    weight sum)}}``, the layouts the flushes built, stats and stage states."""
    import probes

    calls = truth_hooks(model)
    truth, seen = [], []
    with probes.attach(model, run=run_id, root=root, steps="manual", flush_every=steps + 1) as h:
        for s in range(steps):
            if before is not None:
                before(s, h)
            del calls[:]
            with ctx():
                model(IDS)
            seen.extend(_layouts(h))
            truth.append(count(calls))
            h.step()
        arrays = h._window.live()
        layers = h._window.layer_ids.tolist()
        stats, states = h.stats(), list(h._window.rec.stage.state)
    counts, weight = arrays.counts.sum(axis=1), arrays.weight.sum(axis=1)   # [step, slot, expert]
    got = {}
    for s, slot, e in zip(*counts[:steps].nonzero()):
        got.setdefault(int(s), {})[layers[slot], int(e)] = (int(counts[s, slot, e]), float(weight[s, slot, e]))
    return truth, got, seen, stats, states


def _layouts(h):
    return list(h._window.rec.stage._layouts.values())


@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference"])
@pytest.mark.parametrize("shape", ["plain", "three_d", "int32", "non_contiguous", "column"])
def test_weights_dtype_changing_between_forwards_of_one_shape(store_root, shape, ctx, backend):
    """10 routers; step s gives every router the weights dtype DTYPES[s % 4] (one layout key
    per dtype: the key holds it), then mixed dtypes, then some without weights."""
    model = VariantMoE([Shifting(shape=shape) for _ in range(10)])

    def before(s, h):
        for i, r in enumerate(model.routers):
            r.wdtype = DTYPES[s % 4] if s < 8 else (DTYPES[i % 4] if s < 10 else (None if i % 3 == 0 else BF16))

    truth, got, seen, stats, states = _exact(model, store_root, f"{shape}-{ctx.__name__}", 12, ctx, before)
    assert _strict(truth, got) == []
    assert stats["faults"] == 0
    own = {lay[8].dtype for lay in seen if lay[8] is not None}
    if backend == "native":   # the C module counted every call: the PyTorch flush never ran
        assert seen == []
        return
    assert own == {F32, BF16, F16}, own   # each single-dtype forward took the own-dtype branch


@pytest.mark.torch_ops_only   # checks the PyTorch ops' own buffers / branches
def test_batches_split_by_max_assignments_with_dtypes_per_batch(store_root, monkeypatch):
    """``MAX_ASSIGNMENTS`` = 100: a forward of 10 calls of 42 assignments flushes in 5 batches
    (2 calls each), the batches' weights dtypes differing (bf16 / f16 / f32 / mixed)."""
    monkeypatch.setattr(staging, "MAX_ASSIGNMENTS", 100)
    model = VariantMoE([Shifting(wdtype=[BF16, BF16, F16, F16, F32, F32, BF16, F16, None, F32][i]) for i in range(10)])
    truth, got, seen, stats, states = _exact(model, store_root, "split", 6)
    assert _strict(truth, got) == []
    assert states == [staging.STAGED] * 10
    assert {lay[0].shape[0] for lay in seen} == {84 + 2}   # 2 calls of 42 assignments, 2 logit sums
    assert {None if lay[8] is None else lay[8].dtype for lay in seen} == {BF16, F16, F32, None}


@pytest.mark.torch_ops_only   # checks the PyTorch ops' own buffers / branches
def test_copies_sums_and_references_sums_in_one_flush(store_root):
    """10 routers, 4 of which return inference tensors in a normal forward (staged as copies
    with their logit sums precomputed), the others references whose sums the flush computes;
    logits float32 / bfloat16 / float16 (sums all float32: ``sbuf``), then float64 in some."""
    routers = [Shifting(wdtype=BF16, ldtype=[None, BF16, F16][i % 3]) for i in range(10)]
    for i in (1, 4, 6, 9):
        routers[i].infer = True
    model = VariantMoE(routers)

    def before(s, h):
        if s == 4:
            routers[2].ldtype = routers[4].ldtype = F64

    truth, got, seen, stats, states = _exact(model, store_root, "mixed-sums", 8, before=before)
    assert _strict(truth, got) == []
    assert stats["faults"] == 0
    sums = {None if lay[9] is None else lay[9].dtype for lay in seen if lay[7] is None}
    assert F32 in sums and None in sums, sums   # float32 sums stacked in their dtype, float64 mixes not


def test_concurrent_forwards_with_different_weights_dtypes(store_root):
    """4 threads, each forward with its own weights dtype (set per thread on a shared model via
    a thread-local): one flush per forward, under the stage's lock; every cell must match."""
    import probes

    local = threading.local()

    class PerThread(Shifting):
        def _route(self, x):
            self.wdtype = getattr(local, "wdtype", F32)
            return super()._route(x)

    model = VariantMoE([PerThread() for _ in range(10)])
    calls = truth_hooks(model)
    ids = torch.randint(1, 40, (3, 7), generator=torch.Generator().manual_seed(1))

    def work(dtype):
        local.wdtype = dtype
        for _ in range(10):
            with torch.no_grad():
                model(ids)

    with probes.attach(model, run="threads", root=store_root, steps="manual", flush_every=50) as h:
        with torch.no_grad():
            model(ids)   # probation forward: routers staged after it
        h.step()
        del calls[:]
        run_threads(work, DTYPES)
        assert h._window.rec.stage.state == [staging.STAGED] * 10
        arrays = h._window.live()   # the open step (row 1), float64
        layers = h._window.layer_ids.tolist()
    counts, weight = arrays.counts[1].sum(axis=0), arrays.weight[1].sum(axis=0)   # [slot, expert]
    got = {(layers[slot], int(e)): (int(counts[slot, e]), float(weight[slot, e])) for slot, e in zip(*counts.nonzero())}
    assert _strict([count(calls)], {0: got}) == []


class Misshapen(Shifting):
    """From the test's switch on, returns weights ``[T, 1]`` beside indices ``[T*k - 1]`` (as
    ``tests/reliability/moe_tiny.py``'s ``wrong_shapes``): ``Recorder.record`` refuses such a
    call (a fault); the model mixes its own top-k of the logits, so training is unaffected."""

    bad = False

    def _route(self, x):
        logits, w, idx = super()._route(x)
        if self.bad:
            return logits, w[:, :1], idx.reshape(-1)[:-1]
        return logits, w, idx


class OwnTopK(VariantMoE):
    def forward(self, input_ids):
        x = self.emb(input_ids).reshape(-1, D)
        for r in self.routers:
            w, idx = torch.topk(r(x)[0].float().softmax(-1), K, dim=-1)
            x = x + (w[..., None] * self.table[idx]).sum(1)
        return x.sum()


@pytest.mark.parametrize("others", ["f32", "bf16_and_f32"])
def test_a_misshapen_staged_call_loses_no_other_call(store_root, others):
    """Router 0 turns misshapen after its probation forward (staged by then), beside 9 healthy
    routers (weights float32, or bfloat16 and float32: the flat path without ``wbuf``). The
    misshapen calls are faults and not counted; every healthy call is counted exactly. Before:
    with ``wbuf`` the flush raised, and the fallback's first failing call stopped the loop (the
    healthy calls after it in the batch were lost: ``tests/reliability/test_model_faults.py``
    ``[wrong_shapes]`` failed since 90220d3); without ``wbuf`` the cat into ``src`` resized a
    view and counted the healthy calls with shifted weights."""
    import probes

    routers = [Misshapen(wdtype=BF16 if others == "bf16_and_f32" and i % 2 else F32) for i in range(10)]
    model = OwnTopK(routers)
    calls = truth_hooks(model)
    truth, got = [], {}
    with probes.attach(model, run=others, root=store_root, steps="manual", flush_every=50) as h:
        for s in range(4):
            routers[0].bad = s >= 1
            del calls[:]
            with torch.no_grad():
                model(IDS)
            truth.append(count([c for c in calls if c[0] != 0 or s == 0]))
            h.step()
        arrays = h._window.live()
        layers = h._window.layer_ids.tolist()
        stats = h.stats()
    counts, weight = arrays.counts.sum(axis=1), arrays.weight.sum(axis=1)
    for s, slot, e in zip(*counts[:4].nonzero()):
        got.setdefault(int(s), {})[layers[slot], int(e)] = (int(counts[s, slot, e]), float(weight[s, slot, e]))
    assert _strict(truth, got) == []
    assert stats["faults"] >= 3   # each misshapen call
