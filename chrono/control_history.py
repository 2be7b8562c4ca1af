"""Which snapshot windows a run's controller has seen, read back from the store.

A governed run has one controller, from the first window after ``chrono.govern`` was
first called on it to the run's end, across re-attaches: ``govern`` on a resumed run
(or again on a handle whose governor was removed) continues that controller instead of
starting a fresh one. So the controller's state at any window is a pure function of
the run's snapshot windows from its **first stored decision** on, which is what
``chrono replay`` feeds a fresh controller, and what ``govern`` feeds one to warm-start
on a resumed run. Windows in that stretch during which no governor was attached (after
``gov.remove()``, between sessions) still update the controller's state but have no
stored decision. Imports no torch.
"""
from __future__ import annotations

from .snapshots import windows


def governed_windows(snapshot_rows: list[dict], first_decision_step: int | None) -> list[list[dict]]:
    """The run's snapshot windows (rows of one ``step`` each, step order) from
    ``first_decision_step`` on; none when the run has no stored decision (None)."""
    if first_decision_step is None:
        return []
    return [w for w in windows(snapshot_rows) if int(w[0]["step"]) >= int(first_decision_step)]


def stored_history(root, run: str) -> tuple[int | None, list[list[dict]]]:
    """``(first decision step, governed windows)`` of ``run`` as stored under ``root``
    ((None, []) for a run never governed). Reads the ``decisions`` and ``snapshots`` views."""
    from .reader import connect

    con = connect(root, tables=("snapshots", "decisions"))
    try:
        ((first,),) = con.execute("SELECT min(step) FROM decisions WHERE run_id = ?", [run]).fetchall()
        if first is None:
            return None, []
        rows = con.sql("SELECT * FROM snapshots WHERE run_id = ? AND step >= ? ORDER BY step, layer",
                       params=[run, int(first)]).to_arrow_table().to_pylist()
    finally:
        con.close()
    return int(first), governed_windows(rows, first)
