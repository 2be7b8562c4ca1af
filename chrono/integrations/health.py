"""Routing-health values added to a trainer's logs, and their stable names.

One name per metric and layer, shared by both callbacks and by
``chrono export tensorboard``:

======================================  =====================================================
name                                    value
======================================  =====================================================
``chrono/neff/layer_<L>``               effective number of experts, exp(entropy) (DESIGN §4)
``chrono/top2_share/layer_<L>``         share of the two busiest experts, in [0, 1]
``chrono/dead/layer_<L>``               experts that received no token in the window
``chrono/neff/min``                     smallest ``neff`` over layers
``chrono/dead/total``                   ``dead`` summed over layers
``chrono/alerts/active``                active (layer, alert) pairs
``chrono/alerts/<ALERT>``               layers in that alert (PRE_COLLAPSE, COLLAPSE_CONFIRMED)
======================================  =====================================================

Values are over the probes' current window (the optimizer steps since the last
flush; the callbacks default ``flush_every`` to the trainer's logging interval,
so a log covers the steps since the previous log), or the last snapshot when
that window holds no tokens yet. Imports no torch.
"""
from __future__ import annotations

from chrono.schema import ALERT_TYPES

PREFIX = "chrono"
LAYER_METRICS = ("neff", "top2_share", "dead")


def layer_tag(layer) -> str:
    """``layer_<L>``, or ``all`` for the global snapshot row (layer -1)."""
    return "all" if int(layer) < 0 else f"layer_{int(layer)}"


def metric_name(metric: str, layer) -> str:
    """``chrono/<metric>/layer_<L>`` (``.../all`` for layer -1)."""
    return f"{PREFIX}/{metric}/{layer_tag(layer)}"


def _value(v):
    v = v.item() if hasattr(v, "item") else v   # numpy scalars: reporters want plain int/float
    return int(v) if isinstance(v, (int, bool)) else float(v)


def health_from_rows(rows: list[dict], active: dict) -> dict:
    """The log dict from per-layer rows (``{"layer", "neff", "top2_share", "dead", ...}``).

    ``rows``: one per layer (rows with layer < 0 are ignored); ``active``:
    ``{layer: {alert names}}`` as ``Handle.active_alerts()`` returns it. Empty
    dict when there are no rows.
    """
    rows = [r for r in rows if int(r["layer"]) >= 0]
    if not rows:
        return {}
    out = {metric_name(m, r["layer"]): _value(r[m]) for r in rows for m in LAYER_METRICS}
    out[f"{PREFIX}/neff/min"] = min(_value(r["neff"]) for r in rows)
    out[f"{PREFIX}/dead/total"] = sum(_value(r["dead"]) for r in rows)
    out[f"{PREFIX}/alerts/active"] = sum(len(v) for v in active.values())
    for a in ALERT_TYPES:
        out[f"{PREFIX}/alerts/{a}"] = sum(1 for v in active.values() if a in v)
    return out


def handle_health(h) -> dict:
    """Health of a probes ``Handle`` now: its live window, else its latest snapshot."""
    rows = [dict(layer=layer, **m.as_dict()) for layer, m in h.metrics().items()]
    if not any(int(r["token_count"]) for r in rows):
        rows = h.latest_snapshot()
    return health_from_rows(rows, h.active_alerts())
