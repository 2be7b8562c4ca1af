"""The open window: the steps ended since the last flush, and closing it into a ``ClosedWindow``.

State: the ``Recorder`` (device buffers, one history row per ended step), the
``TokenSampler`` (optional), the step number of each history row, and the largest
expert count each router had in the window (a lifecycle prune mid-window must not cut
the tokens its pruned experts got earlier).

``close()`` runs in the training thread: one device->host copy of the window
(``Recorder.take``), the multi-rank reduction when there is one (the flush's one
collective), the snapshot stage, and the rows as typed records (``probes.rows``). The
Parquet work is the sink's, on the background thread. Callers hold the handle's lock.
"""
from __future__ import annotations

import numpy as np

from .faults import Faults
from .recorder import Recorder
from .records import ClosedWindow, Signal, TokenRows, WindowArrays
from .rows import invalid_indices, padding_signals, routing_blocks
from .snapshot_stage import SnapshotStage


class Window:
    def __init__(self, routers: list, recorder: Recorder, sampler=None, dist=None):
        self.routers = routers
        self.layer_ids = np.array([s.layer for s in routers], dtype=np.int32)
        self.rec = recorder
        self.sampler = sampler
        self.dist = dist                            # probes.distributed.DistributedSync or None
        self.steps: list[int] = []                  # step number of each history row
        self.widest = [0] * len(routers)            # largest n_experts seen per router this window
        self.tokens_total = {s.layer: 0 for s in routers}
        self.closes = 0                             # windows that had something to write
        self.loads = None                           # probes.loads.RecorderLoads once a cursor exists

    def __len__(self) -> int:
        return len(self.steps)

    def experts(self) -> list[int]:
        """Expert count per router for the window being closed: the largest seen in it."""
        return [max(s.n_experts, w) for s, w in zip(self.routers, self.widest)]

    def end_step(self, step: int) -> None:
        """The open step (number ``step``) becomes the next history row (device copy only)."""
        self.rec.end_step(len(self.steps))
        if self.sampler is not None:
            self.sampler.end_step(step)
        self.steps.append(step)

    def fold_from(self, first_step: int) -> int:
        """Fold the rows of steps ``>= first_step`` back into the open step; returns how many."""
        if first_step not in self.steps:
            return 0
        j = self.steps.index(first_step)
        n = len(self.steps) - j
        self.rec.merge(j, len(self.steps))
        if self.sampler is not None:
            self.sampler.restep(first_step)
        self.steps = self.steps[:j]
        return n

    def live(self) -> WindowArrays:
        """The window so far, the open step included (host copy; ``h.metrics()``)."""
        return self.rec.take(len(self.steps), include_current=True)

    def close(self, stage: SnapshotStage, faults: Faults, reduce: bool = True) -> ClosedWindow | None:
        """Take the window's finished steps off the device into a ``ClosedWindow`` (None: nothing).

        ``reduce=False`` (multi-rank, steps no rank agreed on): this rank's routing rows
        only, no collective and no snapshot.
        """
        n = len(self.steps)
        steps = np.array(self.steps, dtype=np.int64)
        self.steps = []
        if self.loads is not None:
            self.loads.window_closing(n)
        arrays = self.rec.take(n) if n else None
        tok = self.sampler.take() if self.sampler is not None else None
        dist = self.dist
        if dist is not None:
            tok = dist.globalize_tokens(tok)
        experts = self.experts()
        self.widest = [0] * len(self.routers)
        if arrays is None and tok is None:
            return None
        self.closes += 1
        blocks, snap, signals = [], None, []
        if arrays is not None:
            blocks, snap, signals = self._rows(steps, arrays, experts, stage, faults, reduce)
        # expert-parallel ranks keep the global counts declared at attach
        sizes = {} if dist is not None and dist.expert_parallel else \
            dict(zip(self.layer_ids.tolist(), experts))
        return ClosedWindow(sizes=sizes, blocks=tuple(blocks),
                            tokens=None if tok is None else TokenRows(*tok), snapshot=snap,
                            signals=tuple(signals),
                            write_globals=dist is None or dist.is_writer_of_globals)

    def _rows(self, steps, arrays: WindowArrays, experts, stage, faults, reduce):
        dist = self.dist
        invalid = invalid_indices(arrays, experts)   # experts at or beyond n_experts are invalid too
        offsets = dist.expert_offsets if dist is not None and dist.expert_parallel else None
        blocks = routing_blocks(steps, self.layer_ids, experts, arrays, offsets)
        win_counts, win_drop = arrays.window_sums()   # [slot, capacity]
        snap_counts, snap_drop, snap_experts = win_counts, win_drop, experts
        signals = padding_signals(steps, self.layer_ids, arrays.padding)
        faults.counters["padding_excluded"] += int(arrays.padding.sum())
        if dist is not None and reduce:  # the flush's one collective: identical rows on every rank
            snap_counts, snap_drop, snap_experts = dist.reduce_window(
                win_counts, win_drop, experts, len(steps), int(steps[-1]))
        snap = None
        if (dist is None or reduce) and any(
                snap_counts[i, :n].sum() + snap_drop[i, :n].sum() > 0 for i, n in enumerate(snap_experts)):
            lc = {s.layer: snap_counts[i, :snap_experts[i]] for i, s in enumerate(self.routers)}
            ld = {s.layer: snap_drop[i, :snap_experts[i]] for i, s in enumerate(self.routers)}
            snap = stage.observe(int(steps[0]), int(steps[-1]), lc, ld)
        for i, s in enumerate(self.routers):
            self.tokens_total[s.layer] += int(win_counts[i, :experts[i]].sum())
        signals += self._fault_signals(steps, arrays, invalid, experts, faults)
        return blocks, snap, signals

    def _fault_signals(self, steps, arrays, invalid, experts, faults) -> list[Signal]:
        """``probes.nonfinite`` / ``probes.invalid_expert_index`` per layer, each warned once."""
        nf = arrays.nonfinite.sum(axis=(0, 1))
        first, end = int(steps[0]), int(steps[-1])
        out = []
        for i, s in enumerate(self.routers):
            if nf[i]:
                faults.counters["nonfinite"] += int(nf[i])
                out.append(Signal(end, "probes.nonfinite", float(nf[i]), s.layer))
                faults.warn_once(f"nonfinite{s.layer}", "probes: non-finite router outputs on layer %d "
                                 "(%d step/expert cells) in steps %d-%d (signal probes.nonfinite)",
                                 s.layer, int(nf[i]), first, end)
            if invalid[i]:
                faults.counters["invalid"] += int(invalid[i])
                out.append(Signal(end, "probes.invalid_expert_index", float(invalid[i]), s.layer))
                faults.warn_once(f"invalid{s.layer}", "probes: router %s returned %d expert indices "
                                 "outside [0, %d)", s.name, int(invalid[i]), experts[i])
        return out
