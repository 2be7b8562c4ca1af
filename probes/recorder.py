"""On-device routing counters: fixed-shape ``index_add_`` into one per-step buffer.

Two ways in. ``add`` *stages* a call (``probes.staging``: a reference, no device op; all
staged calls are counted in one batch, ~6 ops and a logit sum per call, when the top-level
forward ends, ``flush``) or, under ``torch.compile``, for calls with a padding mask or
capacity drops and while a router is on probation, counts it at once (``record``). Per call without mask
or drops, under ``no_grad``: the column index (3 ops), the weights into row 1 of a float64
scratch source whose row 0 is ones (1 op), one ``index_add_`` of that ``[2, assignments]``
source into tokens + weight sum (the two kinds are adjacent), and the logit sum (2 ops): 7
device ops. Every buffer view a call writes is built once per allocation (``_views``,
scratch views per indices shape), not indexed per call. Everything that reads ``acc``
flushes the staged calls first.

On CPU, with ``probes.native`` built (``self.native``), ``record`` is one C call that adds into
the same cells (``count_native``), and so is a staged flush.

Why ``scatter_add_`` and not ``bincount``: bincount reads min/max on the host
(a CUDA sync per call, even with ``minlength``) and breaks a ``torch.compile``
graph per call; a fixed-shape scatter into a preallocated buffer is sync-free
and compiles into the graph (DESIGN §5).

One float64 buffer ``acc[kind, mode, slot, column]`` holds the current step
(kinds: tokens, weight sum, dropped, and per-slot scalars: the logit sum and
the padding assignments excluded; float64 counts are exact up to 2**53). Columns: 0 collects negative indices, ``1 + e`` is expert ``e``,
``capacity + 1`` collects indices >= capacity, so a broken router can never
index out of bounds and is reported instead. ``end_step`` copies ``acc`` into
``hist[i]`` and adds it to ``win`` (the window's running sum) on the device (3 ops per
step, O(layers x experts)). Closing a window is O(1) in its length: ``swap(n)`` hands
the filled history buffer to the caller (the background writer reads it) and switches
to a second one (double buffering; the caller must be done with a buffer before the
next-but-one ``swap``), and copies only ``win`` to the host. Non-finite router outputs
are detected from the per-step sums (NaN / Inf propagate): weight sums and logit sums
(``ops.logit_sum``, float32 at least; eager path: the logit cell of the SCALARS kind,
staged path: the weight cell of column 0, which no weight sum uses).
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

from chrono.schema import MODES   # the one owner of the mode names; indices below follow it

from . import native
from .ops import grad_off, logit_sum
from .records import WindowArrays
from .routing import Routed
from .staging import Stage

TRAIN, EVAL, INFER = (MODES.index(m) for m in ("TRAIN", "EVAL", "INFER"))
TOKENS, WEIGHT, DROPPED, SCALARS = 0, 1, 2, 3
N_KINDS = 4
LOGIT_SUM, PADDING = 0, 1   # columns of the per-slot SCALARS kind


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (else buffer, else CPU) that is not on ``meta``:
    where the buffers start. A model offloaded by accelerate (``cpu_offload``, ``device_map``
    with CPU or disk offload) keeps its offloaded weights on ``meta`` between forwards; counting
    there would fail (the recorder follows the routers' outputs to their device anyway)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        if not t.is_meta:
            return t.device
    return torch.device("cpu")


def mode_index(module: torch.nn.Module) -> int:
    """TRAIN / EVAL / INFER from inference mode, ``module.training`` and grad mode."""
    if torch.is_inference_mode_enabled():
        return INFER
    if module.training and torch.is_grad_enabled():
        return TRAIN
    return EVAL


class Recorder:
    """Per-(mode, layer slot, expert) tokens, weight sums and drops of each step of a window."""

    def __init__(self, n_slots: int, capacity: int, history: int, device=None, faults=None):
        self.n_slots = n_slots
        self.capacity = max(1, int(capacity))
        self.history = max(1, int(history))
        self.device = torch.device(device or "cpu")
        self._src = None   # [2, assignments] float64 scratch of record(): row 0 ones, unless _src_dirty
        self._src_views: dict = {}
        self._src_dirty = False
        self.stage = Stage(self, faults)   # calls counted in one batch at the forward's end
        self._alloc()

    def _alloc(self) -> None:
        with torch.inference_mode(False):   # grow() may run in a hook under inference mode
            self.acc, self.win, self.hist, self._spare = self._buffers(self.capacity)
            self._bind_views()

    def _buffers(self, capacity: int) -> tuple:
        """New zero ``acc``, ``win``, ``hist``, spare history buffers for ``capacity`` experts."""
        shape = (N_KINDS, len(MODES), self.n_slots, capacity + 2)
        acc = torch.zeros(shape, dtype=torch.float64, device=self.device)
        win = torch.zeros(shape, dtype=torch.float64, device=self.device)
        # both history buffers are allocated (and their pages touched) here, not in a step
        hist = torch.zeros((self.history, *shape), dtype=torch.float64, device=self.device)
        return acc, win, hist, torch.zeros_like(hist)

    def _bind_views(self) -> None:
        """Per (mode, slot): tokens + weight ``[2, C]``, dropped ``[C]``, logit-sum and padding
        cells (0-d): views of ``acc`` a call writes, built once per allocation of ``acc``."""
        acc = self.acc
        self._views = [[(acc[TOKENS:WEIGHT + 1, m, s], acc[DROPPED, m, s], acc[SCALARS, m, s, LOGIT_SUM],
                         acc[SCALARS, m, s, PADDING]) for s in range(self.n_slots)] for m in range(len(MODES))]
        self.tw_cells = acc[TOKENS:WEIGHT + 1].view(2, -1)   # what a staged flush adds to
        # native counting (CPU): the C function, the tokens / weight rows' pointer and size, and
        # per (mode, slot) its first cell and its dropped row, logit-sum and padding cells
        self.native = native.load() if self.device.type == "cpu" else None
        if self.native is not None:
            width = self.capacity + 2
            self._native_at = (self.tw_cells.data_ptr(), self.tw_cells.shape[1], self.capacity)
            self._native_cells = [[((m * self.n_slots + s) * width,
                                     (acc[DROPPED, m, s].data_ptr(), acc[SCALARS, m, s, LOGIT_SUM].data_ptr(),
                                      acc[SCALARS, m, s, PADDING].data_ptr()))
                                    for s in range(self.n_slots)] for m in range(len(MODES))]
        self.stage.reset()

    def to(self, device) -> None:
        """Follow the model to another device (rare: ``model.to(...)`` after attach)."""
        self.stage.flush()   # staged calls live on the old device
        self.device = torch.device(device)
        with torch.inference_mode(False):   # called from a hook, maybe under inference mode
            self.acc, self.win, self.hist, self._spare = (
                t.to(self.device) for t in (self.acc, self.win, self.hist, self._spare))
            self._src, self._src_views = None, {}
            self._bind_views()

    def grow(self, capacity: int) -> None:
        """Widen the expert dimension (lifecycle added experts); keeps what was counted. The
        spare history buffer is not copied (a job may still read the old one: it keeps it)."""
        self.stage.flush()
        old, old_cap, cap = (self.acc, self.win, self.hist), self.capacity, int(capacity)
        with torch.inference_mode(False):
            bufs = self._buffers(cap)   # (an allocation failure leaves the recorder as it was)
            for new, prev in zip(bufs, old):
                new[..., : old_cap + 1].copy_(prev[..., : old_cap + 1])
                new[..., cap + 1].copy_(prev[..., old_cap + 1])
            self.capacity = cap
            self.acc, self.win, self.hist, self._spare = bufs
            self._bind_views()

    @property
    def nbytes(self) -> int:
        """Bytes of the device buffers (``acc``, ``win``, both history buffers)."""
        return sum(t.nbytes for t in (self.acc, self.win, self.hist, self._spare))

    def _scratch(self, shape: torch.Size, n: int) -> tuple:
        """Views of the float64 scratch source for a call whose indices have ``shape`` (``n``
        assignments): ``(src [2, n], ones [n], weights [n], weights as shape)``; row 0 is all ones
        unless a padding mask or drops wrote it (``_src_dirty``). Cached per shape."""
        v = self._src_views.get(shape)
        if v is None:
            with torch.inference_mode(False):   # written in place later, outside inference mode too
                src = self._src
                if src is None or src.shape[1] < n:
                    src = self._src = torch.ones((2, max(n, 1024)), dtype=torch.float64, device=self.device)
                    self._src_views, self._src_dirty = {}, False
                v = self._src_views[shape] = (src[:, :n], src[0, :n], src[1, :n], src[1, :n].view(shape))
        if self._src_dirty:
            self._src[0].fill_(1.0)
            self._src_dirty = False
        return v

    def add(self, mode: int, slot: int, routed: Routed, mask=None, pad=None, in_forward: bool = True,
            sample=None) -> bool:
        """Count one router call: staged (``probes.staging``: counted at ``flush``) when it is
        part of a top-level forward (``in_forward``) and has no padding mask and no capacity
        drops, else at once (``record_plain``). Sync-free. ``sample``: ``(layer, ctx)`` to sample
        the call's tokens at the flush if it is staged (``Stage.sampler``). True when staged."""
        if mask is None and routed.dropped is None and self.stage.add(mode, slot, routed, in_forward, sample):
            return True
        self.record_plain(mode, slot, routed, mask, pad)
        return False

    def flush(self, forward_ended: int | None = None) -> None:
        """Count the staged calls (before anything reads ``acc``); ``forward_ended``: the ident
        of the thread whose top-level forward just ended (its probation calls are judged)."""
        self.stage.flush(forward_ended)

    def record_plain(self, mode: int, slot: int, routed: Routed, mask=None, pad=None) -> None:
        """``record``, on the call's device (the recorder follows the model there). Inside a
        ``torch.func`` transform (``grad``, ``vmap`` over ``functional_call``) the outputs are
        wrapped tensors that may not be written into the recorder's (captured) buffers: the
        call is then counted from the unwrapped values with the transforms switched off."""
        if routed.indices.device != self.device:
            self.to(routed.indices.device)
        try:
            self.record(mode, slot, routed, mask, pad)
        except RuntimeError:
            plain = [_unwrap(t) for t in (*routed, mask, pad)]
            if all(p is t for p, t in zip(plain, (*routed, mask, pad))):
                raise   # not a transform's tensors: a real fault
            with torch._C._DisableFuncTorch():
                self.record(mode, slot, Routed(*plain[:4]), plain[4], plain[5])

    def record(self, mode: int, slot: int, routed: Routed, mask=None, pad=None) -> None:
        """Add one router call at once. Sync-free: no ``.item()``, no host copy, fixed shapes.

        ``routed``: the call's ``probes.routing.Routed`` (``indices [T, k]`` long, optional
        ``weights [T, k]``, ``dropped [T, k]`` bool, ``logits [T, E]``); ``mask`` (optional)
        ``[T]`` float64, 0 for padding tokens, which are then not counted; ``pad`` the 0-d
        number of those tokens (``T - mask.sum()``). Runs under ``no_grad`` (nothing joins the
        autograd graph, no ``.detach()`` per tensor). Without mask or drops: 7 device ops.
        """
        if self.native is not None and not torch.compiler.is_compiling() and \
                self.count_native(mode, slot, routed, mask, pad):
            return
        indices, weights, dropped, logits = routed
        tw, drop_row, logit_cell, pad_cell = self._views[mode][slot]
        with grad_off():
            # clamped before the + 1 (the dtype's largest index must not wrap to column 0), in
            # int64 (a clamp bound may not fit a narrower dtype)
            col = indices.clamp(-1, self.capacity) if indices.dtype == torch.int64 else \
                indices.long().clamp_(-1, self.capacity)
            col = col.add_(1).reshape(-1)
            n = col.shape[0]
            src, ones, w_row, w_shaped = self._scratch(indices.shape, n)
            keep = None   # per assignment: 1 if it counts (None: all count)
            if mask is not None:
                k = n // max(1, mask.shape[0])
                keep = mask if k == 1 else mask.unsqueeze(1).expand(-1, k).reshape(-1)
                pad_cell.add_(pad * k)
            if dropped is not None:
                drop = dropped.reshape(-1).to(torch.float64)
                if keep is not None:
                    drop = drop * keep
                drop_row.index_add_(0, col, drop)
                keep = (1.0 if keep is None else keep) - drop
            if keep is not None:
                ones.copy_(keep)
                self._src_dirty = True
            if weights is None:
                tw[0].index_add_(0, col, ones)
            else:
                if keep is not None:
                    torch.mul(weights.reshape(-1), ones, out=w_row)
                elif weights.shape == w_shaped.shape:
                    w_shaped.copy_(weights)
                else:
                    w_row.copy_(weights.reshape(-1))
                tw.index_add_(1, col, src)
            if logits is not None:  # a non-finite logit makes the sum non-finite: flagged at take()
                logit_cell.add_(logit_sum(logits))

    def count_native(self, mode: int, slot: int, routed: Routed, mask=None, pad=None) -> bool:
        """``record`` in one C call (``probes.native``; the recorder is on the CPU and the
        library loaded: ``self.native``). False, with nothing counted, when a tensor is not
        eligible (``native.describe``): then ``record``'s PyTorch ops count it."""
        col0, cells = self._native_cells[mode][slot]
        hold = []   # describe's contiguous copies, alive until the C call
        return native.count(self.native, *self._native_at, [native.describe(col0, routed, None, mask, pad, cells, hold)])

    def end_step(self, i: int) -> None:
        """Move the current step into history row ``i`` and the window sum, reset it (on the device)."""
        self.stage.flush()
        self.hist[i].copy_(self.acc)
        self.win.add_(self.acc)
        self.acc.zero_()

    def merge(self, first: int, n: int) -> None:
        """Fold history rows ``[first, n)`` into the current step (on the device)."""
        self.stage.flush()
        if n > first:
            back = self.hist[first:n].sum(0)
            self.acc.add_(back)
            self.win.sub_(back)

    def swap(self, n: int) -> tuple[torch.Tensor, np.ndarray]:
        """Close the window of history rows ``[:n]``: O(1) in ``n``.

        Returns ``(rows, sums)``: ``rows`` the device tensor ``[n, kind, mode, slot,
        capacity + 2]`` (a view of the filled history buffer, which the recorder stops
        writing: the caller must be done with it before the next ``swap``, when this
        buffer is written again), ``sums`` the host copy of the window sum ``[kind, mode,
        slot, capacity + 2]`` float64 (one small device->host copy). ``win`` restarts at 0.
        """
        rows = self.hist[:n]
        self.hist, self._spare = self._spare, self.hist
        sums = self.win.to("cpu", copy=True).numpy()
        self.win.zero_()
        return rows, sums

    def take(self, n: int, include_current: bool = False) -> WindowArrays:
        """Host arrays for history rows ``[:n]`` (+ the unfinished step): one device->host copy.

        ``.to("cpu", copy=True)``: on CPU ``.cpu()`` would alias the buffer we reuse.
        Returns a ``probes.records.WindowArrays`` (shapes and dtypes documented there).
        """
        x = self.hist[:n]
        if include_current:
            self.stage.flush()
            x = torch.cat([x, self.acc[None]])
        return window_arrays(x.to("cpu", copy=True).numpy(), self.capacity)


def _unwrap(t):
    """``t`` without its ``torch.func`` wrappers (``t`` itself when it has none)."""
    if t is None or not torch.is_tensor(t):
        return t
    is_wrapped, get = torch._C._functorch.is_functorch_wrapped_tensor, torch._C._functorch.get_unwrapped
    while is_wrapped(t):
        t = get(t)
    return t


def window_arrays(x: np.ndarray, cap: int) -> WindowArrays:
    """``WindowArrays`` of host history rows ``x`` ``[n, kind, mode, slot, cap + 2]`` float64."""
    weight = x[:, WEIGHT, ..., 1: cap + 1]
    # logit sums: eager path (SCALARS, LOGIT_SUM) and staged path (the weight cell of column 0)
    nonfinite = ((~np.isfinite(weight)).sum(axis=-1) + (~np.isfinite(x[:, SCALARS, ..., LOGIT_SUM]))
                 + (~np.isfinite(x[:, WEIGHT, ..., 0])))
    return WindowArrays(
        counts=np.rint(x[:, TOKENS, ..., 1: cap + 1]).astype(np.int64),
        dropped=np.rint(x[:, DROPPED, ..., 1: cap + 1]).astype(np.int64),
        weight=weight,
        invalid=np.rint(x[:, TOKENS, ..., 0] + x[:, TOKENS, ..., cap + 1]
                        + x[:, DROPPED, ..., 0] + x[:, DROPPED, ..., cap + 1]).astype(np.int64),
        nonfinite=nonfinite.astype(np.int64),
        padding=np.rint(x[:, SCALARS, ..., PADDING]).astype(np.int64),
    )
