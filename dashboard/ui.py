"""Pieces every page shares: the selected run, live refresh, and the empty-store page."""
from __future__ import annotations

from datetime import timedelta

import streamlit as st

from dashboard import data

LIVE_INTERVALS = {"2 s": 2, "5 s": 5, "10 s": 10, "30 s": 30}


def sidebar(run_ids: list[str]) -> None:
    """Run picker (also read from ``?run=``), live-refresh controls, store location."""
    with st.sidebar:
        if run_ids:
            wanted = st.query_params.get("run")
            if "run" not in st.session_state or st.session_state["run"] not in run_ids:
                st.session_state["run"] = wanted if wanted in run_ids else run_ids[0]
            st.selectbox("Run", run_ids, key="run", help="Newest first. Pages show this run.")
            st.query_params["run"] = st.session_state["run"]
        st.toggle("Live refresh", value=True, key="live",
                  help="Re-read the store on a timer; new part files appear without reloading.")
        st.selectbox("Every", list(LIVE_INTERVALS), index=1, key="live_every",
                     disabled=not st.session_state.get("live", True))
        if st.button("Reload now", help="Forget cached results and rebuild the views"):
            data.reload()
        st.caption(f"Store: `{data.store_root()}`")


def selected_run() -> str | None:
    return st.session_state.get("run")


def live_interval() -> timedelta | None:
    if not st.session_state.get("live", True):
        return None
    return timedelta(seconds=LIVE_INTERVALS.get(st.session_state.get("live_every", "5 s"), 5))


def live(fn):
    """Run ``fn`` as a fragment that re-runs itself on the live interval.

    Cached loaders key on the run's data version, so a tick with no new
    parts costs a few ``stat`` calls and re-sends cached charts.
    """
    return st.fragment(fn, run_every=live_interval())


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
        if data._fingerprint(root):
            data.reload()
            st.rerun(scope="app")

    _watch()


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
