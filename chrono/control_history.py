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

The decisions' JSONL mirror (``control_decisions.jsonl``) is written when a window is decided,
before its rows reach the store on the background writer: a process killed in between leaves
mirror lines with no stored decision (a later session redoes that window and would write them
twice). ``reconcile_mirror`` brings the mirror back to the stored decisions when a new session
governs the run; ``chrono replay`` notes (does not compare) such lines after the last stored
decision.
"""
from __future__ import annotations

import json

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


def reconcile_mirror(root, run: str, path) -> int:
    """Rewrite the JSONL mirror ``path`` of ``run`` to the decisions stored under ``root``:
    for each stored (step, layer) its last line is kept, lines of other keys (a killed
    process's unwritten window, or one a resume redid) are dropped. Lines that are not JSON
    objects with ``step`` and ``layer`` are kept (replay reports them). Returns the number of
    lines dropped (the file is replaced atomically only when it changes)."""
    from pathlib import Path

    from .reader import connect
    from .store.layout import atomic_write_bytes

    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return 0
    con = connect(root, tables=("decisions",))
    try:
        stored = set(con.execute("SELECT step, layer FROM decisions WHERE run_id = ?", [run]).fetchall())
    finally:
        con.close()
    keyed = []
    for line in lines:
        try:
            rec = json.loads(line)
            keyed.append((int(rec["step"]), int(rec["layer"])))
        except (ValueError, KeyError, TypeError, AttributeError):
            keyed.append(None)
    last = {k: i for i, k in enumerate(keyed) if k is not None}
    kept = [line for i, (line, k) in enumerate(zip(lines, keyed))
            if k is None or (k in stored and last[k] == i)]
    if len(kept) != len(lines):
        atomic_write_bytes(path, ("\n".join(kept) + ("\n" if kept else "")).encode())
    return len(lines) - len(kept)
