"""chrono.integrations finds probes through the ``chrono.attach`` entry point, never by importing it."""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from chrono.integrations import common

REPO = Path(__file__).resolve().parents[2]


def test_the_installed_entry_point_is_probes_attach():
    import probes

    assert common.find_attacher() is probes.attach
    assert issubclass(probes.ProbeError, common.AttachError)   # the soft failure the callbacks log


def test_pyproject_declares_the_entry_point_the_core_looks_up():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["entry-points"][common.ATTACH_GROUP] == {"probes": "probes:attach"}
    assert project["scripts"]["chrono"] == "chrono_cli.main:main"


def test_no_attacher_installed_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: [])
    with pytest.raises(ImportError, match="chrono.attach.*none is installed") as e:
        common.find_attacher()
    assert "\n" not in str(e.value)


def test_an_explicit_attacher_is_used_and_an_attach_error_is_the_soft_one(tmp_path):
    import torch

    calls, model = [], torch.nn.Linear(2, 2)

    def attach(model, **kw):
        calls.append((model, kw["run"], kw["steps"]))
        raise ValueError("not a probes failure")

    s = common.Session()
    with pytest.raises(ValueError):   # an error that is not an AttachError propagates
        s.start(model, "r", tmp_path, 0, 0.0, 10, attach=attach)
    assert calls == [(model, "r", "manual")]

    def refusing(model, **kw):
        raise common.AttachError("no router in this model")

    assert s.start(model, "r", tmp_path, 0, 0.0, 10, attach=refusing) is False   # soft: one log line
    with pytest.raises(common.AttachError):
        s.start(model, "r", tmp_path, 0, 0.0, 10, attach=refusing, strict=True)


def test_a_probe_error_is_one_log_line_unless_strict(tmp_path, caplog):
    import torch

    import probes

    dense = torch.nn.Sequential(torch.nn.Linear(4, 4))   # no router: probes raises ProbeError
    s = common.Session()
    assert s.start(dense, "r", tmp_path, 0, 0.0, 10) is False
    assert "not recording routing" in caplog.text
    with pytest.raises(probes.ProbeError):
        s.start(dense, "r", tmp_path, 0, 0.0, 10, strict=True)


def test_the_integrations_import_no_probes():
    code = ("import sys, chrono.integrations.common, chrono.integrations.health\n"
            "assert 'probes' not in sys.modules, 'probes imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
