"""Two small pieces of every count's device work, shared by the eager path
(``probes.recorder.Recorder.record``) and the staged one (``probes.staging.Stage.flush``):
switching grad mode off around it, cheaply, and the logit sum that flags non-finite logits.
"""
from __future__ import annotations

import contextlib

import torch


class _GradOff:
    """Grad mode off for a block (it was on): one C call each way."""
    __slots__ = ()

    def __enter__(self):
        torch._C._set_grad_enabled(False)

    def __exit__(self, *exc):
        torch._C._set_grad_enabled(True)
        return False


_NULL, _GRAD_OFF = contextlib.nullcontext(), _GradOff()


def grad_off():
    """A context with grad mode off for counting: a no-op under ``inference_mode`` or ``no_grad``
    (nothing to switch off), else one C call each way; ``torch.no_grad()`` when compiling.
    Entering ``torch.no_grad()`` costs ~20 us of CPU per call right after the model's own work
    (measured, small Mixtral on CPU: caches cold)."""
    if not torch.is_grad_enabled():
        return _NULL
    return torch.no_grad() if torch.compiler.is_compiling() else _GRAD_OFF


def grad_off_eager():
    """``grad_off`` for code that never runs under ``torch.compile`` (the staged flush: it runs
    from the model's forward hook, which dynamo skips, or from the handle's methods)."""
    return _GRAD_OFF if torch.is_grad_enabled() else _NULL


def sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype logits of ``dtype`` are summed in: float32 / float64 as they are, float16 /
    bfloat16 in float32 (their own sum of finite logits overflows past 65504)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def logit_sum(logits: torch.Tensor) -> torch.Tensor:
    """0-d sum of ``logits`` in ``sum_dtype``, non-finite when a logit is (a float32 sum
    overflows only past 3.4e38)."""
    dtype = sum_dtype(logits.dtype)
    return logits.sum() if dtype == logits.dtype else logits.sum(dtype=dtype)
