"""Fixtures of the reliability suite: the fault-injection harness module."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


def load_harness():
    """harness.py, imported once (pytest runs with --import-mode=importlib, so no sibling imports)."""
    mod = sys.modules.get("chrono_reliability_harness")
    if mod is None:
        spec = importlib.util.spec_from_file_location("chrono_reliability_harness",
                                                      Path(__file__).with_name("harness.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def harness():
    return load_harness()
