"""Breaking ``probes.native`` (the C counting path): tensors the C code must not read as plain
memory, checked against the PyTorch ops (``CHRONO_NATIVE=0`` / the ``torch_ops`` fixture) and
against ground truth counted by hand from the test's own router hooks (NumPy), never chrono's.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

from probes import native
from probes.recorder import DROPPED, TOKENS, WEIGHT, Recorder
from probes.routing import Routed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _needs_native():
    if native.load() is None:
        pytest.fail("probes.native could not build its C module (see the log)")


def _fake(*ts):
    from torch._subclasses.fake_tensor import FakeTensorMode
    mode = FakeTensorMode()
    return [mode.from_tensor(t) for t in ts]


def test_describe_refuses_fake_tensors():
    """A FakeTensor reports ``is_cpu`` and contiguous, and its ``data_ptr()`` is 0 (a warning,
    no error): handed to C, the count reads address 0. ``describe`` must refuse it."""
    idx, w, lg = _fake(torch.tensor([[0, 1], [2, 3]]), torch.rand(2, 2), torch.randn(2, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert native.describe(0, Routed(idx, w, None, lg), cells=(1, 1, 1), hold=[]) is None
        assert native.describe(0, Routed(torch.tensor([[0, 1]]), *_fake(torch.rand(1, 2)), None, None),
                               cells=(1, 1, 1), hold=[]) is None
    # a ZeroTensor is a plain CPU tensor whose data pointer is 0 too
    zero = torch._efficientzerotensor(1, 2)
    assert native.describe(0, Routed(torch.tensor([[0, 1]]), zero, None, None), cells=(1, 1, 1), hold=[]) is None


_FAKE_FORWARD = textwrap.dedent("""
    import sys, tempfile, warnings
    import torch, probes
    from torch._subclasses.fake_tensor import FakeTensorMode
    from tests.probes.staging_review import MoE, Router, IDS, stored
    warnings.simplefilter("ignore")
    for name, ctx in [("inference", torch.inference_mode), ("no_grad", torch.no_grad), ("grad", torch.enable_grad)]:
        m = MoE([Router() for _ in range(3)])
        root = tempfile.mkdtemp()
        with probes.attach(m, run="f", root=root, steps="manual", flush_every=1) as h:
            for _ in range(2):            # a probation forward, then staged / counted at once
                with ctx():
                    m(IDS)
            fake = FakeTensorMode(allow_non_fake_inputs=True)
            with fake, ctx():             # e.g. a memory estimate of the attached model
                m(fake.from_tensor(IDS))
            h.step()
        print(name, "TOKENS", sum(n for d in stored(root, "f").values() for n, _ in d.values()), flush=True)
""")


def test_forward_under_fake_tensor_mode_does_not_crash():
    """The attached model run under ``FakeTensorMode`` (shape/memory estimates): every router
    call is a FakeTensor. The PyTorch ops count nothing from it; the C path read address 0
    (SIGSEGV) on every path: counted at once (inference), at the flush (no_grad, grad).
    Ground truth: 2 real forwards x 3 routers x 21 tokens x top-2 = 252 assignments."""
    _needs_native()
    env = {**os.environ, "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-c", _FAKE_FORWARD], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)   # (a child: a SIGSEGV must not kill the test run)
    assert r.returncode == 0, f"rc {r.returncode}: {r.stdout} {r.stderr[-2000:]}"
    assert r.stdout.split("\n")[:3] == [f"{c} TOKENS 252" for c in ("inference", "no_grad", "grad")], r.stdout


def _cells(rec: Recorder) -> np.ndarray:
    """tokens, weight sums and drops of mode 0, slot 0, as a host array."""
    return rec.acc[[TOKENS, WEIGHT, DROPPED], 0, 0].numpy().copy()


def _count_both(routed: Routed) -> tuple:
    """(C path, PyTorch ops) cells after one ``record_plain`` of ``routed`` each."""
    _needs_native()
    out = []
    for use_native in (True, False):
        rec = Recorder(1, 4, 2)
        if not use_native:
            rec.native = None
        rec.record_plain(0, 0, routed)
        out.append(_cells(rec))
    return tuple(out)


def test_negative_view_weights_are_counted_with_their_sign():
    """A tensor with the negative bit (``torch._neg_view``; ``x.conj().imag`` of a complex
    tensor is one) is contiguous and shares its base's memory: the values are the negation of
    what is stored. Truth by hand: weight sum of expert e = - sum of base weights routed to e."""
    idx = torch.tensor([[0, 1], [2, 3], [1, 0]])
    base = torch.tensor([[.5, .25], [.125, .0625], [1., 2.]])
    w = torch._neg_view(base)
    assert w.is_neg() and w.is_contiguous()
    truth = np.zeros(6)
    np.add.at(truth, idx.reshape(-1).numpy() + 1, -base.reshape(-1).numpy())
    c_path, ops = _count_both(Routed(idx, w))
    assert np.array_equal(ops[1], truth)   # (the PyTorch ops: the reference)
    assert np.array_equal(c_path[1], truth)


_LOAD = "from probes import native; fn = native.load(); print('LOADED' if fn is not None else 'NONE')"


def _load_in_child(cache, **env) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k != "CHRONO_NATIVE"}, "PYTHONPATH": ROOT,
           "CHRONO_NATIVE_DIR": str(cache), **env}
    return subprocess.run([sys.executable, "-c", _LOAD], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_a_truncated_cached_module_is_rebuilt_not_loaded(tmp_path, monkeypatch):
    """The cached build cut short (a copy of ~/.cache interrupted, a crash after the rename
    before the data reached the disk): ``load`` must not hand it to the dynamic loader, which
    dies of SIGBUS on it, and keeps dying in every process until the file is deleted by hand."""
    _needs_native()
    monkeypatch.setenv("CHRONO_NATIVE_DIR", str(tmp_path))
    native._build()
    (built,) = [p for p in tmp_path.iterdir() if p.name.startswith(native.MODULE) and p.suffix == ".so"]
    data = built.read_bytes()
    built.write_bytes(data[: len(data) // 2])
    second = _load_in_child(tmp_path)
    assert second.returncode == 0, f"rc {second.returncode}: {second.stderr[-2000:]}"
    assert "LOADED" in second.stdout, second.stderr[-2000:]   # rebuilt, not just disabled


def _load_fresh(monkeypatch, cache, **env):
    """``native.load()`` as a new process would run it (its cached answer cleared), with ``env``."""
    monkeypatch.setattr(native, "_lib", [])
    monkeypatch.setenv("CHRONO_NATIVE_DIR", str(cache))
    monkeypatch.delenv("CHRONO_NATIVE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return native.load()


@pytest.mark.parametrize("case", ["no_compiler", "cache_path_is_a_file", "disabled"])
def test_build_failures_fall_back_to_the_pytorch_ops(tmp_path, monkeypatch, case):
    """No compiler ($CC=/bin/false), a cache path that cannot be a directory, CHRONO_NATIVE=0:
    ``load`` returns None (the PyTorch ops count), nothing raises."""
    (tmp_path / "file").write_text("")
    cache, env = {"no_compiler": (tmp_path / "a", {"CC": "/bin/false"}), "cache_path_is_a_file": (tmp_path / "file", {}),
                  "disabled": (tmp_path / "b", {"CHRONO_NATIVE": "0"})}[case]
    assert _load_fresh(monkeypatch, cache, **env) is None


def test_cc_with_arguments_builds(tmp_path, monkeypatch):
    """``$CC`` may carry arguments (``CC="ccache gcc"``, ``CC="gcc -m64"``: make, setuptools
    and CMake split it); taken as one program name, the build failed and counting silently
    fell back to the PyTorch ops."""
    _needs_native()
    fn = _load_fresh(monkeypatch, tmp_path, CC="cc -pipe")
    assert fn is not None
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".sha256", ".so"]   # built here, with $CC


def test_build_where_fsync_is_refused(tmp_path, monkeypatch):
    """A file system that refuses fsync (some FUSE mounts: EINVAL) still gets its build."""
    _needs_native()

    def refuse(fd):
        raise OSError(22, "Invalid argument")
    monkeypatch.setattr(native.os, "fsync", refuse)
    assert _load_fresh(monkeypatch, tmp_path) is not None


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("use_native", [True, False], ids=["native", "torch_ops"])
def test_the_largest_index_is_out_of_range_on_every_path(dtype, use_native):
    """An index of the dtype's maximum is an index >= capacity like any other: counted invalid
    in the column of too-large indices, so its rows equal those of index ``capacity`` (the C
    path and the staged flush clamp first; the eager PyTorch ops added 1 first, and int
    overflow sent it to the column of negative indices, whose weight cell the non-finite check
    reads: a NaN weight there was flagged by one backend and not the other)."""
    if use_native:
        _needs_native()
    big = torch.iinfo(dtype).max
    rows = []
    for index in (4, big):   # capacity 4: index 4 is the first out of range
        rec = Recorder(1, 4, 2)
        if not use_native:
            rec.native = None
        rec.record_plain(0, 0, Routed(torch.tensor([[0, index]], dtype=dtype), torch.tensor([[0.5, float("nan")]])))
        rows.append(rec.acc.numpy().copy())
    assert np.array_equal(rows[0], rows[1], equal_nan=True)
    assert rows[1][TOKENS, 0, 0, 5] == 1 and rows[1][TOKENS, 0, 0, 0] == 0   # column capacity + 1
