"""The open step: its number, when it ends (``probes.clock`` rules, ``h.step()``), followers.

``Steps.advance()`` ends the open step: the recorder's current buffer becomes a history
row of the window (``Window.end_step``), handles that follow this one end theirs too, and
a full window is closed (``on_window_full``). Under the "auto" rule the forwards before
the first optimizer step are folded into one step (``merge_provisional``). Every entry
point takes the handle's lock; a failure is a telemetry fault, never an exception.
"""
from __future__ import annotations

import time
import weakref

import torch

from .clock import StepClock
from .faults import Faults
from .window import Window


class Steps:
    def __init__(self, clock: StepClock, window: Window, lock, faults: Faults, start: int,
                 flush_every: int, on_window_full: weakref.WeakMethod):
        self.clock = clock
        self.window = window
        self.current = int(start)         # number of the open step
        self.dirty = False                # routing was recorded in the open step
        self.loose = False                # ... outside any top-level forward seen to start (a
        # router called by hand, the rest of a forward running when attach was called): under
        # the forward rule the next top-level forward starts a new step
        self.flush_seconds = 0.0          # in flush_staged (staged router calls counted)
        self.closed = False               # the handle is detached
        self.followers: list = []         # weakrefs to the Steps of handles following this one
        self.flush_every = flush_every
        self._lock, self._faults, self._on_window_full = lock, faults, on_window_full
        clock.on_first_update = self.merge_provisional

    @property
    def pending(self) -> bool:
        """Something happened in the open step (routing, or a top-level forward)."""
        return self.dirty or self.clock.forward_pending

    def flush_staged(self, forward_ended: int | None = None) -> None:
        """Count the staged router calls (``probes.staging``), under the lock (``forward_ended``:
        the ident of the thread whose top-level forward ended, see ``Recorder.flush``);
        its time adds to ``flush_seconds`` (reported with the hooks' time by ``h.stats()``)."""
        t0 = time.perf_counter()
        with self._lock:
            try:
                self.window.rec.flush(forward_ended)
            except Exception as e:
                self._faults.fault("staged router calls", e)
        self.flush_seconds += time.perf_counter() - t0

    @torch._dynamo.disable
    def advance(self, next_step: int | None = None, close: bool = True) -> None:
        """End the open step; the next one is ``next_step`` (default: this one + 1)."""
        with self._lock:
            if self.closed:
                return
            self.dirty = self.loose = False
            self.clock.step_ended()
            try:
                self.window.end_step(self.current)
                self._faults.counters["steps"] += 1
                self.current = self.current + 1 if next_step is None else int(next_step)
                for ref in list(self.followers):    # handles following this one end their step too
                    f = ref()
                    if f is None or f.closed:
                        self.followers.remove(ref)
                    elif f.current < self.current:
                        f.advance(self.current)
                if close and len(self.window) >= self.flush_every:
                    full = self._on_window_full()   # a weak method: hooks hold Steps, never the handle
                    if full is not None:
                        full()
            except Exception as e:
                self._faults.fault("step", e)

    def follow(self, leader: "Steps") -> None:
        leader.followers.append(weakref.ref(self))

    def finish_open(self, multi_rank: bool) -> None:
        """End a step with routing or a forward in it (flush, detach). Multi-rank: warn instead,
        since ending a step on a rank-local condition would desynchronise the ranks."""
        if not self.pending:
            return
        if multi_rank:
            self._faults.warn_once("dist-open-step", "probes: routing recorded after the last h.step() "
                                   "is not reduced in multi-rank mode; it is written as this rank's rows "
                                   "at detach (end steps with h.step() on every rank)")
            return
        self.advance()

    def merge_provisional(self, first_step, split: bool = False) -> None:
        """The first optimizer step arrived ("auto" rule): the forwards since ``first_step`` were
        one training step, not one step each. Fold them into the open step."""
        with self._lock:
            try:
                if split:
                    self._faults.warn_once(
                        "split", "probes: forwards before the first optimizer step did not fit in one "
                        "window (flush_every=%d): those already written stay one step each; use "
                        "steps='optimizer' for exact steps from the start", self.flush_every)
                if first_step is not None:
                    self.fold_from(first_step)
                    for ref in list(self.followers):
                        f = ref()
                        if f is not None and not f.closed:
                            f.fold_from(first_step)
            except Exception as e:
                self._faults.fault("step merge", e)

    def fold_from(self, first_step: int) -> None:
        """Fold the window's steps ``>= first_step`` and the open step into one open step."""
        if first_step == self.current:
            return
        n = self.window.fold_from(first_step)
        if not n:
            return
        self._faults.counters["steps"] -= n
        self.current = first_step
        self.dirty = True
