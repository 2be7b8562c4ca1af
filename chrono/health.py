"""Run health at a glance: OK / PRE_COLLAPSE / COLLAPSE_CONFIRMED from the active alerts.

A run's status is its most severe *active* alert (raised and not cleared since)
over all layers; the *worst layer* is the layer holding that alert, and among
several such layers the one with the lowest Neff / n in its latest snapshot
(the values at the raising snapshot when it has none; ties: the lowest layer). Alerts and their rules: ``chrono.snapshots``.
Used by the CLI (``chrono runs``, ``chrono show``) and the dashboard's Runs
table, so both say the same thing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

OK = "OK"
SEVERITY = {OK: 0, "PRE_COLLAPSE": 1, "COLLAPSE_CONFIRMED": 2}  # higher = worse
STATUSES = tuple(sorted(SEVERITY, key=SEVERITY.get))  # ("OK", "PRE_COLLAPSE", "COLLAPSE_CONFIRMED")

# Active alerts per (run, layer, alert): the last transition is 'raised'. neff .. dead are the
# values of the raising snapshot, neff_now / n_now those of the layer's latest snapshot.
# Identical rows from several ranks collapse in the GROUP BY.
ACTIVE_ALERTS_SQL = """
WITH a AS (
    SELECT run_id, layer, alert, max(step) AS step, arg_max(transition, step) AS last,
           arg_max(neff, step) AS neff, arg_max(n_experts, step) AS n_experts,
           arg_max(top2_share, step) AS top2_share, arg_max(dead, step) AS dead
    FROM alerts WHERE layer >= 0 GROUP BY run_id, layer, alert),
s AS (
    SELECT run_id, layer, arg_max(neff, step) AS neff_now, arg_max(n_experts, step) AS n_now
    FROM snapshots WHERE layer >= 0 AND run_id IN (SELECT run_id FROM a WHERE last = 'raised')
    GROUP BY run_id, layer)
SELECT a.run_id, a.layer, a.alert, a.step, a.neff, a.n_experts, a.top2_share, a.dead, s.neff_now, s.n_now
FROM a LEFT JOIN s USING (run_id, layer)
WHERE a.last = 'raised'
ORDER BY a.run_id, a.layer, a.alert
"""


@dataclass(frozen=True)
class Health:
    """One run's status: ``status`` in STATUSES, ``worst_layer`` (None when OK), ``active`` alerts."""

    status: str = OK
    worst_layer: int | None = None
    active: tuple = field(default_factory=tuple)  # ((layer, alert), ...) sorted

    @property
    def severity(self) -> int:
        return SEVERITY[self.status]

    def label(self) -> str:
        """'OK', or e.g. 'COLLAPSE_CONFIRMED (layer 3, 4 layers alerting)'."""
        if self.status == OK:
            return OK
        layers = len({l for l, _ in self.active})
        more = f", {layers} layers alerting" if layers > 1 else ""
        return f"{self.status} (layer {self.worst_layer}{more})"


def health_of(rows) -> dict[str, Health]:
    """{run_id: Health} from rows of ``ACTIVE_ALERTS_SQL`` (dicts). Runs without rows are OK."""
    by_run: dict[str, list[dict]] = {}
    for r in rows:
        by_run.setdefault(str(r["run_id"]), []).append(r)
    out = {}
    for run, rs in by_run.items():
        def rank(r):
            neff, n = _num(r.get("neff_now")), _num(r.get("n_now"))
            if neff is None or not n:
                neff, n = _num(r.get("neff")), _num(r.get("n_experts"))
            frac = neff / n if neff is not None and n else 1.0
            return (-SEVERITY.get(r["alert"], 0), frac, int(r["layer"]))

        worst = min(rs, key=rank)
        out[run] = Health(status=worst["alert"], worst_layer=int(worst["layer"]),
                          active=tuple(sorted((int(r["layer"]), r["alert"]) for r in rs)))
    return out


def _num(v) -> float | None:
    """A float, or None for None / NaN (a LEFT JOIN miss read through pandas)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if f != f else f


def run_health(con, run: str | None = None) -> dict[str, Health]:
    """{run_id: Health} read through a ``chrono.connect`` connection (one run, or all with alerts)."""
    rel = con.execute(ACTIVE_ALERTS_SQL)
    cols = [d[0] for d in rel.description]
    rows = [dict(zip(cols, t)) for t in rel.fetchall()]
    if run is not None:
        rows = [r for r in rows if r["run_id"] == run]
    return health_of(rows)
