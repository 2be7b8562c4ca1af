"""Telemetry faults: counted, logged once per kind, never raised into training (DESIGN §5).

Counter keys: ``steps`` (steps ended), ``nonfinite``, ``invalid``, ``padding_excluded``,
``faults``, ``callback_errors``; ``h.stats()`` reports them.
"""
from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger("probes")


class Faults:
    def __init__(self):
        self.counters: Counter = Counter()
        self._logged: set[str] = set()

    def first(self, key: str) -> bool:
        """True the first time ``key`` is seen (log it then, count it always)."""
        if key in self._logged:
            return False
        self._logged.add(key)
        return True

    def fault(self, where: str, e: BaseException) -> None:
        """A telemetry step failed: count it, log the first of its kind."""
        self.counters["faults"] += 1
        if self.first(f"{where}:{type(e).__name__}"):
            log.error("probes: telemetry fault in %s (%s: %s); training continues", where,
                      type(e).__name__, e)

    def warn_once(self, key: str, msg: str, *args) -> None:
        if self.first(key):
            log.warning(msg, *args)
