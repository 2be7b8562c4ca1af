"""chrono dashboard entry point: navigation and sidebar only; each page is a file in views/.

Start it with ``chrono dashboard [--root DIR] [--port P]`` (binds 127.0.0.1).
The store location comes from ``$CHRONO_ROOT`` (default ``./chrono_runs``).
"""
from __future__ import annotations

import sys
from pathlib import Path

# `streamlit run` puts this file's directory on sys.path; the repository root is what
# makes `import dashboard` / `import chrono` resolve to the code next to this file.
_REPO = str(Path(__file__).resolve().parents[1])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import streamlit as st  # noqa: E402

from dashboard import data, ui  # noqa: E402

PAGES = [
    ("views/runs.py", "Runs", ":material/list:"),
    ("views/routing.py", "Routing", ":material/grid_on:"),
    ("views/health.py", "Health", ":material/monitor_heart:"),
    ("views/alerts.py", "Alerts", ":material/notifications:"),
    ("views/governance.py", "Governance", ":material/tune:"),
    ("views/specialization.py", "Specialization", ":material/hub:"),
    ("views/lifecycle.py", "Lifecycle & workloads", ":material/timeline:"),
    ("views/sql.py", "SQL", ":material/terminal:"),
]

st.set_page_config(page_title="chrono", page_icon=":material/hub:", layout="wide")

run_ids = data.run_ids()
if run_ids:
    nav = st.navigation([st.Page(path, title=title, icon=icon) for path, title, icon in PAGES])
else:
    nav = st.navigation([st.Page(ui.welcome, title="Welcome", icon=":material/waving_hand:",
                                 url_path="welcome")])
ui.sidebar(run_ids)
ui.missing_note()
nav.run()
