"""Prometheus exporter: routing health of a run as metric families, built at scrape time.

Style of prometheus client_python's custom collectors (DESIGN §7): nothing is
updated on the hot path; ``ChronoCollector.collect()`` reads its *source* when
Prometheus scrapes and yields fresh metric families. Two sources:

* ``LiveSource(handle)``: a probes handle in the training process
  (``latest_snapshot()``, ``active_alerts()``, ``alert_transitions()``,
  ``latest_decisions()``, ``stats()``, ``run_id``).
* ``StoreSource(root, run=None)``: a run directory on disk, following its
  newest snapshots / alerts / decisions through ``chrono.connect`` +
  ``chrono.refresh`` (``run=None`` follows the most recently written run).

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

log = logging.getLogger("chrono.exporters.prometheus")

DEFAULT_PORT = 9108
DEFAULT_MAX_EXPERT_SERIES = 2048
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
    ("chrono_controller_heat", "heat", "Controller heat clip(pressure, 0, 1)."),
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
        missing = [m for m in ("latest_snapshot", "active_alerts", "alert_transitions",
                               "latest_decisions", "stats") if not callable(getattr(handle, m, None))]
        if missing or not hasattr(handle, "run_id"):
            raise ExporterError(f"{type(handle).__name__} is not a probes handle "
                                f"(missing: {', '.join(missing or ['run_id'])})")
        self.handle = handle
        self._seen_step = None
        self._seen_time = None
        self._warned_shares = False

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
            fn = getattr(h, "latest_expert_counts", None)
            if callable(fn):
                state.expert_counts = {int(k): list(v) for k, v in dict(fn() or {}).items()}
            elif not self._warned_shares:
                self._warned_shares = True
                log.warning("chrono exporter: expert_labels=True but this handle has no "
                            "latest_expert_counts(); per-expert shares are not exported")
        return state


class StoreSource:
    """Follows a run on disk: its newest snapshot, alert state, decisions and counters.

    ``run=None`` follows the most recently written run under ``root`` (and
    switches when a newer one appears). Re-reads only when one of the run's
    table directories changed since the previous scrape; parts are immutable,
    so per-part sums (routing tokens, row counts) are cached by file name.
    """

    kind = "store"
    _WATCHED = ("snapshots", "alerts", "decisions", "routing", "tokens", "signals", "lifecycle")

    def __init__(self, root, run: str | None = None):
        import chrono
        from ..store import require_run

        self.root = Path(root)
        if not self.root.is_dir():
            raise ExporterError(f"store root {self.root} does not exist")
        self.run = run
        if run is not None:
            require_run(self.root, run)  # StoreError with the known runs for a typo
        self._con = chrono.connect(self.root)
        self._lock = threading.Lock()
        self._signature = None
        self._state: ExportState | None = None
        self._state_shares = False
        self._part_sums: dict[str, dict[int, int]] = {}
        self._part_rows: dict[str, int] = {}

    # -------------------------------------------------------------- change detection
    def _dir_mtimes(self, run: str) -> tuple:
        out = []
        for name in ("manifest.json",) + self._WATCHED:
            try:
                out.append(os.stat(self.root / run / name).st_mtime_ns)
            except OSError:
                out.append(None)
        return tuple(out)

    def current_run(self) -> str | None:
        if self.run is not None:
            return self.run
        from ..store import list_runs

        best, best_t = None, -1
        for r in list_runs(self.root):
            t = max((m for m in self._dir_mtimes(r) if m is not None), default=0)
            if t > best_t or (t == best_t and r > best):
                best, best_t = r, t
        return best

    def read(self, want_shares: bool = False) -> ExportState:
        with self._lock:
            run = self.current_run()
            if run is None:
                return ExportState(run_id="")
            mtimes = self._dir_mtimes(run)
            newest = max((m for m in mtimes if m is not None), default=0)
            fresh = time.time() - newest / 1e9 < _FRESH_SECONDS
            sig = (run, mtimes)
            if (not fresh and sig == self._signature and self._state is not None
                    and self._state_shares >= want_shares):
                return self._state
            self._state = self._read(run, want_shares)
            self._signature, self._state_shares = sig, want_shares
            return self._state

    # -------------------------------------------------------------- reading
    def _read(self, run: str, want_shares: bool) -> ExportState:
        import chrono
        from ..store import part_files

        con = self._con
        chrono.refresh(con)
        snap = con.sql(
            "SELECT * FROM snapshots WHERE run_id = $run AND layer <> $glob "
            "AND step = (SELECT max(step) FROM snapshots WHERE run_id = $run) ORDER BY layer",
            params={"run": run, "glob": GLOBAL_LAYER}).to_arrow_table().to_pylist()
        snap = _per_layer(snap)
        step = snap[0]["step"] if snap else None
        state = ExportState(run_id=run, snapshot=snap, snapshot_step=step)
        snap_parts = part_files(self.root, "snapshots", run)
        if snap_parts:
            state.snapshot_time = max(os.stat(p).st_mtime for p in snap_parts)
        alerts = con.sql(
            "SELECT layer, alert, arg_max(transition, step) AS last, "
            "count(*) FILTER (WHERE transition = 'raised') AS raised, "
            "count(*) FILTER (WHERE transition = 'cleared') AS cleared "
            "FROM alerts WHERE run_id = $run GROUP BY layer, alert",
            params={"run": run}).to_arrow_table().to_pylist()
        for a in alerts:
            layer = int(a["layer"])
            if a["last"] == "raised":
                state.active_alerts.setdefault(layer, set()).add(a["alert"])
            for t in ("raised", "cleared"):
                if a[t]:
                    state.alert_transitions[(layer, a["alert"], t)] = int(a[t])
        decisions = con.sql(
            "SELECT * FROM decisions WHERE run_id = $run "
            "QUALIFY row_number() OVER (PARTITION BY layer, actuator ORDER BY step DESC) = 1 "
            "ORDER BY layer, actuator", params={"run": run}).to_arrow_table().to_pylist()
        state.decisions = decisions
        state.tokens_routed = self._tokens_routed(run)
        state.rows_stored = self._rows_stored(run)
        if want_shares and snap:
            lo, hi = snap[0]["window_start"], snap[0]["window_end"]
            rows = con.sql(
                "SELECT layer, expert, sum(tokens) AS tokens FROM routing "
                "WHERE run_id = $run AND step BETWEEN $lo AND $hi GROUP BY ALL ORDER BY ALL",
                params={"run": run, "lo": lo, "hi": hi}).to_arrow_table().to_pylist()
            n_by_layer = {int(r["layer"]): int(r["n_experts"]) for r in snap}
            counts: dict[int, list[int]] = {}
            for r in rows:
                layer, e = int(r["layer"]), int(r["expert"])
                n = max(n_by_layer.get(layer, 0), e + 1)
                c = counts.setdefault(layer, [])
                c.extend([0] * (n - len(c)))
                c[e] += int(r["tokens"])
            for layer, n in n_by_layer.items():  # layers idle in the window: all zero
                c = counts.setdefault(layer, [])
                c.extend([0] * (n - len(c)))
            state.expert_counts = counts
        return state

    def _tokens_routed(self, run: str) -> dict[int, int]:
        """Sum of routing.tokens per layer over all current parts, one read per new part."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        from ..store import part_files

        parts = part_files(self.root, "routing", run)
        total: dict[int, int] = {}
        for p in parts:
            sums = self._part_sums.get(p)
            if sums is None:
                t = pq.read_table(p, columns=["layer", "tokens"])
                g = t.group_by("layer").aggregate([("tokens", "sum")])
                sums = dict(zip((int(x) for x in g.column("layer").to_pylist()),
                                (int(x) for x in pc.fill_null(g.column("tokens_sum"), 0).to_pylist())))
                self._part_sums[p] = sums
            for layer, n in sums.items():
                total[layer] = total.get(layer, 0) + n
        keep = set(parts)
        for p in [p for p in self._part_sums if p not in keep]:
            del self._part_sums[p]
        return total

    def _rows_stored(self, run: str) -> dict[str, int]:
        import pyarrow.parquet as pq

        from ..schema import TABLES
        from ..store import part_files

        out = {}
        for table in TABLES:
            n = 0
            for p in part_files(self.root, table, run):
                rows = self._part_rows.get(p)
                if rows is None:
                    rows = self._part_rows[p] = pq.read_metadata(p).num_rows
                n += rows
            out[table] = n
        return out

    def close(self) -> None:
        try:
            self._con.close()
        except Exception:  # already closed
            pass


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


def as_source(source, run: str | None = None):
    """A source object from a probes handle, a source, or a store root path."""
    if hasattr(source, "read") and hasattr(source, "kind"):
        return source
    if isinstance(source, (str, os.PathLike)):
        return StoreSource(source, run=run)
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
        return list(self._families(None, error=False))

    def collect(self):
        with self._lock:  # concurrent scrapes read the source one at a time
            try:
                state = self.source.read(want_shares=self.expert_labels)
                error = False
            except Exception as e:  # a broken source must not break the scrape
                state, error = None, True
                self._read_errors += 1
                kind = type(e).__name__
                if kind not in self._logged_errors:
                    self._logged_errors.add(kind)
                    log.warning("chrono exporter: reading the %s source failed (%s: %s); "
                                "exporting chrono_exporter_source_up 0", self.source.kind, kind, e)
            # families without samples (e.g. live-only counters of a store source) are left out
            return [f for f in self._families(state, error) if f.samples]

    # -------------------------------------------------------------- families
    def _families(self, s: ExportState | None, error: bool):
        up = GaugeMetricFamily("chrono_exporter_source_up",
                               "1 when the last read of the telemetry source succeeded.")
        up.add_metric([], 0.0 if error else 1.0)
        yield up
        errs = CounterMetricFamily("chrono_exporter_read_errors",
                                   "Failed reads of the telemetry source since the exporter started.")
        errs.add_metric([], self._read_errors)
        yield errs

        run = s.run_id if s is not None else ""
        rows = s.snapshot if s is not None else []
        RL = ["run", "layer"]

        for name, col, doc in SNAPSHOT_GAUGES:
            g = GaugeMetricFamily(name, doc, labels=RL)
            for r in rows:
                g.add_metric([run, layer_label(r["layer"])], float(r[col]))
            yield g

        step = GaugeMetricFamily("chrono_snapshot_step", "Training step of the latest snapshot window.",
                                 labels=["run"])
        ts = GaugeMetricFamily("chrono_last_snapshot_timestamp_seconds",
                               "Unix time at which the latest snapshot appeared (staleness alerts).",
                               labels=["run"])
        if s is not None and s.snapshot_step is not None:
            step.add_metric([run], float(s.snapshot_step))
        if s is not None and s.snapshot_time is not None:
            ts.add_metric([run], float(s.snapshot_time))
        yield step
        yield ts

        tokens = CounterMetricFamily("chrono_tokens_routed",
                                     "Token assignments dispatched to experts since the run started.",
                                     labels=RL)
        for layer, n in sorted((s.tokens_routed if s is not None else {}).items()):
            tokens.add_metric([run, layer_label(layer)], float(n))
        yield tokens

        active = GaugeMetricFamily("chrono_alert_active",
                                   "1 while the routing alert is raised for the layer, else 0.",
                                   labels=["run", "layer", "alert"])
        if s is not None:
            layers = sorted({int(r["layer"]) for r in rows} | set(s.active_alerts))
            for layer in layers:
                on = s.active_alerts.get(layer, set())
                for alert in ALERT_TYPES:
                    active.add_metric([run, layer_label(layer), alert], 1.0 if alert in on else 0.0)
        yield active

        trans = CounterMetricFamily("chrono_alert_transitions",
                                    "Alert transitions (raised / cleared) since the run started.",
                                    labels=["run", "layer", "alert", "transition"])
        for (layer, alert, t), n in sorted((s.alert_transitions if s is not None else {}).items()):
            trans.add_metric([run, layer_label(layer), alert, t], float(n))
        yield trans

        decisions = s.decisions if s is not None else []
        DL = ["run", "layer", "actuator"]
        for name, col, doc in DECISION_GAUGES:
            g = GaugeMetricFamily(name, doc, labels=DL)
            for d in decisions:
                v = d.get(col)
                if v is not None:
                    g.add_metric([run, layer_label(d["layer"]), str(d.get("actuator", ""))], float(v))
            yield g

        yield from self._probe_families(s, run)
        if self.expert_labels:
            yield from self._expert_families(s, run)

    def _probe_families(self, s: ExportState | None, run: str):
        def counter(name, doc, value):
            c = CounterMetricFamily(name, doc, labels=["run"])
            if value is not None:
                c.add_metric([run], float(value))
            return c

        live = s if s is not None else ExportState(run_id=run)
        yield counter("chrono_probe_hook_seconds", "Seconds spent inside probe hooks (training thread).",
                      live.hook_seconds)
        yield counter("chrono_probe_steps", "Training steps seen by the probes.", live.steps)
        yield counter("chrono_probe_nonfinite", "Non-finite router values seen by the probes.",
                      live.nonfinite)
        yield counter("chrono_store_write_errors", "Telemetry write failures (training continued).",
                      live.write_errors)
        yield counter("chrono_store_rows_dropped", "Telemetry rows dropped after repeated write failures.",
                      live.rows_dropped)
        written = CounterMetricFamily("chrono_store_rows_written",
                                      "Rows written to the store by this process, per table.",
                                      labels=["run", "table"])
        for table, n in sorted((live.rows_written or {}).items()):
            written.add_metric([run, table], float(n))
        yield written
        stored = GaugeMetricFamily("chrono_store_rows",
                                   "Rows currently stored on disk for the run, per table.",
                                   labels=["run", "table"])
        for table, n in sorted((live.rows_stored or {}).items()):
            stored.add_metric([run, table], float(n))
        yield stored

    def _expert_families(self, s: ExportState | None, run: str):
        g = GaugeMetricFamily("chrono_expert_share",
                              "Share of the layer's tokens routed to the expert in the latest window "
                              "(only with expert_labels=True; capped).",
                              labels=["run", "layer", "expert"])
        capped = GaugeMetricFamily("chrono_expert_share_series_dropped",
                                   "Per-expert series left out by the cardinality cap.", labels=["run"])
        dropped = 0
        emitted = 0
        for layer, counts in sorted(((s.expert_counts or {}) if s is not None else {}).items()):
            total = float(sum(counts))
            for e, c in enumerate(counts):
                if emitted >= self.max_expert_series:
                    dropped += 1
                    continue
                g.add_metric([run, layer_label(layer), str(e)], float(c) / total if total > 0 else 0.0)
                emitted += 1
        if dropped and not self._warned_cap:
            self._warned_cap = True
            log.warning("chrono exporter: %d per-expert series exceed the cap of %d "
                        "(max_expert_series); they are left out: keep expert-level detail in Parquet "
                        "(chrono query) or raise the cap", dropped, self.max_expert_series)
        if s is not None:
            capped.add_metric([run], float(dropped))
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
