"""Prometheus exporter: routing health of a run as metric families, built at scrape time.

Style of prometheus client_python's custom collectors (DESIGN §7): nothing is
updated on the hot path; ``ChronoCollector.collect()`` reads its *source* when
Prometheus scrapes and yields fresh metric families. Two sources:

* ``LiveSource(handle)``: a probes handle in the training process
  (``latest_snapshot()``, ``active_alerts()``, ``alert_transitions()``,
  ``latest_decisions()``, ``stats()``, ``run_id``).
* ``StoreSource(root, run=None)``: a run directory on disk, following its
  newest snapshots / alerts / decisions as parts appear (``run=None`` follows
  the most recently written run). It reads the immutable part files
  incrementally rather than rebuilding ``chrono.connect`` views per scrape:
  a view refresh plus three queries cost more than the 50 ms scrape budget
  for a 58-layer run on the shared test machine.

Every exporter has its own ``CollectorRegistry`` (never the global one), so
two exporters in one process do not collide. ``serve(source, port)`` starts an
HTTP endpoint on 127.0.0.1 by default.

Per-layer series carry labels ``run`` and ``layer``; the store's global row
(layer -1) is not exported as a layer, so ``sum``/``avg`` over layers stay
meaningful (Prometheus naming guidance: aggregating a metric over all its
labels should make sense). Per-expert shares are off by default
(``expert_labels=True``) and capped at ``max_expert_series`` series: expert
level detail belongs in Parquet, not in a time-series database.
"""
from __future__ import annotations


import errno
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..schema import ALERT_TYPES, GLOBAL_LAYER
from .live import missing_members

log = logging.getLogger("chrono.exporters.prometheus")

DEFAULT_PORT = 9108
DEFAULT_MAX_EXPERT_SERIES = 2048
# Without a pinned run, runs written within this window are exported. 30 min: longer than the
# shipped staleness rule (no snapshot for 15 min, for 5 min), so that alert fires before a
# stalled run's series disappear.
DEFAULT_RECENT_S = 30 * 60.0
DEFAULT_MAX_RUNS = 20  # cardinality guard: at most this many recent runs are exported
# A directory whose mtime is this recent may still receive parts within the same
# timestamp tick, so the store source does not trust its cache for it (racy-git rule).
_FRESH_SECONDS = 1.0

# (metric name, snapshot column, help text) of the per-layer gauges of the latest window.
SNAPSHOT_GAUGES = (
    ("chrono_neff", "neff", "Effective number of experts exp(entropy) in the latest snapshot window."),
    ("chrono_top2_share", "top2_share", "Share of tokens taken by the two busiest experts (0..1)."),
    ("chrono_entropy_nats", "entropy", "Entropy of the expert load shares, in nats."),
    ("chrono_dead_experts", "dead", "Experts that received no token in the latest window."),
    ("chrono_nearly_dead_experts", "nearly_dead", "Experts with 0 < share < 1% in the latest window."),
    ("chrono_load_cv", "cv", "Coefficient of variation of expert loads in the latest window."),
    ("chrono_max_violation", "max_violation", "MaxVio: max expert load / mean load - 1 in the latest window."),
    ("chrono_load_gini", "gini", "Gini coefficient of expert loads in the latest window."),
    ("chrono_drop_fraction", "drop_fraction", "Fraction of routed assignments dropped (capacity)."),
    ("chrono_experts", "n_experts", "Number of experts of the layer."),
    ("chrono_window_tokens", "token_count", "Token assignments dispatched in the latest snapshot window."),
)

# (metric name, decisions column, help text) of the controller gauges.
DECISION_GAUGES = (
    ("chrono_controller_debt", "debt", "Topology debt in [0, 1] of the latest controller decision."),
    ("chrono_controller_pressure", "pressure", "Controller pressure (EMA of topology debt)."),
    ("chrono_controller_heat", "heat",
     "Controller heat clip(pressure, 0, 1): equals pressure while pressure is in [0, 1] (always under the "
     "ChronoMoE policy, as debt is), kept as its own series because the temperature actuator consumes "
     "heat (T = 1 + (t_max - 1) * heat) where lenses consume pressure."),
    ("chrono_controller_forgetting", "forgetting", "Controller forgetting rate 0.02 + 0.10 * pressure."),
    ("chrono_lens_scale", "lens_scale", "Scale applied to the layer's routing lens."),
    ("chrono_controller_backoff", "backoff", "Harm-guard backoff multiplier of the lens scale."),
    ("chrono_controller_abstaining", "abstain", "1 when the controller abstained at its latest decision."),
)


class ExporterError(Exception):
    """A user-facing exporter problem (port in use, bad source)."""


def layer_label(layer) -> str:
    """Label value of a layer index: the global row (-1) is 'global'."""
    layer = int(layer)
    return "global" if layer == GLOBAL_LAYER else str(layer)


@dataclass
class ExportState:
    """Everything one scrape exports, read from a source in one go."""

    run_id: str
    snapshot: list[dict] = field(default_factory=list)  # per-layer rows of the latest window
    snapshot_step: int | None = None
    snapshot_time: float | None = None  # unix time the latest snapshot appeared
    active_alerts: dict = field(default_factory=dict)  # {layer: set(alert)}
    alert_transitions: dict = field(default_factory=dict)  # {(layer, alert, transition): count}
    decisions: list[dict] = field(default_factory=list)  # latest decision per (layer, actuator)
    tokens_routed: dict = field(default_factory=dict)  # {layer: total assignments}
    rows_written: dict | None = None  # live writer counters {table: rows}
    rows_stored: dict | None = None  # rows on disk {table: rows}
    write_errors: int | None = None
    rows_dropped: int | None = None
    hook_seconds: float | None = None
    steps: int | None = None
    nonfinite: int | None = None
    expert_counts: dict | None = None  # {layer: sequence of per-expert counts} of the latest window


# ====================================================================== sources
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
        rows = _per_layer(list(h.latest_snapshot() or ()))
        step = max((int(r["step"]) for r in rows), default=None)
        if step is not None and step != self._seen_step:
            self._seen_step, self._seen_time = step, time.time()
        stats = dict(h.stats() or {})
        state = ExportState(
            run_id=str(h.run_id), snapshot=rows, snapshot_step=step, snapshot_time=self._seen_time,
            active_alerts={int(k): set(v) for k, v in dict(h.active_alerts() or {}).items()},
            alert_transitions={(int(l), a, t): int(n)
                               for (l, a, t), n in dict(h.alert_transitions() or {}).items()},
            decisions=_latest_decisions(list(h.latest_decisions() or ())),
            tokens_routed={int(k): int(v) for k, v in dict(stats.get("tokens_total") or {}).items()},
            rows_written={str(k): int(v) for k, v in dict(stats.get("rows_written") or {}).items()},
            write_errors=_opt_int(stats.get("write_errors")),
            rows_dropped=_opt_int(stats.get("rows_dropped")),
            hook_seconds=None if stats.get("hook_seconds") is None else float(stats["hook_seconds"]),
            steps=_opt_int(stats.get("steps")),
            nonfinite=_opt_int(stats.get("nonfinite")),
        )
        if want_shares:
            state.expert_counts = {int(k): list(v)
                                   for k, v in dict(h.latest_expert_counts() or {}).items()}
        return state


@dataclass
class _RunCache:
    """What a StoreSource keeps per followed run: per-part summaries and the last state."""

    parts: dict = field(default_factory=dict)  # {table: {part path: summary}}
    signature: tuple | None = None
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

    The store's part files are immutable, so each part is read once and
    summarised (latest snapshot rows, alert transitions, newest decisions,
    tokens per layer, row count); a scrape re-lists a run's parts
    (``chrono.store.part_files``: superseded and unreadable parts excluded, as
    the DuckDB views do) and reads only new ones, and does nothing at all when
    no table directory changed. Reading the parts directly instead of through
    ``chrono.connect`` views keeps a scrape of a 58-layer run within budget
    (see benchmarks/prometheus_scrape.py).
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
        self._runs: dict[str, _RunCache] = {}

    # -------------------------------------------------------------- change detection
    def _dir_mtimes(self, run: str) -> tuple:
        from ..store import run_stamps

        return run_stamps(self.root, run, self._WATCHED)

    def current_runs(self) -> list[str]:
        """The runs exported now: the pinned one, else the recent ones (newest first, capped)."""
        if self.run is not None:
            return [self.run]
        from ..store import list_runs

        now_ns = time.time_ns()
        recent = []
        for r in list_runs(self.root):
            t = max((m for m in self._dir_mtimes(r) if m is not None), default=0)
            if now_ns - t <= self.recent_s * 1e9:
                recent.append((-t, r))
        recent.sort()
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
            for gone in set(self._runs) - set(runs):  # quiet for the window: forget its parts
                del self._runs[gone]
            return [self._read_run(r, want_shares) for r in runs]

    def _read_run(self, run: str, want_shares: bool) -> ExportState:
        cache = self._runs.setdefault(run, _RunCache(parts={t: {} for t in self._WATCHED}))
        mtimes = self._dir_mtimes(run)
        newest = max((m for m in mtimes if m is not None), default=0)
        fresh = time.time() - newest / 1e9 < _FRESH_SECONDS
        if not fresh and mtimes == cache.signature and cache.state is not None and cache.shares >= want_shares:
            return cache.state
        cache.state = self._read(run, want_shares)
        cache.signature, cache.shares = mtimes, want_shares
        return cache.state

    # -------------------------------------------------------------- per-part summaries
    def _summaries(self, run: str, table: str) -> list:
        """Summaries of the run's current parts of ``table`` (new parts read, gone parts forgotten)."""
        from ..store import part_files

        cache = self._runs[run].parts[table]
        paths = part_files(self.root, table, run)
        out = []
        for p in paths:
            s = cache.get(p)
            if s is None:
                s = cache[p] = _SUMMARISE[table](p)
            out.append(s)
        if len(cache) > len(paths):
            keep = set(paths)
            for p in [p for p in cache if p not in keep]:
                del cache[p]
        return out

    def _read(self, run: str, want_shares: bool) -> ExportState:
        state = ExportState(run_id=run)

        snaps = self._summaries(run, "snapshots")
        if snaps:
            step = max(s["max_step"] for s in snaps)
            rows = [r for s in snaps if s["max_step"] == step for r in s["latest"]]
            state.snapshot = _per_layer(rows)
            state.snapshot_step = step if state.snapshot else None
            state.snapshot_time = max(s["mtime"] for s in snaps)

        transitions = set()  # (step, layer, alert, transition); ranks may repeat identical rows
        for s in self._summaries(run, "alerts"):
            transitions.update(s["transitions"])
        for step, layer, alert, kind in sorted(transitions):
            key = (layer, alert, kind)
            state.alert_transitions[key] = state.alert_transitions.get(key, 0) + 1
            if kind == "raised":
                state.active_alerts.setdefault(layer, set()).add(alert)
            else:
                state.active_alerts.get(layer, set()).discard(alert)
        state.active_alerts = {l: a for l, a in state.active_alerts.items() if a}

        decisions = [r for s in self._summaries(run, "decisions") for r in s["latest"]]
        state.decisions = _latest_decisions(decisions)

        routing = self._summaries(run, "routing")
        for s in routing:
            for layer, n in s["tokens"].items():
                state.tokens_routed[layer] = state.tokens_routed.get(layer, 0) + n
        state.rows_stored = {"routing": sum(s["rows"] for s in routing),
                             "snapshots": sum(s["rows"] for s in snaps)}
        for table in ("alerts", "decisions", "tokens", "signals", "lifecycle"):
            state.rows_stored[table] = sum(s["rows"] for s in self._summaries(run, table))

        if want_shares and state.snapshot:
            state.expert_counts = self._window_counts(run, state.snapshot)
        return state

    def _window_counts(self, run: str, snapshot: list[dict]) -> dict[int, list[int]]:
        """Per-expert counts of the latest window, from the routing parts that overlap it."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        from ..store import part_files

        lo, hi = int(snapshot[0]["window_start"]), int(snapshot[0]["window_end"])
        counts = {int(r["layer"]): [0] * int(r["n_experts"]) for r in snapshot}
        summaries = self._runs[run].parts["routing"]
        for p in part_files(self.root, "routing", run):
            s = summaries.get(p)
            if s is not None and (s["max_step"] < lo or s["min_step"] > hi):
                continue
            with pq.ParquetFile(p) as f:
                t = _valid_rows("routing", f.read(columns=["step", "layer", "expert", "tokens"]), p)
            t = t.filter(pc.and_(pc.greater_equal(t["step"], lo), pc.less_equal(t["step"], hi)))
            if not t.num_rows:
                continue
            g = t.group_by(["layer", "expert"]).aggregate([("tokens", "sum")])
            for layer, e, n in zip(g["layer"].to_pylist(), g["expert"].to_pylist(),
                                   g["tokens_sum"].to_pylist()):
                c = counts.setdefault(int(layer), [])
                if e >= len(c):
                    c.extend([0] * (e + 1 - len(c)))
                c[e] += int(n or 0)
        return counts

    def close(self) -> None:
        """Nothing to release (kept for symmetry with other sources)."""


# -------------------------------------------------------------- part summarisers
def _read_part(path: str, table: str, columns=None):
    import pyarrow.parquet as pq

    from ..schema import conform

    # ParquetFile.read: a single known file, without read_table's dataset discovery (~5x less overhead)
    with pq.ParquetFile(path) as f:
        t = f.read()
    t = _valid_rows(table, conform(table, t), path)
    return t if columns is None else t.select(columns)


_warned_invalid: set[str] = set()


def _valid_rows(table: str, t, path: str):
    """``t`` without rows the write API would refuse (``chrono.rules``); one warning line per part."""
    from ..rules import invalid_mask

    bad, first = invalid_mask(table, t)
    if first is None:
        return t
    if path not in _warned_invalid:
        _warned_invalid.add(path)
        run = os.path.basename(os.path.dirname(path)).removeprefix("run_id=")
        log.warning("chrono exporter: run %r, table %s, %s; %d invalid rows of %s left out",
                    run, table, first, int(bad.sum()), os.path.basename(path))
    import pyarrow as pa

    return t.filter(pa.array(~bad))


def _summarise_snapshots(path: str) -> dict:
    import pyarrow.compute as pc

    t = _read_part(path, "snapshots")
    if not t.num_rows:
        return {"max_step": -1, "latest": [], "mtime": os.stat(path).st_mtime, "rows": 0}
    step = int(pc.max(t["step"]).as_py())
    latest = t.filter(pc.equal(t["step"], step)).to_pylist()
    return {"max_step": step, "latest": latest, "mtime": os.stat(path).st_mtime, "rows": t.num_rows}


def _summarise_alerts(path: str) -> dict:
    t = _read_part(path, "alerts", ["step", "layer", "alert", "transition"])
    rows = zip(t["step"].to_pylist(), t["layer"].to_pylist(), t["alert"].to_pylist(),
               t["transition"].to_pylist())
    return {"transitions": [(int(s), int(l), a, k) for s, l, a, k in rows], "rows": t.num_rows}


def _summarise_decisions(path: str) -> dict:
    t = _read_part(path, "decisions")
    return {"latest": _latest_decisions(t.to_pylist()), "rows": t.num_rows}


def _summarise_routing(path: str) -> dict:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as f:
        t = _valid_rows("routing", f.read(columns=["step", "layer", "tokens", "mode"]), path)
    if not t.num_rows:
        return {"tokens": {}, "rows": 0, "min_step": 0, "max_step": -1}
    g = t.group_by("layer").aggregate([("tokens", "sum")])
    tokens = {int(l): int(n or 0) for l, n in zip(g["layer"].to_pylist(), g["tokens_sum"].to_pylist())}
    mm = pc.min_max(t["step"]).as_py()
    return {"tokens": tokens, "rows": t.num_rows, "min_step": int(mm["min"]), "max_step": int(mm["max"])}


def _summarise_count(path: str) -> dict:
    import pyarrow.parquet as pq

    return {"rows": pq.read_metadata(path).num_rows}


_SUMMARISE = {"snapshots": _summarise_snapshots, "alerts": _summarise_alerts,
              "decisions": _summarise_decisions, "routing": _summarise_routing,
              "tokens": _summarise_count, "signals": _summarise_count, "lifecycle": _summarise_count}


def _opt_int(v):
    return None if v is None else int(v)


def _per_layer(rows: list[dict]) -> list[dict]:
    """Per-layer rows (global row dropped), one per layer (ranks may repeat identical rows)."""
    seen, out = set(), []
    for r in rows:
        layer = int(r["layer"])
        if layer == GLOBAL_LAYER or layer in seen:
            continue
        seen.add(layer)
        out.append(r)
    return sorted(out, key=lambda r: int(r["layer"]))


def _latest_decisions(rows: list[dict]) -> list[dict]:
    """The latest decision per (layer, actuator)."""
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (int(r["layer"]), str(r.get("actuator", "")))
        if key not in best or int(r["step"]) >= int(best[key]["step"]):
            best[key] = r
    return [best[k] for k in sorted(best)]


def as_source(source, run: str | None = None, recent_s: float = DEFAULT_RECENT_S,
              max_runs: int = DEFAULT_MAX_RUNS):
    """A source object from a probes handle, a source, or a store root path (``StoreSource`` args)."""
    if hasattr(source, "read") and hasattr(source, "kind"):
        return source
    if isinstance(source, (str, os.PathLike)):
        return StoreSource(source, run=run, recent_s=recent_s, max_runs=max_runs)
    return LiveSource(source)


# ====================================================================== collector
class ChronoCollector:
    """Custom collector: yields chrono's metric families from ``source`` at each scrape."""

    def __init__(self, source, expert_labels: bool = False,
                 max_expert_series: int = DEFAULT_MAX_EXPERT_SERIES):
        if max_expert_series < 0:
            raise ExporterError("max_expert_series must be >= 0")
        self.source = as_source(source)
        self.expert_labels = bool(expert_labels)
        self.max_expert_series = int(max_expert_series)
        self._read_errors = 0
        self._logged_errors: set[str] = set()
        self._warned_cap = False
        self._lock = threading.Lock()

    def describe(self):
        """Names this collector owns (lets the registry detect clashes without reading the source)."""
        return list(self._families([], error=False))

    def collect(self):
        with self._lock:  # concurrent scrapes read the source one at a time
            try:
                got = self.source.read(want_shares=self.expert_labels)
                states = [got] if isinstance(got, ExportState) else list(got)
                error = False
            except Exception as e:  # a broken source must not break the scrape
                states, error = [], True
                self._read_errors += 1
                kind = type(e).__name__
                if kind not in self._logged_errors:
                    self._logged_errors.add(kind)
                    log.warning("chrono exporter: reading the %s source failed (%s: %s); "
                                "exporting chrono_exporter_source_up 0", self.source.kind, kind, e)
            states = [st for st in states if st.run_id]
            # families without samples (e.g. live-only counters of a store source) are left out
            return [f for f in self._families(states, error) if f.samples]

    # -------------------------------------------------------------- families
    def _families(self, states: list[ExportState], error: bool):
        up = GaugeMetricFamily("chrono_exporter_source_up",
                               "1 when the last read of the telemetry source succeeded.")
        up.add_metric([], 0.0 if error else 1.0)
        yield up
        errs = CounterMetricFamily("chrono_exporter_read_errors",
                                   "Failed reads of the telemetry source since the exporter started.")
        errs.add_metric([], self._read_errors)
        yield errs
        if self.source.kind == "store" and not error:
            n = GaugeMetricFamily("chrono_exporter_runs",
                                  "Runs exported now (pinned with --run, or written within the recent window).")
            n.add_metric([], float(len(states)))
            yield n
            out = GaugeMetricFamily("chrono_exporter_runs_left_out",
                                    "Recent runs not exported because of the max_runs cardinality cap.")
            out.add_metric([], float(getattr(self.source, "runs_left_out", 0)))
            yield out

        RL = ["run", "layer"]
        for name, col, doc in SNAPSHOT_GAUGES:
            g = GaugeMetricFamily(name, doc, labels=RL)
            for st in states:
                for r in st.snapshot:
                    g.add_metric([st.run_id, layer_label(r["layer"])], float(r[col]))
            yield g

        step = GaugeMetricFamily("chrono_snapshot_step", "Training step of the latest snapshot window.",
                                 labels=["run"])
        ts = GaugeMetricFamily("chrono_last_snapshot_timestamp_seconds",
                               "Unix time at which the latest snapshot appeared (staleness alerts).",
                               labels=["run"])
        for st in states:
            if st.snapshot_step is not None:
                step.add_metric([st.run_id], float(st.snapshot_step))
            if st.snapshot_time is not None:
                ts.add_metric([st.run_id], float(st.snapshot_time))
        yield step
        yield ts

        tokens = CounterMetricFamily("chrono_tokens_routed",
                                     "Token assignments dispatched to experts since the run started.",
                                     labels=RL)
        for st in states:
            for layer, n in sorted(st.tokens_routed.items()):
                tokens.add_metric([st.run_id, layer_label(layer)], float(n))
        yield tokens

        active = GaugeMetricFamily("chrono_alert_active",
                                   "1 while the routing alert is raised for the layer, else 0.",
                                   labels=["run", "layer", "alert"])
        for st in states:
            layers = sorted({int(r["layer"]) for r in st.snapshot} | set(st.active_alerts))
            for layer in layers:
                on = st.active_alerts.get(layer, set())
                for alert in ALERT_TYPES:
                    active.add_metric([st.run_id, layer_label(layer), alert], 1.0 if alert in on else 0.0)
        yield active

        trans = CounterMetricFamily("chrono_alert_transitions",
                                    "Alert transitions (raised / cleared) since the run started.",
                                    labels=["run", "layer", "alert", "transition"])
        for st in states:
            for (layer, alert, t), n in sorted(st.alert_transitions.items()):
                trans.add_metric([st.run_id, layer_label(layer), alert, t], float(n))
        yield trans

        DL = ["run", "layer", "actuator"]
        for name, col, doc in DECISION_GAUGES:
            g = GaugeMetricFamily(name, doc, labels=DL)
            for st in states:
                for d in st.decisions:
                    v = d.get(col)
                    if v is not None:
                        g.add_metric([st.run_id, layer_label(d["layer"]), str(d.get("actuator", ""))], float(v))
            yield g

        yield from self._probe_families(states)
        if self.expert_labels:
            yield from self._expert_families(states)

    def _probe_families(self, states: list[ExportState]):
        def counter(name, doc, attr):
            c = CounterMetricFamily(name, doc, labels=["run"])
            for st in states:
                value = getattr(st, attr)
                if value is not None:
                    c.add_metric([st.run_id], float(value))
            return c

        yield counter("chrono_probe_hook_seconds", "Seconds spent inside probe hooks (training thread).",
                      "hook_seconds")
        yield counter("chrono_probe_steps", "Training steps seen by the probes.", "steps")
        yield counter("chrono_probe_nonfinite", "Non-finite router values seen by the probes.", "nonfinite")
        yield counter("chrono_store_write_errors", "Telemetry write failures (training continued).",
                      "write_errors")
        yield counter("chrono_store_rows_dropped", "Telemetry rows dropped after repeated write failures.",
                      "rows_dropped")
        written = CounterMetricFamily("chrono_store_rows_written",
                                      "Rows written to the store by this process, per table.",
                                      labels=["run", "table"])
        stored = GaugeMetricFamily("chrono_store_rows",
                                   "Rows currently stored on disk for the run, per table.",
                                   labels=["run", "table"])
        for st in states:
            for table, n in sorted((st.rows_written or {}).items()):
                written.add_metric([st.run_id, table], float(n))
            for table, n in sorted((st.rows_stored or {}).items()):
                stored.add_metric([st.run_id, table], float(n))
        yield written
        yield stored

    def _expert_families(self, states: list[ExportState]):
        """Per-expert shares; the cap counts series over all exported runs together."""
        g = GaugeMetricFamily("chrono_expert_share",
                              "Share of the layer's tokens routed to the expert in the latest window "
                              "(only with expert_labels=True; capped).",
                              labels=["run", "layer", "expert"])
        capped = GaugeMetricFamily("chrono_expert_share_series_dropped",
                                   "Per-expert series left out by the cardinality cap.", labels=["run"])
        emitted = total_dropped = 0
        for st in states:
            dropped = 0
            for layer, counts in sorted((st.expert_counts or {}).items()):
                total = float(sum(counts))
                for e, c in enumerate(counts):
                    if emitted >= self.max_expert_series:
                        dropped += 1
                        continue
                    g.add_metric([st.run_id, layer_label(layer), str(e)], float(c) / total if total > 0 else 0.0)
                    emitted += 1
            capped.add_metric([st.run_id], float(dropped))
            total_dropped += dropped
        if total_dropped and not self._warned_cap:
            self._warned_cap = True
            log.warning("chrono exporter: %d per-expert series exceed the cap of %d "
                        "(max_expert_series); they are left out: keep expert-level detail in Parquet "
                        "(chrono query) or raise the cap", total_dropped, self.max_expert_series)
        yield g
        yield capped


# ====================================================================== exporter + server
class Exporter:
    """A collector in its own private registry (no global state)."""

    def __init__(self, source, expert_labels: bool = False,
                 max_expert_series: int = DEFAULT_MAX_EXPERT_SERIES):
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = ChronoCollector(source, expert_labels=expert_labels,
                                         max_expert_series=max_expert_series)
        self.registry.register(self.collector)

    def exposition(self) -> bytes:
        """The text exposition (format 0.0.4) one scrape would return."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class MetricsServer:
    """A running HTTP endpoint; ``.port``, ``.host``, ``.url``, ``.close()``; a context manager."""

    def __init__(self, exporter: Exporter, httpd, thread):
        self.exporter = exporter
        self.registry = exporter.registry
        self._httpd, self._thread = httpd, thread
        self.host = httpd.server_address[0]
        self.port = int(httpd.server_address[1])
        self._closed = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
        close = getattr(self.exporter.collector.source, "close", None)
        if callable(close):
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def serve(source, port: int = DEFAULT_PORT, host: str = "127.0.0.1", *, run: str | None = None,
          expert_labels: bool = False,
          max_expert_series: int = DEFAULT_MAX_EXPERT_SERIES) -> MetricsServer:
    """Serve ``/metrics`` for ``source`` (a probes handle, a store root path, or a source object).

    ``port=0`` picks a free port (see ``.port``). Binds 127.0.0.1 unless ``host``
    says otherwise. Raises ``ExporterError`` when the address cannot be bound.
    """
    from prometheus_client import start_http_server

    if not 0 <= int(port) <= 65535:
        raise ExporterError(f"port must be in 0..65535, got {port}")
    exporter = Exporter(as_source(source, run=run), expert_labels=expert_labels,
                        max_expert_series=max_expert_series)
    try:
        httpd, thread = start_http_server(int(port), addr=host, registry=exporter.registry)
    except OSError as e:
        reason = "address already in use" if getattr(e, "errno", None) == errno.EADDRINUSE else (e.strerror or str(e))
        raise ExporterError(f"cannot serve metrics on {host}:{port}: {reason}") from None
    return MetricsServer(exporter, httpd, thread)
