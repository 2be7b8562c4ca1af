"""The snapshot stage: a closed window's counts -> snapshot rows, alert transitions, callbacks.

Runs in the training thread at window close when ``on_snapshot`` callbacks are registered
(the controller decides on these rows before the next step), else on the background writer
thread (``pending``: its ticket; ``ready()`` waits for it). Keeps what the live views read between windows: the latest
rows, per-expert counts and decisions, active alerts and the transition counts
(``chrono.exporters.live.LiveSource``).
"""
from __future__ import annotations

import logging
from collections import Counter

import numpy as np

from chrono.snapshots import AlertTracker, layer_rows

from .faults import Faults
from .records import WindowSnapshot

log = logging.getLogger("probes")


class SnapshotStage:
    def __init__(self, run_id: str, faults: Faults):
        self.run_id = run_id
        self.tracker = AlertTracker()
        self.transitions: Counter = Counter()   # (layer, alert, transition) -> times
        self.latest: WindowSnapshot | None = None
        self.latest_decisions: list[dict] = []
        self.callbacks: list = []
        self.pending = None   # ticket of a snapshot the background thread is still building
        self._faults = faults

    def ready(self) -> None:
        """Wait until the latest closed window's snapshot is built (live views read it)."""
        if self.pending is not None:
            self.pending.wait()

    def observe(self, first_step: int, last_step: int, counts: dict[int, np.ndarray],
                dropped: dict[int, np.ndarray]) -> WindowSnapshot:
        """Snapshot rows and alert transitions of one window.

        ``counts`` / ``dropped``: ``{layer: [n_experts] int64}`` tokens and dropped
        assignments of the window (over ranks when reduced).
        """
        rows = layer_rows(self.run_id, first_step, last_step, counts, dropped)
        transitions = self.tracker.update(rows)
        for t in transitions:
            self.transitions[(t["layer"], t["alert"], t["transition"])] += 1
        snap = WindowSnapshot(first_step, last_step, tuple(rows), tuple(transitions),
                              {layer: np.asarray(c, dtype=np.int64).copy() for layer, c in counts.items()})
        self.latest = snap
        return snap

    def notify(self, snap: WindowSnapshot, handle) -> None:
        """Call every ``on_snapshot`` callback with ``(step, rows, handle)``; a raising one is
        counted (``callback_errors``) and logged once, training goes on."""
        if not snap.rows:
            return
        rows = list(snap.rows)
        for fn in list(self.callbacks):
            try:
                fn(int(rows[0]["step"]), rows, handle)
            except Exception:
                self._faults.counters["callback_errors"] += 1
                if self._faults.first(f"callback:{getattr(fn, '__qualname__', fn)}"):
                    log.exception("probes: on_snapshot callback %r raised (run %s); training "
                                  "continues, later errors of it are only counted", fn, self.run_id)

    def latest_rows(self) -> list[dict]:
        return [] if self.latest is None else list(self.latest.rows)

    def latest_counts(self) -> dict:
        """``{layer: [tokens per expert]}`` (Python ints) of the latest snapshot window."""
        if self.latest is None:
            return {}
        return {layer: [int(x) for x in c] for layer, c in self.latest.counts.items()}
