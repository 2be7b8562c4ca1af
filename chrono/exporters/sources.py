"""Where the exporter's numbers come from: a live probes handle, or runs on disk.

* ``LiveSource(handle)``: a probes handle in the training process, read through
  the checked ``chrono.exporters.live.LiveRouting`` protocol.
* ``StoreSource(root, run=None)``: runs on disk. Which parts changed is
  ``chrono.follow.Follower``'s answer (the store's one follower); this class
  only translates: it summarises each new part once (``.summaries``) and
  rebuilds a run's ``ExportState`` when the follower reports a change.
  Reading immutable parts directly instead of through ``chrono.connect``
  views keeps a scrape of a 58-layer run within the 50 ms budget
  (benchmarks/prometheus_scrape.py).

Active alerts of a stored run are those its stored transitions leave raised,
as ``chrono.snapshots.AlertTracker.from_transitions`` decides.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..follow import Follower
from ..snapshots import AlertTracker
from .live import missing_members
from .state import (DEFAULT_MAX_RUNS, DEFAULT_RECENT_S, ExporterError, ExportState, latest_decisions,
                    opt_int, per_layer)
from .summaries import SUMMARISE, window_counts

log = logging.getLogger("chrono.exporters.prometheus")


class LiveSource:
    """Reads a probes handle in this process (called from the scrape thread)."""

    kind = "live"

    def __init__(self, handle):
        missing = missing_members(handle)   # the checked contract of chrono.exporters.live
        if missing:
            raise ExporterError(f"{type(handle).__name__} is not a probes handle (a live routing "
                                f"source); missing: {', '.join(missing)}")
        self.handle = handle
        self._seen_step = None
        self._seen_time = None

    def read(self, want_shares: bool = False) -> ExportState:
        h = self.handle
        rows = per_layer(list(h.latest_snapshot() or ()))
        step = max((int(r["step"]) for r in rows), default=None)
        if step is not None and step != self._seen_step:
            self._seen_step, self._seen_time = step, time.time()
        stats = dict(h.stats() or {})
        state = ExportState(
            run_id=str(h.run_id), snapshot=rows, snapshot_step=step, snapshot_time=self._seen_time,
            active_alerts={int(k): set(v) for k, v in dict(h.active_alerts() or {}).items()},
            alert_transitions={(int(l), a, t): int(n)
                               for (l, a, t), n in dict(h.alert_transitions() or {}).items()},
            decisions=latest_decisions(list(h.latest_decisions() or ())),
            tokens_routed={int(k): int(v) for k, v in dict(stats.get("tokens_total") or {}).items()},
            rows_written={str(k): int(v) for k, v in dict(stats.get("rows_written") or {}).items()},
            write_errors=opt_int(stats.get("write_errors")),
            rows_dropped=opt_int(stats.get("rows_dropped")),
            hook_seconds=None if stats.get("hook_seconds") is None else float(stats["hook_seconds"]),
            steps=opt_int(stats.get("steps")),
            nonfinite=opt_int(stats.get("nonfinite")),
        )
        if want_shares:
            state.expert_counts = {int(k): list(v)
                                   for k, v in dict(h.latest_expert_counts() or {}).items()}
        return state


@dataclass
class _RunCache:
    """What a StoreSource keeps per followed run: per-part summaries and the last state."""

    parts: dict = field(default_factory=dict)  # {table: {follow.Part: summary}}
    state: ExportState | None = None
    shares: bool = False


class StoreSource:
    """Follows runs on disk: their newest snapshot, alert state, decisions and counters.

    ``run`` pins one run. ``run=None`` follows every run written within the
    last ``recent_s`` seconds (newest stamp of its manifest and table
    directories), newest first, at most ``max_runs`` of them (the others are
    counted in ``runs_left_out``, a cardinality guard: every run multiplies the
    series); a run appears as soon as it is written and drops out once it has
    been quiet for ``recent_s``. ``read()`` returns one ``ExportState`` per run.

    Each part is summarised once; a scrape rebuilds a run's state from the
    summaries only when the follower reports a change in that run (new parts,
    parts superseded by compaction or truncation, a new manifest), and reads
    only the new parts. Raises ``ExporterError`` for a missing root or bad
    limits, ``chrono.store.StoreError`` for an unknown pinned run.
    """

    kind = "store"
    _WATCHED = ("snapshots", "alerts", "decisions", "routing", "tokens", "signals", "lifecycle")

    def __init__(self, root, run: str | None = None, recent_s: float = DEFAULT_RECENT_S,
                 max_runs: int = DEFAULT_MAX_RUNS):
        from ..store import require_run

        self.root = Path(root)
        if not self.root.is_dir():
            raise ExporterError(f"store root {self.root} does not exist")
        if recent_s <= 0:
            raise ExporterError(f"the recent-run window must be > 0 seconds, got {recent_s:g}")
        if max_runs < 1:
            raise ExporterError(f"max_runs must be >= 1, got {max_runs}")
        self.run = run
        if run is not None:
            require_run(self.root, run)  # StoreError with the known runs for a typo
        self.recent_s, self.max_runs = float(recent_s), int(max_runs)
        self.runs_left_out = 0
        self._lock = threading.Lock()
        self._follower = Follower(self.root, tables=self._WATCHED)
        self._runs: dict[str, _RunCache] = {}

    def current_runs(self) -> list[str]:
        """The runs exported now: the pinned one, else the recent ones (newest first, capped)."""
        if self.run is not None:
            return [self.run]
        now_ns = time.time_ns()
        recent = sorted((-t, r) for r, t in self._follower.stamps().items()
                        if now_ns - t <= self.recent_s * 1e9)
        self.runs_left_out = max(0, len(recent) - self.max_runs)
        if self.runs_left_out:
            log.warning("chrono exporter: %d runs written in the last %.0f s, exporting the newest %d "
                        "(max_runs); pin one with --run or raise --max-runs", len(recent),
                        self.recent_s, self.max_runs)
        return [r for _, r in recent[: self.max_runs]]

    def current_run(self) -> str | None:
        """The newest run exported now (None when none is recent)."""
        runs = self.current_runs()
        return runs[0] if runs else None

    def read(self, want_shares: bool = False) -> list[ExportState]:
        with self._lock:
            runs = self.current_runs()
            changes = self._follower.poll(runs)
            for gone in set(self._runs) - set(runs):  # quiet for the window: forget its parts
                del self._runs[gone]
            out = []
            for run in runs:
                cache = self._runs.setdefault(run, _RunCache())
                if run in changes.runs or cache.state is None or want_shares > cache.shares:
                    cache.state, cache.shares = self._read(run, cache, want_shares), want_shares
                out.append(cache.state)
            return out

    def _summaries(self, run: str, cache: _RunCache, table: str) -> list:
        """Summaries of the run's visible parts of ``table`` (new parts read, gone parts forgotten)."""
        known = cache.parts.setdefault(table, {})
        parts = self._follower.parts(run, table)
        out = []
        for p in parts:
            s = known.get(p)
            if s is None:
                s = known[p] = SUMMARISE[table](p.path)
            out.append(s)
        if len(known) > len(parts):
            keep = set(parts)
            for p in [p for p in known if p not in keep]:
                del known[p]
        return out

    def _read(self, run: str, cache: _RunCache, want_shares: bool) -> ExportState:
        state = ExportState(run_id=run)

        snaps = self._summaries(run, cache, "snapshots")
        if snaps:
            step = max(s["max_step"] for s in snaps)
            rows = [r for s in snaps if s["max_step"] == step for r in s["latest"]]
            state.snapshot = per_layer(rows)
            state.snapshot_step = step if state.snapshot else None
            state.snapshot_time = max(s["mtime"] for s in snaps)

        transitions = set()  # (step, layer, alert, transition); ranks may repeat identical rows
        for s in self._summaries(run, cache, "alerts"):
            transitions.update(s["transitions"])
        for _step, layer, alert, kind in transitions:
            key = (layer, alert, kind)
            state.alert_transitions[key] = state.alert_transitions.get(key, 0) + 1
        state.active_alerts = AlertTracker.from_transitions(transitions).active()

        decisions = [r for s in self._summaries(run, cache, "decisions") for r in s["latest"]]
        state.decisions = latest_decisions(decisions)

        routing = self._summaries(run, cache, "routing")
        for s in routing:
            for layer, n in s["tokens"].items():
                state.tokens_routed[layer] = state.tokens_routed.get(layer, 0) + n
        state.rows_stored = {"routing": sum(s["rows"] for s in routing),
                             "snapshots": sum(s["rows"] for s in snaps)}
        for table in ("alerts", "decisions", "tokens", "signals", "lifecycle"):
            state.rows_stored[table] = sum(s["rows"] for s in self._summaries(run, cache, table))

        if want_shares and state.snapshot:
            parts = self._follower.parts(run, "routing")
            by_path = {p.path: s for p, s in cache.parts.get("routing", {}).items()}
            state.expert_counts = window_counts([p.path for p in parts], by_path, state.snapshot)
        return state

    def close(self) -> None:
        """Nothing to release (kept for symmetry with other sources)."""


def as_source(source, run: str | None = None, recent_s: float = DEFAULT_RECENT_S,
              max_runs: int = DEFAULT_MAX_RUNS):
    """A source object from a probes handle, a source, or a store root path (``StoreSource`` args)."""
    if hasattr(source, "read") and hasattr(source, "kind"):
        return source
    if isinstance(source, (str, os.PathLike)):
        return StoreSource(source, run=run, recent_s=recent_s, max_runs=max_runs)
    return LiveSource(source)
