"""Third review of staged counting: the hook's hot path (``Stage.push``), expert counts read per
call (``Window.saw``; a fault here: they were read at the flush) and the flush's one-op logit
sums (``Stage._layout`` / ``_count``): lifecycle, logit sums, threads, transforms, output forms;
``test_staging_break3_handles.py``: HF models, handles, copies, writes past version counters.
Helpers and ground truth: ``staging_review.py``.
"""
from __future__ import annotations

import threading

import pytest
import torch

import probes
from probes import staging

from .staging_review import VARIANTS, K, IDS, Router, MoE, Variant, VariantMoE, truth_hooks, count, stored, signals, diff, run, run_threads

# every test runs with both counting backends (tests/probes/conftest.py)
pytestmark = pytest.mark.usefixtures("backend")


# ----------------------------------------------------------------------------- lifecycle


def _lifecycle_model(kind):
    """Router 1 of three has 8 experts. At step 4 (the first step of the window [4, 5] with
    ``flush_every=2``: its expert count starts at 0 there), inside the forward:
    ``shrink``: after router 1 returned (having routed to all 8), a lifecycle prune sets it to 4;
    ``shrink_from_another_thread``: the same prune, made by another thread;
    ``shrink_between_calls``: router 1 is called twice, pruned to 4 between the two calls;
    ``grow_then_shrink``: grown to 40 before its call (routing to experts >= 8, past the
    recorder's capacity 8), back to 8 after it."""
    order = [0, 1, 1, 2] if kind == "shrink_between_calls" else None
    model = MoE([Router(), Router(), Router()], order)
    r = model.routers[1]
    state = {"step": 0}

    def set_n(n):
        r.n_experts = r.width = n

    def after(pos, i):
        if state["step"] != 4:
            return
        if kind == "grow_then_shrink":
            if i == 0:
                set_n(40)
            elif i == 1:
                set_n(8)
        elif kind == "shrink_from_another_thread" and i == 1:   # e.g. a controller thread
            t = threading.Thread(target=set_n, args=(4,))
            t.start()
            t.join()
        elif i == 1 and (kind == "shrink" or pos == 1):
            set_n(4)

    model.after = after

    def before(s, h):
        state["step"] = s
    return model, before


@pytest.mark.parametrize("kind", ["shrink", "shrink_from_another_thread", "shrink_between_calls",
                                  "grow_then_shrink"])
@pytest.mark.parametrize("ctx", [torch.no_grad, torch.enable_grad], ids=["no_grad", "grad"])
def test_lifecycle_change_between_a_staged_call_and_the_flush_keeps_its_counts(store_root, kind, ctx):
    model, before = _lifecycle_model(kind)
    truth, got, stats, states = run(model, store_root, kind, ctx=ctx, before=before)
    assert states == [staging.STAGED] * 3
    assert max(e for (layer, e) in truth[4] if layer == 1) >= (8 if kind == "grow_then_shrink" else 4)
    assert diff(truth, got) == [], (diff(truth, got)[:4], stats["invalid_indices"])
    assert stats["invalid_indices"] == 0 and stats["faults"] == 0


@pytest.mark.parametrize("ctx", [torch.no_grad, torch.enable_grad], ids=["no_grad", "grad"])
def test_growth_between_two_calls_of_a_staged_router_in_one_forward(store_root, ctx):
    """Router 1 called twice per forward; at step 3 it grows 8 -> 40 between its two calls (the
    second routes past the recorder's capacity): both calls' counts are stored."""
    model = MoE([Router(), Router(), Router()], order=[0, 1, 1, 2])
    r = model.routers[1]
    state = {"step": 0}

    def after(pos, i):
        if state["step"] == 3 and pos == 1:
            r.n_experts = r.width = 40

    model.after = after

    def before(s, h):
        state["step"] = s
    truth, got, stats, states = run(model, store_root, "g2", ctx=ctx, before=before)
    assert states == [staging.STAGED] * 3
    assert max(e for (layer, e) in truth[3] if layer == 1) >= 8
    assert diff(truth, got) == [] and stats["faults"] == 0 and stats["invalid_indices"] == 0


# ----------------------------------------------------------------------------- logit sums


class BigLogits(Router):
    """Returns finite logits of magnitude 1e37..~1e38 (representable in float32 and bfloat16;
    168 of them sum to ~3e39, past float32's 3.4e38, not float64's); selection and weights come
    from the unscaled logits, so they stay finite."""

    def forward(self, x):
        logits, w, idx = super().forward(x)
        big = (logits.float().abs() + 1.0) * 1e37
        return big.to(logits.dtype), w, idx


@pytest.mark.xfail(strict=True, reason=(
    "a documented bound, not mended (probes/staging.py): finite logits whose float32 sum overflows "
    "(168 bf16/float32 logits of ~1e37 per call) are flagged non-finite, on every path alike since "
    "review 3 (the one-op sum summed in float64 and disagreed); an exact check costs 2.4-12x the "
    "float32 sum per call on CPU"))
@pytest.mark.parametrize("dtypes", [(torch.bfloat16,) * 3, (None,) * 3, (torch.bfloat16, None, torch.float16)],
                         ids=["bf16", "f32", "mixed"])
def test_finite_logits_whose_float32_sum_overflows_are_not_flagged(store_root, dtypes):
    model = MoE([BigLogits(dtype=d) if d is not torch.float16 else Router(dtype=d) for d in dtypes])
    truth, got, stats, states = run(model, store_root, "big", steps=4)
    calls = truth_hooks(model)
    with torch.no_grad():
        model(IDS)
    assert all(c[3] for c in calls)   # every logit returned was finite
    assert states == [staging.STAGED] * 3
    assert diff(truth, got) == []
    assert (stats["nonfinite"], signals(store_root, "big", "probes.nonfinite")) == (0, [])


# ----------------------------------------------------------------------------- threads


@pytest.mark.parametrize("modes", [("no_grad", "no_grad"), ("no_grad", "grad")])
def test_two_threads_in_lock_step_through_one_model(store_root, modes):
    """Two threads run forwards of one model at once, in lock step (a barrier after every router
    call: each thread's forward end flushes the other's staged calls in mid-forward, and each
    judges its own probation calls). Per step both threads run one forward; every call counted
    once (modes: both ``no_grad``, or one training with backward)."""
    model = MoE([Router(), Router(), Router()], order=[0, 1, 2, 1])
    barrier = threading.Barrier(2, timeout=60)
    model.after = lambda pos, i: barrier.wait()
    calls = truth_hooks(model)
    truth, errors = [], []

    def work(mode):
        try:
            if mode == "grad":
                model(IDS).backward()
            else:
                with torch.no_grad():
                    model(IDS)
        except BaseException as e:   # pragma: no cover - reported below
            errors.append(e)
            barrier.abort()

    with probes.attach(model, run="th", root=store_root, steps="manual", flush_every=2) as h:
        for _ in range(5):
            del calls[:]
            run_threads(work, modes)
            truth.append(count(calls, 3))
            h.step()
        states = list(h._window.rec.stage.state)
    stats = h.stats()
    assert errors == []
    assert states == [staging.STAGED] * 3
    assert diff(truth, stored(store_root, "th")) == [] and stats["faults"] == 0


# ----------------------------------------------------------------------------- transforms


def test_staged_router_then_a_forward_under_torch_func_grad(store_root):
    """Routers staged by plain ``no_grad`` forwards (steps 0-2), then forwards under
    ``torch.func.grad`` over ``functional_call`` (steps 3-4): the hot path stages the
    transform's wrapped tensors (no storage of their own); the flush, after the transform
    has exited, counts them from the unwrapped values."""
    from torch.func import functional_call, grad
    transform = "grad"

    model = MoE([Router(), Router(), Router()])
    params = {k: v.detach() for k, v in model.named_parameters()}

    def call(ids):
        grad(lambda p: functional_call(model, p, (ids,)))(params)

    def plain(ids):
        model(ids)

    step = {"s": 0, "states": None}

    def before(s, h):
        step["s"] = s
        if s == 3:   # staged when the first transformed forward starts
            step["states"] = list(h._window.rec.stage.state)

    def either(ids):
        if step["s"] < 3:
            with torch.no_grad():
                plain(ids)
        else:
            with torch.enable_grad():
                call(ids)

    truth, got, stats, states = run(model, store_root, transform, steps=5, ctx=torch.enable_grad,
                                    before=before, call=either)
    assert step["states"] == [staging.STAGED] * 3
    assert sum(t for key, (t, _) in truth[4].items()) == 3 * 21 * K
    assert diff(truth, got) == [] and stats["faults"] == 0, (diff(truth, got)[:3], stats["faults"])


# ----------------------------------------------------------------------------- output variants


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_staged_routers_output_changes_form_after_probation(store_root, variant):
    """Router 1 of three (called twice per forward) returns its output in another form from its
    fourth call on (the second call of step 1, once it is staged: the two calls of that forward
    then differ in form, which the flush's layout must handle), the others stay as they were."""
    model = VariantMoE([Variant(), Variant(variant, switch_at=3), Variant()], order=[0, 1, 2, 1])
    truth, got, stats, states = run(model, store_root, variant, steps=4)
    assert diff(truth, got) == [], diff(truth, got)[:4]
    assert (stats["faults"], stats["nonfinite"], stats["invalid_indices"]) == (0, 0, 0)
