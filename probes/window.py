"""The open window: the steps ended since the last flush, and closing it.

State: the ``Recorder`` (device buffers, one history row per ended step), the
``TokenSampler`` (optional), the step number of each history row, and the largest
expert count each router had in the window (a lifecycle prune mid-window must not cut
the tokens its pruned experts got earlier).

Closing is split in two halves (issue 19):

* ``Window.close()`` runs in the training thread and is O(1) in the window's length:
  the recorder swaps its history buffer (``Recorder.swap``: the only device->host copy is
  the window sum, ``layers x experts``), the window sums give the counters, the
  multi-rank reduction (the flush's one collective) and, when ``on_snapshot`` callbacks
  are registered (governance decides before the next step), the snapshot rows and alerts.
  It returns a ``WindowJob``. Callers hold the handle's lock.
* ``finish(job)`` runs on the background writer thread: the history rows to the host,
  routing blocks, signals, token rows, and the snapshot when it was not needed at once;
  it returns the ``ClosedWindow`` the sink writes.
"""
from __future__ import annotations

import numpy as np

from .faults import Faults
from .recorder import Recorder, window_arrays
from .records import ClosedWindow, Signal, TokenRows, WindowArrays, WindowJob
from .rows import invalid_indices, padding_signals, routing_blocks
from .sampling import token_rows
from .snapshot_stage import SnapshotStage


class Window:
    def __init__(self, routers: list, recorder: Recorder, sampler=None, dist=None):
        self.routers = routers
        self.layer_ids = np.array([s.layer for s in routers], dtype=np.int32)
        self.rec = recorder
        self.sampler = recorder.stage.sampler = sampler   # staged calls are sampled at the flush
        self.dist = dist                            # probes.distributed.DistributedSync or None
        self.steps: list[int] = []                  # step number of each history row
        self.widest = [0] * len(routers)            # largest n_experts seen per router this window
        self.tokens_total = {s.layer: 0 for s in routers}
        self.closes = 0                             # windows that had something to write
        self.loads = None                           # probes.loads.RecorderLoads once a cursor exists
        self.pending = None                         # the last closed window's write (has .wait())

    def __len__(self) -> int:
        return len(self.steps)

    def saw(self, slot: int, n: int) -> None:
        """Router ``slot`` returned a call when it had ``n`` experts (read per call: lifecycle
        may grow or prune experts, even between a call and its forward's end): keep the window's
        widest (a later shrink must not cut this window's counts) and widen the recorder if the
        call no longer fits. Only called when ``n`` exceeds the widest so far (lock held)."""
        if n > self.rec.capacity:   # first: widest never exceeds the capacity, even when growing fails
            self.rec.grow(max(n, 2 * self.rec.capacity))
        self.widest[slot] = n

    def experts(self) -> list[int]:
        """Expert count per router for the window being closed: the largest seen in it."""
        return [max(s.n_experts, w) for s, w in zip(self.routers, self.widest)]

    def fit(self) -> list[int]:
        """``experts()``, with the recorder widened (``saw``) for a router that grew after its
        last call: its rows must be as wide as the count declared with them (narrower rows of a
        count never declared are refused by the writer: the window's rows of that layer lost).
        Lock held."""
        experts = self.experts()
        for slot, n in enumerate(experts):
            if n > self.rec.capacity:
                self.saw(slot, n)
        return experts

    def settle(self) -> None:
        """Wait until the last closed window is written (durability: a crash loses at most one
        flush interval, since the window closed at a step's end is on disk when the next step
        ends, or, with optimizer steps, when the next step's optimizer step is done; and its
        history buffer is free again). Usually it already is."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.wait()

    def end_step(self, step: int) -> None:
        """The open step (number ``step``) becomes the next history row (device ops only),
        after the previous window's write (``settle``)."""
        self.settle()
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
        self.fit()
        return self.rec.take(len(self.steps), include_current=True)

    def close(self, stage: SnapshotStage, faults: Faults, reduce: bool = True) -> WindowJob | None:
        """Hand the window's finished steps over as a ``WindowJob`` (None: nothing to write).

        O(1) in the window's length. The snapshot is computed here when ``stage`` has
        callbacks, else on the background thread. ``reduce=False`` (multi-rank, steps no
        rank agreed on): this rank's routing rows only, no collective and no snapshot.
        The previous job must be finished (its history buffer is written again from now on).
        """
        self.settle()
        self.fit()   # (before the steps are handed over: a failed growth leaves the window open)
        n = len(self.steps)
        steps = np.array(self.steps, dtype=np.int64)
        self.steps = []
        rows = sums = None
        if n:
            if self.loads is not None:
                self.loads.window_closing()
            rows, sums = self.rec.swap(n)
        ready = self.sampler.detach_ready() if self.sampler is not None else None
        experts = self.experts()
        self.widest = [0] * len(self.routers)
        if rows is None and ready is None:
            return None
        self.closes += 1
        dist = self.dist
        snap = snap_input = None
        if rows is not None:
            snap, snap_input = self._sums(steps, sums, experts, stage, faults, reduce)
        ep = dist is not None and dist.expert_parallel
        # expert-parallel ranks keep the global counts declared at attach
        sizes = {} if ep else dict(zip(self.layer_ids.tolist(), experts))
        return WindowJob(steps=steps, rows=rows, experts=tuple(experts), layer_ids=self.layer_ids,
                         tokens=ready, snapshot=snap, snapshot_input=snap_input, sizes=sizes,
                         write_globals=dist is None or dist.is_writer_of_globals,
                         expert_offsets=dist.expert_offsets if ep else None,
                         globalize_tokens=dist.globalize_tokens if dist is not None else None)

    def _sums(self, steps, sums: np.ndarray, experts, stage, faults, reduce):
        """Counters, the reduction and the snapshot (or its input) from the window sums."""
        dist = self.dist
        arrays = window_arrays(sums[None], sums.shape[-1] - 2)   # the window as one row: O(L x E)
        win_counts, win_drop = arrays.window_sums()   # [slot, capacity]
        faults.counters["padding_excluded"] += int(arrays.padding.sum())
        for i, s in enumerate(self.routers):
            self.tokens_total[s.layer] += int(win_counts[i, :experts[i]].sum())
        snap_counts, snap_drop, snap_experts = win_counts, win_drop, experts
        if dist is not None and reduce:  # the flush's one collective: identical rows on every rank
            snap_counts, snap_drop, snap_experts = dist.reduce_window(
                win_counts, win_drop, experts, len(steps), int(steps[-1]))
        if not ((dist is None or reduce) and any(
                snap_counts[i, :n].sum() + snap_drop[i, :n].sum() > 0 for i, n in enumerate(snap_experts))):
            return None, None
        lc = {s.layer: snap_counts[i, :snap_experts[i]] for i, s in enumerate(self.routers)}
        ld = {s.layer: snap_drop[i, :snap_experts[i]] for i, s in enumerate(self.routers)}
        args = (int(steps[0]), int(steps[-1]), lc, ld)
        if stage.callbacks:   # they decide before the next step: the snapshot is needed now
            return stage.observe(*args), None
        return None, args


def host_rows(job: WindowJob) -> np.ndarray:
    """The job's history rows as a host array (on CPU the buffer itself: no copy)."""
    rows = job.rows
    return rows.numpy() if rows.device.type == "cpu" else rows.to("cpu").numpy()


def finish(job: WindowJob, routers: list, stage: SnapshotStage, faults: Faults) -> ClosedWindow:
    """The background half of a window close: ``job`` -> the ``ClosedWindow`` to write."""
    blocks, signals, snap = [], [], job.snapshot
    experts = list(job.experts)
    if job.rows is not None:
        arrays = window_arrays(host_rows(job), job.rows.shape[-1] - 2)
        invalid = invalid_indices(arrays, experts)   # experts at or beyond n_experts are invalid too
        blocks = routing_blocks(job.steps, job.layer_ids, experts, arrays, job.expert_offsets)
        signals = padding_signals(job.steps, job.layer_ids, arrays.padding)
        if job.snapshot_input is not None:
            snap = stage.observe(*job.snapshot_input)
        signals += fault_signals(routers, job.steps, arrays, invalid, experts, faults)
    tok = token_rows(job.tokens)
    if tok is not None and job.globalize_tokens is not None:
        tok = job.globalize_tokens(tok)
    return ClosedWindow(sizes=job.sizes, blocks=tuple(blocks),
                        tokens=None if tok is None else TokenRows(*tok), snapshot=snap,
                        signals=tuple(signals), write_globals=job.write_globals)


def job_rows(job: WindowJob) -> int:
    """Routing + token rows ``finish(job)`` would write (counted when a job is dropped)."""
    n = 0
    if job.rows is not None:
        x = host_rows(job)
        arrays = window_arrays(x, x.shape[-1] - 2)
        traffic = arrays.counts.sum(axis=(2, 3)) + arrays.dropped.sum(axis=(2, 3))   # [n, mode]
        n += int((traffic > 0).sum()) * sum(job.experts)
    return n + sum(e[3] * e[4] for e in job.tokens or ())


def fault_signals(routers, steps, arrays, invalid, experts, faults) -> list[Signal]:
    """``probes.nonfinite`` / ``probes.invalid_expert_index`` per layer, each warned once."""
    nf = arrays.nonfinite.sum(axis=(0, 1))
    first, end = int(steps[0]), int(steps[-1])
    out = []
    for i, s in enumerate(routers):
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
