"""The custom collector: chrono's metric families, built from a source at each scrape.

Style of prometheus client_python's custom collectors (DESIGN §7): nothing is
updated on the hot path; ``ChronoCollector.collect()`` reads its source
(``chrono.exporters.sources``) when Prometheus scrapes and yields fresh
families. Per-layer series carry labels ``run`` and ``layer``; the store's
global row (layer -1) is not exported as a layer, so ``sum``/``avg`` over
layers stay meaningful. Per-expert shares only with ``expert_labels=True``,
capped at ``max_expert_series`` series over all runs.
"""
from __future__ import annotations

import logging
import threading

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..schema import ALERT_TYPES
from .sources import as_source
from .state import DEFAULT_MAX_EXPERT_SERIES, ExporterError, ExportState, layer_label

log = logging.getLogger("chrono.exporters.prometheus")

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
    ("chrono_controller_pressure", "pressure",
     "Controller pressure, what the actuators consume: the EMA of topology debt (faithful policy) or the "
     "PI effort u in [0, 1] (setpoint policy)."),
    ("chrono_controller_heat", "heat",
     "Controller heat clip(pressure, 0, 1): equals pressure while pressure is in [0, 1] (always under the "
     "ChronoMoE policy, as debt is), kept as its own series because the temperature actuator consumes "
     "heat (T = 1 + (t_max - 1) * heat) where lenses consume pressure."),
    ("chrono_controller_forgetting", "forgetting", "Controller forgetting rate 0.02 + 0.10 * pressure."),
    ("chrono_lens_scale", "lens_scale", "Scale applied to the layer's routing lens."),
    ("chrono_controller_backoff", "backoff", "Harm-guard backoff multiplier of the lens scale."),
    ("chrono_controller_abstaining", "abstain", "1 when the controller abstained at its latest decision."),
)



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
