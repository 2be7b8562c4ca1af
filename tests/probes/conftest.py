"""Make the probes test helpers (probe_models.py) importable under --import-mode=importlib."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))


import pytest  # noqa: E402

from probes import native  # noqa: E402


def pytest_generate_tests(metafunc):
    """Tests that use the ``backend`` fixture run once per counting backend on CPU: the PyTorch
    ops (the CUDA path) and the C one (``probes.native``); ``@pytest.mark.torch_ops_only`` tests
    (they check the PyTorch ops' own buffers or branches) run with the PyTorch ops only."""
    if "backend" in metafunc.fixturenames:
        only = metafunc.definition.get_closest_marker("torch_ops_only")
        metafunc.parametrize("backend", ["torch_ops"] if only else ["torch_ops", "native"], indirect=True)


def _torch_ops(monkeypatch) -> None:
    monkeypatch.setattr(native, "load", lambda: None)


@pytest.fixture
def torch_ops(monkeypatch):
    """Count with the PyTorch ops on CPU too (``probes.native.load`` returns None)."""
    _torch_ops(monkeypatch)


@pytest.fixture
def backend(request, monkeypatch):
    """The counting backend, ``torch_ops`` or ``native`` (parametrized above). ``native`` fails
    the test when the C module cannot be built (no compiler or Python headers): it is part of
    the product, and CI installs what it needs."""
    if request.param == "torch_ops":
        _torch_ops(monkeypatch)
    else:
        assert native.load() is not None, "probes.native could not build its C module (see the log)"
    return request.param
