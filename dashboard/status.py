"""Alert state over time, as the pages draw it: active periods and the layer x step health strip.

Pure pandas (no Streamlit), so the rules are unit-tested. The status words and
their order come from ``chrono.health`` (OK < PRE_COLLAPSE < COLLAPSE_CONFIRMED),
the same words the CLI prints.
"""
from __future__ import annotations

import pandas as pd

from chrono.health import OK, SEVERITY, STATUSES

# Colours: alerts only ever get these; OK is a quiet grey, never green/red noise.
STATUS_COLORS = {OK: "#d9d9d9", "PRE_COLLAPSE": "#f28e2b", "COLLAPSE_CONFIRMED": "#d62728"}
STATUS_TEXT = {OK: "#1b5e20", "PRE_COLLAPSE": "#8a4b00", "COLLAPSE_CONFIRMED": "#9b1111"}


def health_cell_styles(col) -> list[str]:
    """CSS per cell of a health column (pandas ``Styler.apply``): alert colours for alerts, grey for OK."""
    return [f"background-color: {STATUS_COLORS[v]}33; color: {STATUS_TEXT[v]}; font-weight: 600"
            if v in STATUS_COLORS else "" for v in col]


def active_spans(alerts: pd.DataFrame, last_step: int) -> pd.DataFrame:
    """One row per period an alert was active: ``[start, end]`` = raised step, cleared step or last step.

    ``alerts``: rows of the alerts table (step, layer, alert, transition) in step order.
    ``open`` is True for a period still active at ``last_step``.
    """
    spans, open_ = [], {}
    for r in alerts.sort_values("step", kind="stable").itertuples(index=False):
        key = (int(r.layer), r.alert)
        if r.transition == "raised":
            open_.setdefault(key, int(r.step))
        elif key in open_:
            spans.append({"layer": key[0], "alert": r.alert, "start": open_.pop(key), "end": int(r.step),
                          "open": False})
    for (layer, alert), start in open_.items():
        spans.append({"layer": layer, "alert": alert, "start": start, "end": max(int(last_step), start),
                      "open": True})
    return pd.DataFrame(spans, columns=["layer", "alert", "start", "end", "open"])


def state_strip(windows: pd.DataFrame, spans: pd.DataFrame) -> pd.DataFrame:
    """The worst alert state of each (layer, step bin): the layer x step health strip.

    ``windows``: one row per (layer, bin) with ``layer``, ``step_start``, ``step_end`` (inclusive
    bounds of the snapshot steps the bin covers). A bin is COLLAPSE_CONFIRMED / PRE_COLLAPSE if such
    an alert of that layer was active at any snapshot step in it (active from the raising snapshot
    up to, not including, the clearing one), else OK. Adds ``status`` and ``severity`` columns.
    """
    out = windows.copy()
    sev = [0] * len(out)
    if not spans.empty and not out.empty:
        by_layer = {l: g for l, g in spans.groupby("layer")}
        for i, (layer, lo, hi) in enumerate(zip(out["layer"], out["step_start"], out["step_end"])):
            g = by_layer.get(int(layer))
            if g is None:
                continue
            # active on [start, end) for cleared periods, [start, end] for open ones
            end = g["end"].where(g["open"], g["end"] - 1)
            hit = g[(g["start"] <= hi) & (end >= lo)]
            if len(hit):
                sev[i] = max(SEVERITY[a] for a in hit["alert"])
    out["severity"] = sev
    out["status"] = [STATUSES[s] for s in sev]
    return out


def decision_spans(binned: pd.DataFrame) -> pd.DataFrame:
    """Give each binned decision row the steps it governed: ``[step_start, next bin's step_start)``.

    A decision is taken at a snapshot and holds until the next one of that layer; the last bin of a
    layer extends by the layer's median gap between bins (1 step when it has a single bin).
    ``binned``: rows with layer, step_start, step. Adds ``step_end``.
    """
    out = binned.sort_values(["layer", "step_start"]).copy()
    nxt = out.groupby("layer")["step_start"].shift(-1)
    gap = out.groupby("layer")["step_start"].transform(lambda s: s.diff().median() if len(s) > 1 else 1)
    out["step_end"] = nxt.fillna(out["step"] + gap.fillna(1).clip(lower=1))
    return out
