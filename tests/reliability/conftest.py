"""Fixtures of the reliability suite: the fault-injection harness module."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


def load_sibling(name: str):
    """tests/reliability/<name>.py, imported once (pytest runs with --import-mode=importlib,
    so test modules cannot import their siblings)."""
    key = f"chrono_reliability_{name}"
    mod = sys.modules.get(key)
    if mod is None:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).with_name(f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def harness():
    return load_sibling("harness")


@pytest.fixture(scope="session")
def moe_tiny():
    return load_sibling("moe_tiny")
