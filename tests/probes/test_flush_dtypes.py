"""The staged flush with weights and logits of every float dtype: values concatenated (weights)
or stacked (logit sums) in their own dtype, then copied into the float64 source once
(``Stage._layout``'s ``wbuf`` / ``sbuf``), or straight into it when the calls' dtypes differ
or are float64. Counts and weight sums must equal the ground truth either way, and a NaN
logit must be flagged for exactly its router and step. Ground truth: the review harness's
own hooks (``staging_review.truth_hooks``), counted with NumPy.
"""
from __future__ import annotations

import pytest
import torch

import chrono
from probes import staging

from .staging_review import Router, VariantMoE, diff, run

# every test runs with both counting backends (tests/probes/conftest.py)
pytestmark = pytest.mark.usefixtures("backend")

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16


class DtypeRouter(Router):
    """Returns its weights in ``wdtype`` (None: no weights) and its logits in ``dtype``; from
    the step the test sets, its logits are NaN (``poison``)."""

    def __init__(self, wdtype=F32, dtype=None):
        super().__init__(dtype=dtype)
        self.wdtype, self.poison = wdtype, False

    def forward(self, x):
        logits, w, idx = super().forward(x)
        if self.poison:
            logits = logits * float("nan")
        return logits, (None if self.wdtype is None else w.to(self.wdtype)), idx


# name -> (weights dtypes, logits dtypes) of the 10 routers (cycled), and whether the flush
# concatenates the weights in their own dtype (wbuf)
CASES = {
    "f32": ([F32], [None], True),
    "bf16_weights": ([BF16], [None], True),
    "f16_weights_bf16_logits": ([F16], [BF16], True),
    "f64": ([F64], [F64], False),
    "mixed_weights": ([F32, BF16], [None], False),
    "some_without_weights": ([F32, None], [None], False),
    "mixed_logits": ([F32], [None, F64], True),
}


def _model(wdtypes, ldtypes, n=10):
    """10 routers in a model that mixes their outputs in float32 (weights None: ones)."""
    return VariantMoE([DtypeRouter(wdtypes[i % len(wdtypes)], ldtypes[i % len(ldtypes)]) for i in range(n)])


@pytest.mark.parametrize("ctx", [torch.no_grad, torch.enable_grad, torch.inference_mode],
                         ids=["no_grad", "grad", "inference"])
@pytest.mark.parametrize("case", list(CASES))
def test_flush_counts_weights_and_nan_logits_of_every_dtype_exactly(store_root, case, ctx, backend):
    wdtypes, ldtypes, weights_own_dtype = CASES[case]
    model = _model(wdtypes, ldtypes)
    layouts = []

    def before(s, h):
        model.routers[3].poison = s == 4
        layouts.extend(h._window.rec.stage._layouts.values())

    truth, got, stats, states = run(model, store_root, case, steps=6, ctx=ctx, before=before)
    assert diff(truth, got) == []
    if ctx is not torch.inference_mode:   # staged as references after the probation step
        assert states == [staging.STAGED] * 10
    nan = chrono.connect(store_root).execute(
        "select step, layer, value from signals where run_id = ? and name = 'probes.nonfinite' and value > 0",
        [case]).fetchall()
    assert nan == [(5, 3, 1.0)]   # the window of steps 4-5 (flush_every=2), one flagged step
    assert stats["nonfinite"] == 1
    if backend == "native":   # the C module counted every call: the PyTorch flush never ran
        assert layouts == []
        return
    assert layouts, "no flush layout was built: the staged path never ran"
    weights_in_own_dtype = [lay[8] is not None for lay in layouts]
    assert all(w == weights_own_dtype for w in weights_in_own_dtype), weights_in_own_dtype
    # logit sums stacked (layouts without the one-op sum of all logits, lbuf): in their own dtype
    # when they share one other than float64 (sums of bf16 or float32 logits are float32)
    stacked = [lay[9] is not None for lay in layouts if lay[7] is None]
    if ctx is torch.inference_mode:   # copies carry their sums: always stacked
        assert stacked and all(s == (case not in ("f64", "mixed_logits")) for s in stacked), stacked
    else:   # references: 10 calls with logits of one shape and dtype are summed in one op
        assert bool(stacked) == (case == "mixed_logits") and not any(stacked), stacked
