"""Pieces every page shares: the selected run, live refresh, and the empty-store page."""
from __future__ import annotations

import re
from datetime import timedelta

import streamlit as st

from chrono.store import store_note
from dashboard import data

LIVE_INTERVALS = {"2 s": 2, "5 s": 5, "10 s": 10, "30 s": 30}


def _picked():
    st.session_state.pop("missing_run", None)  # the user chose a run: the note has done its job


def sidebar(run_ids: list[str]) -> None:
    """Run picker (also read from ``?run=``), live-refresh controls, store location.

    A ``?run=`` that names no run in the store, or a selected run that disappeared,
    is said so on the page (``missing_note``) instead of silently showing another run.
    Live pages re-run the whole app when the list of runs changes (``live``), so the
    picker offers a run as soon as it is recorded.
    """
    with st.sidebar:
        if run_ids:
            wanted = st.query_params.get("run")
            current = st.session_state.get("run")
            if current is None or current not in run_ids:
                gone = current if current is not None else wanted
                if gone and gone not in run_ids:
                    st.session_state["missing_run"] = (gone, "vanished" if current is not None else "link")
                st.session_state["run"] = wanted if wanted in run_ids else run_ids[0]
            st.selectbox("Run", run_ids, key="run", help="Newest first. Pages show this run.",
                         on_change=_picked)
            st.query_params["run"] = st.session_state["run"]
        st.session_state["_picker_runs"] = list(run_ids)
        st.toggle("Live refresh", value=True, key="live",
                  help="Re-read the store on a timer; new part files appear without reloading.")
        st.selectbox("Every", list(LIVE_INTERVALS), index=1, key="live_every",
                     disabled=not st.session_state.get("live", True))
        if st.button("Reload now", help="Forget cached results and rebuild the views"):
            data.reload()
        st.caption(f"Store: `{data.store_root()}`")


def missing_note() -> None:
    """A warning on the page when the requested run is not in the store (until a run is picked)."""
    missing = st.session_state.get("missing_run")
    if not missing or not st.session_state.get("run"):
        return
    name, why = missing
    what = ("is no longer in the store" if why == "vanished"
            else f"from the link (?run={name}) is not in the store at `{data.store_root()}`")
    st.warning(f"Run **{name}** {what}; showing **{st.session_state['run']}** instead. "
               "Pick a run in the sidebar.", icon=":material/warning:")


def selected_run() -> str | None:
    return st.session_state.get("run")


def live_interval() -> timedelta | None:
    if not st.session_state.get("live", True):
        return None
    return timedelta(seconds=LIVE_INTERVALS.get(st.session_state.get("live_every", "5 s"), 5))


def live(fn):
    """Run ``fn`` as a fragment that re-runs itself on the live interval.

    Cached loaders key on the run's data version, so a tick with no new
    parts costs a few ``stat`` calls and re-sends cached charts. When the
    store's list of runs changed since the sidebar was drawn, the tick re-runs
    the whole app instead, so the run picker is never behind the pages.
    """
    def tick():
        if data.run_set() != set(st.session_state.get("_picker_runs") or ()):
            st.rerun(scope="app")
        fn()

    tick.__name__ = getattr(fn, "__name__", "tick")
    return st.fragment(tick, run_every=live_interval())


def need_run() -> str:
    """The selected run, or stop the page with a hint (only reachable via a stale URL)."""
    run = selected_run()
    if not run:
        st.info("Pick a run in the sidebar.")
        st.stop()
    note = data.invalid_note(run)
    if note:
        st.warning(note)
    return run


def empty_note(what: str, how: str) -> None:
    st.info(f"**No {what} for this run yet.** {how}")


def welcome() -> None:
    """Shown instead of the pages while the store has no runs."""
    root = data.store_root()
    st.title("chrono")
    st.subheader("No runs yet: record your first run")
    st.markdown(
        f"The dashboard reads the store at `{root}` and found no runs there "
        f"({'the directory does not exist yet' if not root.exists() else 'it holds no run directories'}). "
        "Record one of these ways; this page notices the new run by itself.")
    note = store_note(root) if root.exists() else None
    if note is not None:   # e.g. the parent of a store: say which store it holds
        st.warning(f"{note}: `chrono --root DIR dashboard` with the store's directory.",
                   icon=":material/warning:")
    st.markdown("**1. A synthetic demo run** (no model, a few seconds):")
    st.code(f"chrono --root {root} demo --no-serve", language="bash")
    st.markdown("**2. Your own MoE model**: wrap the training loop with the probes.")
    st.code(
        "import probes\n\n"
        f"with probes.attach(model, run=\"exp1\", root=\"{root}\", flush_every=50) as h:\n"
        "    for batch in loader:\n"
        "        loss = model(**batch).loss\n"
        "        loss.backward(); opt.step(); opt.zero_grad()\n"
        "        h.step()",
        language="python")
    st.markdown("**3. Any counts you already have**, through the store API:")
    st.code(
        "import chrono, numpy as np\n\n"
        f"with chrono.open_run(\"{root}\", \"exp1\", model={{\"name\": \"my-moe\"}}) as w:\n"
        "    w.log_routing(step=0, layer=0, counts=np.array([120, 80, 40, 16]))",
        language="python")
    st.caption("Start the dashboard on another store with `chrono dashboard --root DIR` "
               "or the CHRONO_ROOT environment variable.")

    @st.fragment(run_every=timedelta(seconds=3))
    def _watch():
        data.get_store().sync(force=True)
        if data.run_set():
            data.reload()
            st.rerun(scope="app")

    _watch()


def delta(d, fmt, up_is_bad: bool = False) -> dict:
    """Keyword arguments of ``st.metric`` for a change ``d`` shown as ``fmt(d)``.

    A change that shows as zero ('+0', '+0.0 pp') is neutral: grey, no arrow, 'no change'.
    ``up_is_bad``: a rise is coloured red (dead experts, Top-2 share), a fall green.
    """
    if d is None or d != d:  # None or NaN: nothing to compare with
        return {}
    text = fmt(d)
    if not re.sub(r"[^1-9]", "", text):
        return {"delta": "no change", "delta_color": "off", "delta_arrow": "off"}
    return {"delta": text, "delta_color": "inverse" if up_is_bad else "normal"}


def fmt_int(v) -> str:
    try:
        return f"{int(v):,}"
    except (TypeError, ValueError):
        return "–"


def fmt_float(v, digits: int = 3) -> str:
    try:
        return f"{float(v):.{digits}f}"
    except (TypeError, ValueError):
        return "–"
