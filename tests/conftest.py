"""Shared fixtures and the CI rule for tests that need an external tool.

Locally a test whose tool (chromium, prometheus, ...) is missing is skipped;
in CI (CI=true) it fails instead, so a missing install step cannot hide.
"""
from __future__ import annotations

import os
import shutil
import socket

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(path_or_name: str) -> str:
    """Return the tool's path; skip (locally) or fail (CI) when it is missing."""
    found = path_or_name if os.path.isabs(path_or_name) and os.path.exists(path_or_name) \
        else shutil.which(path_or_name)
    if not found:
        msg = f"{path_or_name} is not installed (.ci/run installs it)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def store_root(tmp_path):
    """An empty store root for one test."""
    root = tmp_path / "store"
    root.mkdir()
    return root
