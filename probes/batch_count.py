"""The device ops of one staged flush batch, on buffers cached per batch layout.

``probes.staging.Stage.flush`` hands over a batch of staged router calls; ``Layouts.count``
concatenates their indices (clamped to ``[-1, capacity]`` plus each call's column base), their
weights and logit sums into one float64 source, and adds it to the recorder's tokens and
weight-sum cells with one ``index_add_``. The buffers and views for a batch of given calls
(mode, router, shapes, dtypes) are built once and kept for the last ``_LAYOUTS`` layouts.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from .ops import logit_sum, sum_dtype

_LAYOUTS = 8                # forward layouts whose column bases and sources are kept
_LCAT = 1 << 20             # logits (elements) of one flush concatenated for one sum per call
# ... from this many calls with logits: fewer calls save fewer ops than the copy costs (CPU,
# interleaved: 61 calls of 8 x 256 logits 12 % less in-hook time, 4 calls of 1024 x 8 ~3 % more)
_LCAT_MIN_CALLS = 8


def _on(device: torch.device, values: list[int]) -> torch.Tensor:
    """A small long tensor on ``device`` without a host sync (pinned, non-blocking on CUDA)."""
    t = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class Layouts(OrderedDict):
    """The flush buffers of one recorder (``rec``: its ``capacity``, ``n_slots``, ``device``,
    ``tw_cells``), per batch layout key, least recently used first."""

    def __init__(self, rec):
        super().__init__()
        self.rec = rec

    def layout(self, batch: list, n: int) -> tuple:
        """Buffers and views of one layout (``j`` of its calls have logits or a logit sum), cached:

        ``raw [n + j]`` int64: a flush writes the indices into ``raw[:n]``; ``raw[n:]`` stays
        -1 (the raw index of a logit sum: column 0). ``base [n + j]`` int64: the column base
        of each entry. ``col [n + j]`` int64: the columns a flush computes. ``src [2, n + j]``
        float64: row 0 is 1 per assignment and 0 per logit sum; a flush writes row 1 (weights,
        then logit sums). ``ix`` / ``wx``: ``raw[:n]`` / ``src[1, :n]`` as the ``[T, k]`` of
        the calls when they all have that shape (one ``cat`` along tokens, no reshapes), else
        None. ``lbuf``: when at least ``_LCAT_MIN_CALLS`` logit sums are computed here from
        logits of one shape and dtype (at most ``_LCAT`` elements in all), a buffer for the
        calls' logits concatenated and one for their sums (float32 at least, as ``logit_sum``);
        else None (one ``logit_sum`` per call). ``wbuf`` / ``sbuf``: when every call's weights
        (logit sums) have one dtype other than float64, a buffer of that dtype, shaped as the
        weights' (sums') place in ``src``, that they are concatenated (stacked) into before one
        ``copy_`` to ``src``; else None (straight into ``src``). A ``cat`` or ``stack`` whose
        ``out`` has another dtype than its inputs measured 3-5x slower than one that has it
        plus the ``copy_`` (CPU, 32 calls: 47 against 9.5 us for [8, 2] weights, 86 against
        18 us for 0-d sums).
        """
        key = tuple((mode, slot, routed.indices.shape,
                     None if routed.weights is None else (routed.weights.shape, routed.weights.dtype),
                     None if routed.logits is None else (routed.logits.shape, routed.logits.dtype),
                     None if norm is None else norm.dtype)
                    for mode, slot, routed, norm in batch)
        hit = self.get(key)
        if hit is not None:
            self.move_to_end(key)
            return hit
        rec = self.rec
        width = rec.capacity + 2
        bases = [(mode * rec.n_slots + slot) * width + 1 for mode, slot, _, _, _, _ in key]
        sizes = [ishape.numel() for _, _, ishape, _, _, _ in key]
        has = [lg is not None or norm is not None for _, _, _, _, lg, norm in key]
        norm_bases = [b for b, h in zip(bases, has) if h]
        j = len(norm_bases)
        k = key[0][2][-1] if key[0][2] else 0
        flat = not all(len(ish) == 2 and ish[1] == k and w is not None and w[0] == ish for _, _, ish, w, _, _ in key)
        shapes = {lg for _, _, _, _, lg, _ in key if lg is not None}   # (shape, dtype) of the logits
        one = next(iter(shapes)) if len(shapes) == 1 else None
        lcat = (j >= _LCAT_MIN_CALLS and one is not None and len(one[0]) >= 1 and j * one[0].numel() <= _LCAT
                and all(norm is None for *_, norm in key))
        wdt = {None if w is None else w[1] for _, _, _, w, _, _ in key}
        wdt = next(iter(wdt)) if len(wdt) == 1 and None not in wdt and torch.float64 not in wdt else None
        sdt = {sum_dtype(lg[1]) if norm is None else norm for _, _, _, _, lg, norm in key if lg is not None or norm is not None}
        sdt = next(iter(sdt)) if len(sdt) == 1 and torch.float64 not in sdt and not lcat else None
        with torch.inference_mode(False):   # written in place by later flushes in any mode
            base = torch.repeat_interleave(_on(rec.device, bases + norm_bases),
                                           _on(rec.device, sizes + [1] * j), output_size=n + j)
            raw = torch.full((n + j,), -1, dtype=torch.int64, device=rec.device)
            src = torch.ones((2, n + j), dtype=torch.float64, device=rec.device)
            src[0, n:] = 0
            ix, wx = (None, None) if flat else (raw[:n].view(-1, k), src[1, :n].view(-1, k))
            lbuf = None
            if lcat:
                shape, dtype = one[0], sum_dtype(one[1])
                lbuf = (torch.empty((j * shape[0], *shape[1:]), dtype=dtype, device=rec.device),
                        torch.empty(j, dtype=dtype, device=rec.device))
            wbuf = None if wdt is None else torch.empty(n, dtype=wdt, device=rec.device)
            if wbuf is not None and not flat:
                wbuf = wbuf.view(-1, k)
            sbuf = None if sdt is None else torch.empty(j, dtype=sdt, device=rec.device)
            hit = self[key] = (raw, base, torch.empty_like(raw), src, ix, wx, src[1, n:], lbuf, wbuf, sbuf)
        if len(self) > _LAYOUTS:
            self.popitem(last=False)
        return hit

    def count(self, batch: list, n: int) -> None:
        """Count ``batch`` (``(mode, slot, Routed, logit sum or None)`` per call, ``n``
        assignments in all) into ``rec.tw_cells``: the ops of ``probes.staging``'s flush."""
        rec = self.rec
        raw, base, col, src, ix, wx, sums, lbuf, wbuf, sbuf = self.layout(batch, n)
        calls = [routed for _, _, routed, _ in batch]
        if ix is not None:   # [T, k] tensors concatenate along tokens straight into the buffers
            torch.cat([r.indices for r in calls], out=ix)
            if wbuf is None:
                torch.cat([r.weights for r in calls], out=wx)
            else:
                wx.copy_(torch.cat([r.weights for r in calls], out=wbuf))
        else:
            torch.cat([r.indices.reshape(-1) for r in calls], out=raw[:n])
            if wbuf is None:
                torch.cat([r.weights.reshape(-1) if r.weights is not None
                           else r.indices.new_zeros(r.indices.numel(), dtype=torch.float64)
                           for r in calls], out=src[1, :n])
            else:
                src[1, :n].copy_(torch.cat([r.weights.reshape(-1) for r in calls], out=wbuf))
        if lbuf is not None:   # each logit sum goes to the weight cell of column 0 of its router
            logits, per_call = lbuf   # summed in the logits' dtype, float32 at least, as logit_sum
            torch.cat([r.logits for r in calls if r.logits is not None], out=logits)
            sums.copy_(torch.sum(logits.view(per_call.shape[0], -1), 1, out=per_call))
        elif sums.shape[0]:
            values = [norm if norm is not None else logit_sum(r.logits)
                      for _, _, r, norm in batch if norm is not None or r.logits is not None]
            if sbuf is None:
                torch.stack(values, out=sums)
            else:
                sums.copy_(torch.stack(values, out=sbuf))
        raw[:n].clamp_(-1, rec.capacity)
        torch.add(raw, base, out=col)
        rec.tw_cells.index_add_(1, col, src)
