"""On-device routing counters: fixed-shape ``scatter_add_`` into per-layer buffers.

Why ``scatter_add_`` and not ``bincount``: bincount reads min/max on the host
(a CUDA sync per call, even with ``minlength``) and breaks a ``torch.compile``
graph per call; a fixed-shape scatter into a preallocated buffer is sync-free
and compiles into the graph (DESIGN §5).

Layout: ``acc_*[mode, slot, expert]`` accumulate the current step; ``end_step``
copies them into ``hist_*[i]`` (one row per step of the flush window) on the
device; ``take(n)`` copies the first ``n`` history rows to the host once per
window. The extra last expert column (index ``capacity``) collects indices
outside ``[0, n_experts)`` so a broken router can never index out of bounds.
"""
from __future__ import annotations

import torch

MODES = ("TRAIN", "EVAL", "INFER")
TRAIN, EVAL, INFER = 0, 1, 2


def mode_index(module: torch.nn.Module) -> int:
    """TRAIN / EVAL / INFER from inference mode, ``module.training`` and grad mode."""
    if torch.is_inference_mode_enabled():
        return INFER
    if module.training and torch.is_grad_enabled():
        return TRAIN
    return EVAL


class Recorder:
    """Counts, summed weights, drops and non-finite values per (mode, layer slot, expert)."""

    def __init__(self, n_slots: int, capacity: int, history: int, device=None):
        self.n_slots = n_slots
        self.capacity = max(1, int(capacity))
        self.history = max(1, int(history))
        self.device = torch.device(device or "cpu")
        self._alloc()

    def _shape(self, lead=()):
        return (*lead, len(MODES), self.n_slots, self.capacity + 1)

    def _alloc(self) -> None:
        d, H = self.device, self.history
        self.acc_counts = torch.zeros(self._shape(), dtype=torch.int64, device=d)
        self.acc_weight = torch.zeros(self._shape(), dtype=torch.float32, device=d)
        self.acc_dropped = torch.zeros(self._shape(), dtype=torch.int64, device=d)
        self.acc_nonfinite = torch.zeros((len(MODES), self.n_slots), dtype=torch.int64, device=d)
        self.hist_counts = torch.zeros(self._shape((H,)), dtype=torch.int64, device=d)
        self.hist_weight = torch.zeros(self._shape((H,)), dtype=torch.float32, device=d)
        self.hist_dropped = torch.zeros(self._shape((H,)), dtype=torch.int64, device=d)
        self.hist_nonfinite = torch.zeros((H, len(MODES), self.n_slots), dtype=torch.int64, device=d)

    def _buffers(self):
        return ("acc_counts", "acc_weight", "acc_dropped", "acc_nonfinite",
                "hist_counts", "hist_weight", "hist_dropped", "hist_nonfinite")

    def to(self, device) -> None:
        """Follow the model to another device (rare: ``model.to(...)`` after attach)."""
        self.device = torch.device(device)
        for name in self._buffers():
            setattr(self, name, getattr(self, name).to(self.device))

    def grow(self, capacity: int) -> None:
        """Widen the expert dimension (lifecycle added experts); keeps what was counted."""
        old = {n: getattr(self, n) for n in self._buffers()}
        old_cap = self.capacity
        self.capacity = int(capacity)
        self._alloc()
        for n, t in old.items():
            new = getattr(self, n)
            if n.endswith("nonfinite"):
                new.copy_(t)
            else:
                new[..., :old_cap].copy_(t[..., :old_cap])
                new[..., self.capacity].copy_(t[..., old_cap])

    def record(self, mode: int, slot: int, n_experts: int, indices, weights=None, dropped=None,
               logits=None) -> None:
        """Add one router call. Sync-free: no ``.item()``, no host copy, fixed shapes."""
        idx = indices.detach().reshape(-1).long()
        valid = (idx >= 0) & (idx < n_experts)
        idx = torch.where(valid, idx, self.capacity)
        counts = self.acc_counts[mode, slot]
        nonfinite = self.acc_nonfinite[mode, slot]
        if dropped is not None:
            drop = dropped.detach().reshape(-1).to(torch.int64)
            keep = 1 - drop
            counts.scatter_add_(0, idx, keep)
            self.acc_dropped[mode, slot].scatter_add_(0, idx, drop)
        else:
            keep = None
            counts.scatter_add_(0, idx, torch.ones_like(idx))
        if weights is not None:
            w = weights.detach().reshape(-1).float()
            finite = torch.isfinite(w)
            nonfinite.add_((~finite).sum())
            w = torch.where(finite, w, 0.0)
            if keep is not None:
                w = w * keep
            self.acc_weight[mode, slot].scatter_add_(0, idx, w)
        if logits is not None:
            nonfinite.add_((~torch.isfinite(logits.detach())).sum())

    def end_step(self, i: int) -> None:
        """Move the current step's counters into history row ``i`` and reset them (on device)."""
        self.hist_counts[i].copy_(self.acc_counts)
        self.hist_weight[i].copy_(self.acc_weight)
        self.hist_dropped[i].copy_(self.acc_dropped)
        self.hist_nonfinite[i].copy_(self.acc_nonfinite)
        self.acc_counts.zero_()
        self.acc_weight.zero_()
        self.acc_dropped.zero_()
        self.acc_nonfinite.zero_()

    def take(self, n: int, include_current: bool = False) -> dict:
        """Host copies (NumPy) of history rows ``[:n]`` (+ the unfinished step), one copy each.

        ``.to("cpu", copy=True)``: on CPU ``.cpu()`` would alias the buffer we reuse.
        """
        parts = {"counts": self.hist_counts[:n], "weight": self.hist_weight[:n],
                 "dropped": self.hist_dropped[:n], "nonfinite": self.hist_nonfinite[:n]}
        if include_current:
            cur = {"counts": self.acc_counts, "weight": self.acc_weight,
                   "dropped": self.acc_dropped, "nonfinite": self.acc_nonfinite}
            parts = {k: torch.cat([v, cur[k][None]]) for k, v in parts.items()}
        return {k: v.to("cpu", copy=True).numpy() for k, v in parts.items()}
