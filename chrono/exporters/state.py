"""What one scrape exports for one run (``ExportState``), the exporter's limits and its errors.

Shared by the sources (``chrono.exporters.sources``) that fill an ExportState
and the collector (``chrono.exporters.collector``) that turns it into metric
families. No Prometheus import here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..schema import GLOBAL_LAYER

DEFAULT_PORT = 9108
DEFAULT_MAX_EXPERT_SERIES = 2048
# Without a pinned run, runs written within this window are exported. 30 min: longer than the
# shipped staleness rule (no snapshot for 15 min, for 5 min), so that alert fires before a
# stalled run's series disappear.
DEFAULT_RECENT_S = 30 * 60.0
DEFAULT_MAX_RUNS = 20  # cardinality guard: at most this many recent runs are exported


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


def opt_int(v):
    return None if v is None else int(v)


def per_layer(rows: list[dict]) -> list[dict]:
    """Per-layer rows (global row dropped), one per layer (ranks may repeat identical rows)."""
    seen, out = set(), []
    for r in rows:
        layer = int(r["layer"])
        if layer == GLOBAL_LAYER or layer in seen:
            continue
        seen.add(layer)
        out.append(r)
    return sorted(out, key=lambda r: int(r["layer"]))


def latest_decisions(rows: list[dict]) -> list[dict]:
    """The latest decision per (layer, actuator)."""
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (int(r["layer"]), str(r.get("actuator", "")))
        if key not in best or int(r["step"]) >= int(best[key]["step"]):
            best[key] = r
    return [best[k] for k in sorted(best)]
