"""The contract between a live routing source (a ``probes.Handle``) and the exporter.

A checked ``typing.Protocol``: the exporter refuses an object that lacks a
member instead of exporting less in silence, and the tests assert that the
real ``probes.Handle`` satisfies it (``isinstance(handle, LiveRouting)``).
Defined here, in the core, so the exporter never imports probes.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

MEMBERS = ("run_id", "latest_snapshot", "active_alerts", "alert_transitions", "latest_decisions",
           "stats", "latest_expert_counts")


@runtime_checkable
class LiveRouting(Protocol):
    run_id: str

    def latest_snapshot(self) -> list[dict]:
        """Snapshot rows (schema ``snapshots``) of the latest closed window."""

    def active_alerts(self) -> dict:
        """``{layer: {alert type, ...}}`` currently raised."""

    def alert_transitions(self) -> dict:
        """``{(layer, alert, transition): count}`` since attach."""

    def latest_decisions(self) -> list[dict]:
        """Controller decision rows (schema ``decisions``) of the latest window."""

    def stats(self) -> dict:
        """Counters: steps, tokens_total, hook_seconds, rows_written, write_errors, ..."""

    def latest_expert_counts(self) -> dict:
        """``{layer: [tokens per expert]}`` of the latest closed window (int, length n_experts)."""


def missing_members(obj) -> list[str]:
    """Members of ``LiveRouting`` that ``obj`` lacks (attributes, or methods that are not callable)."""
    out = []
    for m in MEMBERS:
        v = getattr(obj, m, None)
        if v is None or (m != "run_id" and not callable(v)):
            out.append(m)
    return out
