"""probes.native: the C module counts what the PyTorch ops count, cell for cell.

Truth is NumPy, from the calls' own tensors (``_truth``: the column rule, padding mask and drops
of ``Recorder.record``'s docstring, added in assignment order); each case also runs through the
PyTorch ops (a recorder with ``native`` off) and the two recorders' cells are compared bit for
bit. Building and loading the module (no compiler, disabled, a broken cached file, two processes
building at once) run in subprocesses with their own cache directory.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from probes import native
from probes.recorder import DROPPED, SCALARS, TOKENS, WEIGHT, Recorder
from probes.routing import Routed

ROOT = Path(__file__).resolve().parents[2]
CAP, SLOTS = 6, 3
F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16


def _recorders():
    nat, ops = Recorder(SLOTS, CAP, 2), Recorder(SLOTS, CAP, 2)
    assert nat.native is not None, "probes.native could not build its C module"
    ops.native = None   # the PyTorch ops
    return nat, ops


def _call(g, t, k, idt=torch.int64, wdt=F32, ldt=F32, drops=False, bad=False, shape="2d"):
    """A router call of ``t`` tokens: indices in [0, CAP) (``bad``: some negative / too large),
    weights of ``wdt`` (None: none), logits ``[t, CAP]`` of ``ldt`` (None: none), drops."""
    idx = torch.randint(0, CAP, (t, k), generator=g)
    if bad and t:
        idx.view(-1)[:: 3] = torch.tensor([-7, -1, CAP, CAP + 5])[torch.arange(len(idx.view(-1)[:: 3])) % 4]
    idx = idx.to(idt)
    w = None if wdt is None else torch.rand(t, k, generator=g, dtype=F64).to(wdt)
    lg = None if ldt is None else torch.randn(t, CAP, generator=g, dtype=F64).to(ldt)
    dr = (torch.rand(t, k, generator=g) < 0.3) if drops else None
    if shape == "3d" and t % 2 == 0:   # [B, S, k] of a native router, tokens row-major
        idx, w, dr = (None if x is None else x.reshape(2, t // 2, k) for x in (idx, w, dr))
    elif shape == "strided":   # non-contiguous views (a transposed buffer)
        idx = idx.t().contiguous().t()
        w = None if w is None else w.t().contiguous().t()
        lg = None if lg is None else lg.t().contiguous().t()
    return Routed(idx, w, dr, lg)


def _mask(g, t):
    keep = (torch.rand(t, generator=g) < 0.7).to(F64)
    return keep, torch.tensor(float(t) - float(keep.sum()), dtype=F64)


def _truth(calls, modes=3):
    """NumPy cells ``[kind, mode, slot, CAP + 2]`` and a per-(mode, slot) non-finite flag."""
    cells = np.zeros((4, modes, SLOTS, CAP + 2))
    flag = np.zeros((modes, SLOTS), dtype=bool)
    for mode, slot, r, mask, pad in calls:
        idx = r.indices.reshape(-1).to(torch.int64).numpy()
        n = idx.size
        col = np.clip(idx + 1, 0, CAP + 1)
        k = n // max(1, mask.numel()) if mask is not None else 1
        keep = np.ones(n) if mask is None else np.repeat(mask.numpy(), k)
        if r.dropped is not None:
            drop = r.dropped.reshape(-1).numpy().astype(np.float64) * keep
            np.add.at(cells[DROPPED, mode, slot], col, drop)
            keep = keep - drop
        np.add.at(cells[TOKENS, mode, slot], col, keep)
        if r.weights is not None:
            np.add.at(cells[WEIGHT, mode, slot], col, r.weights.reshape(-1).to(F64).numpy() * keep)
        if mask is not None:
            cells[SCALARS, mode, slot, 1] += float(pad) * k
        if r.logits is not None and not torch.isfinite(r.logits.to(F64)).all():
            flag[mode, slot] = True
    return cells, flag


def _flags(rec):
    """Non-finite logit sums per (mode, slot): eager cell (SCALARS, 0) or staged (WEIGHT, col 0)."""
    a = rec.acc.numpy()
    return ~np.isfinite(a[SCALARS, :, :, 0]) | ~np.isfinite(a[WEIGHT, :, :, 0])


def _check(calls, nat, ops):
    want, flag = _truth(calls)
    got, ref = nat.acc.numpy(), ops.acc.numpy()
    # column 0 of the weight row and the logit cell carry logit sums: compared as flags
    cmp = np.ones_like(want, dtype=bool)
    cmp[WEIGHT, :, :, 0] = cmp[SCALARS, :, :, 0] = False
    assert np.array_equal(got[cmp], ref[cmp]), "native and PyTorch ops differ"
    assert np.allclose(got[cmp], want[cmp], rtol=1e-12, atol=0), np.argwhere(~np.isclose(got, want) & cmp)[:5]
    assert np.array_equal(_flags(nat), flag) and np.array_equal(_flags(ops), flag)


CASES = {
    "f32": {},
    "int32_bf16": {"idt": torch.int32, "wdt": BF16, "ldt": BF16},
    "f16": {"wdt": F16, "ldt": F16},
    "f64": {"wdt": F64, "ldt": F64},
    "no_weights_no_logits": {"wdt": None, "ldt": None},
    "drops": {"drops": True},
    "bad_indices": {"bad": True},
    "three_d": {"shape": "3d"},
    "strided": {"shape": "strided", "drops": True},
}


@pytest.mark.parametrize("c_logits", [native.C_LOGITS, 4], ids=["logits_in_c", "logits_by_torch"])
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "mask"])
@pytest.mark.parametrize("case", list(CASES))
def test_record_counts_what_the_pytorch_ops_count(case, masked, c_logits, monkeypatch):
    """``c_logits`` 4: every call's logits are summed by torch (``native.C_LOGITS``, large calls)."""
    monkeypatch.setattr(native, "C_LOGITS", c_logits)
    g = torch.Generator().manual_seed(sum(map(ord, case)) + masked)
    nat, ops = _recorders()
    calls = []
    for i, t in enumerate([8, 1, 0, 12, 5, 8]):
        r = _call(g, t, 1 if i == 1 else 2, **CASES[case])
        mask, pad = _mask(g, t) if masked and t else (None, None)
        if i in (0, 4) and r.logits is not None:   # non-finite logits in two calls
            r.logits[0 if i else 3 % t, 3] = float("inf") if i else float("nan")
        mode, slot = i % 3, (i * 2) % SLOTS
        calls.append((mode, slot, r, mask, pad))
        for rec in (nat, ops):
            rec.record(mode, slot, r, mask, pad)
    _check(calls, nat, ops)


def test_a_flushs_calls_in_one_c_call_count_what_the_pytorch_flush_counts():
    """``native.count`` of a staged batch (references, and copies carrying their logit sums)
    against ``probes.batch_count.Layouts.count`` on the same batch."""
    g = torch.Generator().manual_seed(3)
    nat, ops = _recorders()
    batch = []
    for i in range(7):
        r = _call(g, 6, 2, wdt=[F32, BF16, None][i % 3], ldt=[F32, F16, None][i % 3])
        norm = None
        if i == 5:   # a copy's precomputed sum (float32)
            norm = r.logits.sum() if r.logits is not None else torch.tensor(float("nan"))
        batch.append((i % 2, i % SLOTS, r, norm))
    n = sum(r.indices.numel() for _, _, r, _ in batch)
    width = CAP + 2
    hold = []
    calls = [native.describe((m * SLOTS + s) * width, r, norm, hold=hold) for m, s, r, norm in batch]
    assert native.count(nat.native, *nat._native_at, calls)
    ops.stage._layouts.count(batch, n)
    got, ref = nat.acc.numpy(), ops.acc.numpy()
    assert np.array_equal(got[TOKENS], ref[TOKENS])
    assert np.array_equal(got[WEIGHT][..., 1:], ref[WEIGHT][..., 1:])
    assert np.array_equal(np.isfinite(got[WEIGHT][..., 0]), np.isfinite(ref[WEIGHT][..., 0]))
    assert not np.isfinite(got[WEIGHT][1, 5 % SLOTS, 0])   # the NaN sum given for call 5


def test_what_c_cannot_read_is_refused_before_anything_is_written():
    nat, _ = _recorders()
    r = Routed(torch.zeros(4, 2, dtype=torch.int16))
    assert native.describe(0, r) is None                      # index dtype
    assert native.describe(0, Routed(torch.zeros(4, 2, dtype=torch.long), torch.ones(3, 2))) is None  # numel
    assert native.describe(0, Routed(torch.zeros(4, 2, dtype=torch.long), torch.ones(4, 2, dtype=torch.int32))) is None
    fake = Routed(torch.zeros(4, 2, dtype=torch.long, device="meta"))
    assert native.describe(0, fake) is None
    mask = torch.ones(3, dtype=F64)   # 8 assignments are not a multiple of 3 tokens
    assert native.describe(0, Routed(torch.zeros(4, 2, dtype=torch.long)), mask=mask, pad=torch.tensor(0.0, dtype=F64)) is None
    assert not native.count(nat.native, *nat._native_at, [None])
    assert nat.acc.abs().sum() == 0


def _run(code: str, cache: Path, **env) -> subprocess.CompletedProcess:
    e = {**os.environ, "CHRONO_NATIVE_DIR": str(cache), "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=300)


COUNT = """
import logging, torch
logging.basicConfig(level=logging.INFO)
from probes import native
from probes.recorder import Recorder
from probes.routing import Routed
rec = Recorder(2, 4, 1)
rec.record(0, 1, Routed(torch.tensor([[0, 3], [3, 9]]), torch.tensor([[0.5, 0.25], [1.0, 2.0]])))
print("native", rec.native is not None, rec.acc[0, 0, 1].tolist(), rec.acc[1, 0, 1].tolist())
"""
WANT = "[0.0, 1.0, 0.0, 0.0, 2.0, 1.0] [0.0, 0.5, 0.0, 0.0, 1.25, 2.0]"


def test_built_once_then_loaded_from_the_cache(tmp_path):
    first = _run(COUNT, tmp_path)
    assert first.returncode == 0, first.stderr
    assert f"native True {WANT}" in first.stdout
    built = list(tmp_path.glob("_chrono_native-*.so"))
    assert len(built) == 1, built
    stamp = built[0].stat().st_mtime_ns
    again = _run(COUNT, tmp_path)
    assert f"native True {WANT}" in again.stdout
    assert built[0].stat().st_mtime_ns == stamp and list(tmp_path.glob("_chrono_native-*.so")) == built


@pytest.mark.parametrize("env", [{"CHRONO_NATIVE": "0"}, {"CHRONO_NATIVE": " Off"}, {"CC": "/bin/false"}],
                         ids=["disabled", "disabled_off", "compiler_fails"])
def test_without_the_module_the_pytorch_ops_count_the_same(tmp_path, env):
    out = _run(COUNT, tmp_path, **env)
    assert out.returncode == 0, out.stderr
    assert f"native False {WANT}" in out.stdout
    want = f"CHRONO_NATIVE={env['CHRONO_NATIVE'].strip().lower()}" if "CHRONO_NATIVE" in env else "native CPU counting unavailable"
    assert want in out.stderr


def test_a_broken_cached_file_is_rebuilt(tmp_path):
    assert _run(COUNT, tmp_path).returncode == 0
    (so,) = tmp_path.glob("_chrono_native-*.so")
    so.write_bytes(b"not a shared object")
    out = _run(COUNT, tmp_path)
    assert f"native True {WANT}" in out.stdout, out.stderr


def test_two_processes_building_at_once(tmp_path):
    e = {**os.environ, "CHRONO_NATIVE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", COUNT], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=e) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(f"native True {WANT}" in o for o, _ in outs), outs
    assert len(list(tmp_path.glob("_chrono_native-*.so"))) == 1
    assert not list(tmp_path.glob("*.tmp"))
