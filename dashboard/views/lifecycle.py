"""Lifecycle & workloads: expert spawn / prune / split / merge events and workload signals."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import charts, data, ui

st.title("Lifecycle & workloads")
run = ui.need_run()

# Signals drawn together on one chart, with the unit of their axis (DESIGN §9 names).
GROUPS = [
    ("Loss", ("loss", "val_loss"), "loss (nats)", None, None),
    ("Accuracy", ("accuracy", "teacher_agreement"), "fraction", ".0%", [0, 1]),
    ("VAR tiers", ("var.expensive_fraction", "var.fast_fraction", "var.cache_hit_rate"),
     "fraction of tokens", ".0%", [0, 1]),
    ("Astarte null channel", ("astarte.null_norm",), "L2 norm", None, None),
]


def signal_groups(names: list[str]) -> list[tuple[str, list[str], str, str | None, list | None]]:
    """Known signals in their groups, then the others grouped by dotted prefix."""
    out, seen = [], set()
    for title, members, y_title, fmt, dom in GROUPS:
        present = [n for n in members if n in names]
        if present:
            out.append((title, present, y_title, fmt, dom))
            seen.update(present)
    rest: dict[str, list[str]] = {}
    for n in names:
        if n not in seen:
            rest.setdefault(n.split(".", 1)[0] if "." in n else n, []).append(n)
    out.extend((prefix, members, "value", None, None) for prefix, members in sorted(rest.items()))
    return out


@ui.live
def body():
    events = data.query(data.LIFECYCLE_SQL, run=run)
    st.subheader("Expert lifecycle")
    if events.empty:
        ui.empty_note("lifecycle events", "Spawn / prune / clone / split / merge events are logged when the "
                      "lifecycle policy runs (`lifecycle` table).")
    else:
        counts = events.groupby(["event", "applied"]).size().reset_index(name="n")
        c = st.columns(max(1, min(6, counts["event"].nunique())))
        for i, (event, grp) in enumerate(counts.groupby("event")):
            applied = int(grp.loc[grp["applied"], "n"].sum())
            c[i % len(c)].metric(event, applied, help=f"applied; {int(grp['n'].sum()) - applied} proposed only")
        left, right = st.columns(2)
        left.altair_chart(charts.lifecycle_events(events), width="stretch")
        right.altair_chart(charts.experts_over_time(events[events["applied"]]), width="stretch")
        shown = events.copy()
        for col in ("expert", "source_expert", "n_experts_after"):  # no literal "None" cells
            shown[col] = [ui.fmt_int(v) if pd.notna(v) else "–" for v in shown[col]]
        st.dataframe(shown, hide_index=True)

    st.subheader("Workload signals")
    names_df = data.query(data.SIGNAL_NAMES_SQL, run=run)
    if names_df.empty:
        ui.empty_note("signals", "Workloads log them with `writer.log_signal(step, name, value)` "
                      "(loss, accuracy, var.*, astarte.null_norm, ...).")
        return
    names = list(names_df["name"])
    chosen = st.multiselect("Signals", names, default=names[: min(12, len(names))], key="signal_names")
    if not chosen:
        return
    sig = data.query(data.SIGNALS_SQL, run=run, names=chosen, budget=data.LINE_POINTS)
    sig["series"] = [n if pd.isna(l) else f"{n} · layer {int(l)}"
                     for n, l in zip(sig["name"], sig["layer"])]
    groups = signal_groups(chosen)
    cols = st.columns(2)
    for i, (title, members, y_title, fmt, dom) in enumerate(groups):
        part = sig[sig["name"].isin(members)]
        cols[i % 2].altair_chart(charts.multi_line(part, "value", "series", title, y_title, "signal",
                                                   y_format=fmt, y_domain=dom), width="stretch")
    st.caption("Signals with many points are averaged to about "
               f"{data.LINE_POINTS} points per series.")
    st.dataframe(names_df, hide_index=True)


body()
