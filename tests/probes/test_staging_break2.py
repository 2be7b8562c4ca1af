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
import pytest
import torch

import probes

from . import probe_models as T
from .field_truth import stored as stored_by_mode
from .test_field_review import Wrapper
from .test_staging import E, K, L, MoE, Router, counted, stored, truth_hooks
from .test_staging import copies_always  # noqa: F401  (autouse: inference calls staged as copies)

# every test runs with both counting backends (tests/probes/conftest.py)
pytestmark = pytest.mark.usefixtures("backend")

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
    stats = h.stats()   # after detach: every window's counters are in (written in the background)
    return truth, stored(root, run_id), stats


@pytest.mark.parametrize("when", ["before_attach", "after_attach"])
def test_float64_model_under_inference_mode_is_counted(store_root, when):
    """A float64 model (``model.double()``, before attach or after, as numerics tests and
    small research models do) run under ``torch.inference_mode``: every call is staged as a
    private copy, whose logits norm is ``torch.linalg.vector_norm(logits, dtype=torch.float32)``,
    which refuses the narrowing cast from float64 and raises in the router hook. Every call
    is a telemetry fault and nothing is stored for it (steps 0-3, resp. 2-3: 0 tokens of 42
    per layer). (Under ``no_grad`` the same model is exact: ``_foreach_norm`` raises too, but
    inside ``_count_or_eager``, which falls back to ``Recorder.record``.)"""
    model = MoE().double() if when == "before_attach" else MoE()

    def between(s, h):
        if s == 2 and when == "after_attach":
            model.double()

    truth, got, stats = run(model, store_root, "f64", ctx=torch.inference_mode, between=between)
    assert exact(truth, got) == [] and stats["faults"] == 0, (exact(truth, got), stats["faults"])


def test_model_forward_decorated_with_inference_mode_is_counted(store_root):
    """``forward`` decorated with ``@torch.inference_mode()`` (serving / reward-model classes
    do this), called under ``no_grad``. The root pre-hook runs before the decorator enters
    inference mode, so the forward's mode is EVAL and the stage takes references; the router
    outputs are inference tensors. Probation (``_version`` -> -1: nothing to compare) passes,
    the routers are staged, and from the second forward on ``Stage.add`` reads
    ``routed.indices._version`` of an inference tensor, which raises: every call after the
    first forward is a fault and is lost (steps 1-3: 0 tokens of 42 per layer, 9 faults)."""
    model = MoE()
    model.forward = types.MethodType(torch.inference_mode()(MoE.forward), model)
    truth, got, stats = run(model, store_root, "fd")
    assert exact(truth, got) == [] and stats["faults"] == 0, (exact(truth, got), stats["faults"])


class SharedBufferRouter(Router):
    """Writes its top-k into output buffers shared by all routers of the model, as a fused
    top-k kernel writing preallocated outputs does; the write does not go through
    autograd's version counter (emulated with ``.data``: a raw kernel, NumPy or DLPack
    write is the same)."""

    def forward(self, x):
        logits = self.proj(x)
        top = torch.topk(logits.softmax(-1), K, dim=-1)
        buf = self.bufs
        if buf.get("w") is None or buf["w"].shape != top.values.shape:
            buf["w"], buf["i"] = torch.empty_like(top.values), torch.empty_like(top.indices)
        buf["w"].data.copy_(top.values)
        buf["i"].data.copy_(top.indices)
        return logits, buf["w"], buf["i"]


def test_router_outputs_in_a_buffer_shared_by_layers(store_root):
    """Every router returns the same two buffer tensors, rewritten by each layer's call
    without a version bump. The truth hook (and the eager path) read each layer's values as
    it returns; the staged references all read the last layer's values at the flush: from
    step 1 every layer stores layer 2's top-k (weight sum 40.79 instead of 38.27 per step),
    silently (0 faults). Same-storage outputs of two staged calls could be caught at the
    flush (``untyped_storage().data_ptr()``), which version counters cannot."""
    model = MoE()
    bufs: dict = {}
    for r in model.routers:
        r.__class__, r.bufs = SharedBufferRouter, bufs
    truth, got, stats = run(model, store_root, "sb")
    assert exact(truth, got) == [], (exact(truth, got), stats["faults"])


@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference"])
def test_large_finite_logits_are_not_flagged_nonfinite(store_root, ctx):
    """Finite float32 logits of magnitude ~1e20 (a diverging router without a z-loss;
    softmax, top-k and weights stay finite). The eager path's logit sum (~1e21) is finite;
    the staged path's float32 L2 norm squares them (1e40 > 3.4e38) and flags every staged
    (step, layer) non-finite: ``h.stats()["nonfinite"]`` is 9 (no_grad: steps 1-3 x 3
    layers) / 12 (inference: steps 0-3) instead of 0, with ``probes.nonfinite`` signals. (``ord=inf``, max |logit|, is non-finite exactly when a logit is.)"""
    model = MoE()
    with torch.no_grad():
        for r in model.routers:
            r.proj.weight.mul_(1e20)
            r.proj.bias.mul_(1e20)
    finite = []
    for r in model.routers:
        r.register_forward_hook(lambda mod, a, out: finite.append(
            bool(torch.isfinite(out[0]).all() and torch.isfinite(out[1]).all())))
    truth, got, stats = run(model, store_root, "big", ctx=ctx)
    assert finite and all(finite)
    assert exact(truth, got) == []
    assert stats["nonfinite"] == 0


def test_encoder_decoder_called_through_a_wrapper_is_one_step_per_forward(store_root):
    """PEFT-style wrapper (``model.forward`` called directly: the model's hooks are bypassed)
    around an encoder-decoder MoE (Switch Transformers), ``steps="forward"``. The encoder
    stack acts as the top level and ends; the decoder stack then starts a *second* top-level
    forward, which ends the step: 3 forwards are stored as 6 steps (encoder routers in even
    steps, decoder routers in odd ones). Called without the wrapper: 3 steps, both stacks."""
    model = T.switch_transformers().eval()
    with probes.attach(model, run="direct", root=store_root, steps="forward"):
        with torch.no_grad():
            for i in range(3):
                model(**T.batch(model, seed=i))
    with probes.attach(model, run="wrapped", root=store_root, steps="forward"):
        with torch.no_grad():
            for i in range(3):
                Wrapper(model)(**T.batch(model, seed=i))
    direct, wrapped = stored_by_mode(store_root, "direct"), stored_by_mode(store_root, "wrapped")
    assert sorted({k[0] for k in direct}) == [0, 1, 2]
    assert sorted({k[0] for k in wrapped}) == [0, 1, 2], sorted({k[0] for k in wrapped})
    for k, v in direct.items():
        np.testing.assert_array_equal(wrapped[k], v, err_msg=str(k))


def test_forward_under_torch_func_grad_is_counted(store_root):
    """``torch.func.grad`` over ``functional_call(model, params, ...)`` (meta-learning,
    influence functions). Inside the transform the router outputs are GradTrackingTensors and
    the recorder's buffers are captured tensors, which functorch forbids to mutate: the eager
    path's ``index_add_`` raises (a fault per call), then the staged flush's ``torch.cat(...,
    out=)`` / ``copy_`` raises too. Nothing is stored (0 of 42 tokens per layer, every step).
    Not caused by staging (the eager path loses the same calls); counting under
    ``torch._C._DisableFuncTorch()`` with unwrapped tensors would not lose them."""
    from torch.func import functional_call, grad

    model = MoE()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def call(ids):
        grad(lambda p: functional_call(model, p, (ids,)))(params)

    truth, got, stats = run(model, store_root, "fg", ctx=torch.enable_grad, call=call)
    assert exact(truth, got) == [] and stats["faults"] == 0, (exact(truth, got), stats["faults"])
