"""Routing analytics over a chrono store (pure: DuckDB / NumPy, no torch).

Every analysis takes a ``chrono.connect(root)`` connection and a :class:`Scope`
(run, half-open step range, optional layer and mode) and returns an
:class:`AnalysisResult` (rows as an Arrow table, a summary dict, the table it
needs, notes). See docs/analysis.md.

=============== ======================================== ==========================
kind            question                                  needs
=============== ======================================== ==========================
coactivation    which experts are picked together (lift) tokens (top-k > 1)
vocabulary      which token ids each expert gets          tokens with token_id
transitions     P(expert at l+1 | expert at l)            tokens at consecutive layers
drift           how routing moved between step ranges    routing (+ tokens)
loads           tokens-per-expert percentiles             routing
=============== ======================================== ==========================

The expert placement planner is :mod:`chrono.analysis.placement`.
"""
from __future__ import annotations

from .base import AnalysisError, AnalysisResult, Scope, parse_steps
from .coactivation import coactivation
from .drift import drift
from .loads import loads
from .transitions import transitions
from .vocabulary import vocabulary

KINDS = {
    "coactivation": coactivation,
    "vocabulary": vocabulary,
    "transitions": transitions,
    "drift": drift,
    "loads": loads,
}


def analyze(con, kind: str, scope: Scope, **options) -> AnalysisResult:
    """Run analysis ``kind`` (a key of KINDS) with its keyword options; AnalysisError if unknown."""
    try:
        fn = KINDS[kind]
    except KeyError:
        raise AnalysisError(f"unknown analysis {kind!r}; kinds: {', '.join(KINDS)}") from None
    return fn(con, scope, **options)


__all__ = ["KINDS", "AnalysisError", "AnalysisResult", "Scope", "analyze", "parse_steps",
           "coactivation", "vocabulary", "transitions", "drift", "loads"]
