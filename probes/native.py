"""Counting router calls on the CPU in one C call (``native_count.c``), built on first use.

On CPU every PyTorch op costs a dispatch, and right after the model's own work, with cold
caches, each of ``Recorder.record``'s ~7 ops measured 20-60 us (``benchmarks/flush_anatomy.py``):
with few MoE layers that fixed cost, not the data, is chrono's overhead. ``native_count.c``
does the same additions into the same float64 cells in one pass over the calls' indices,
weights, drops, padding masks and logits; ``describe`` checks every tensor (CPU, contiguous,
dtype, element counts) and ``count`` hands their data pointers to the C function. CUDA
tensors, ``torch.compile`` and anything ``describe`` refuses keep the PyTorch ops.

``load`` compiles the C file once, with the system C compiler (``$CC``, split as a shell would,
else ``cc``; 0.15-0.5 s measured here) and Python's own headers (no torch headers), into
``$CHRONO_NATIVE_DIR`` (default ``$XDG_CACHE_HOME/chrono`` or ``~/.cache/chrono``) under a name
hashed from the source, the flags and the Python build, written atomically with its sha256
beside it (a cached file that does not match, e.g. cut short, is rebuilt: the dynamic loader
dies of SIGBUS on it), and imports it as an extension module: a ``METH_FASTCALL`` function, an
empty call 0.15-0.18 us in a hot loop. Through ``ctypes`` instead, an empty call measured 14 us
in situ, and a call's whole count 30 us against 12 us this way (scratch thread-time brackets,
4-layer HF Mixtral, ``inference_mode``). No compiler or headers, a failed build, or
``CHRONO_NATIVE`` set to ``0``, ``false``, ``no`` or ``off`` (any case): ``load`` returns None,
logged once, and counting uses the PyTorch ops (the same counts).

Same cells, same order of additions as the PyTorch path: token counts, weight sums, drops and
padding are bit-identical (``tests/probes/test_native_count.py``). Logit sums only flag
non-finite logits; the C sum (float32, float64 for float64 logits, as ``ops.sum_dtype``) may
round differently from ``torch.sum``, so a finite sum within a rounding of float32's limit
(3.4e38) may be flagged by one path and not the other.
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

import torch

from .ops import grad_off, logit_sum

log = logging.getLogger("probes")

SOURCE = Path(__file__).with_name("native_count.c")
FLAGS = ["-O3", "-fopenmp-simd", "-shared", "-fPIC", "-std=c99"]
OFF = ("0", "false", "no", "off")   # CHRONO_NATIVE values that switch the C module off
MODULE = "_chrono_native"   # the extension module's name (PyInit__chrono_native)
DESC = 16                   # int64 fields per call (native_count.c)
# logits (elements) of one call summed in C; more are summed by torch.sum, whose vectorised
# kernel is faster on large tensors than the portable C loop (CPU, [4096, 256] float32: C 112 us,
# torch.sum 59 us; at 8192 elements the op's dispatch costs more than the C sum)
C_LOGITS = 1 << 18
INDEX_CODES = {torch.int64: 0, torch.int32: 1}
FLOAT_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
BOOL_CODES, MASK_CODES = {torch.bool: 0}, {torch.float64: 0}

_lock = threading.Lock()
_lib: list = []   # [] not tried yet; [fn or None] after load()


def cache_dir() -> Path:
    """Where the built library is kept: ``$CHRONO_NATIVE_DIR``, else the user cache dir."""
    if os.environ.get("CHRONO_NATIVE_DIR"):
        return Path(os.environ["CHRONO_NATIVE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "chrono"


def _build(fresh: bool = False) -> Path:
    """The built module's path: compiled here unless a build of this source, flags and Python
    exists (``fresh``: compiled anyway, replacing it). Raises OSError (no compiler, no Python
    headers, the compiler failed)."""
    cc = shlex.split(os.environ.get("CC", ""))   # (may carry arguments: "ccache gcc", as make splits it)
    if not cc:
        cc = [c for c in (shutil.which("cc") or shutil.which("gcc"),) if c]
    if not cc:
        raise OSError("no C compiler found (set $CC, or install gcc)")
    include = sysconfig.get_paths()["include"]
    if not os.path.exists(os.path.join(include, "Python.h")):
        raise OSError(f"no Python headers in {include} (install the python3-dev package)")
    flags = [*FLAGS, f"-I{include}"]
    src = SOURCE.read_bytes()
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    tag = hashlib.sha256(src + " ".join([*cc, *flags, sys.version]).encode()).hexdigest()[:16]
    out = cache_dir() / f"{MODULE}-{tag}{suffix}"
    digest = out.with_name(out.name + ".sha256")   # the build's own hash, written after it
    if not fresh and _intact(out, digest):
        return out   # (a cut-short file would kill the process in dlopen: SIGBUS; rebuilt instead)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name, suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run([*cc, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise OSError(f"{' '.join(cc)} failed: {r.stderr.strip()[:500]}")
        with open(tmp, "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()
            _sync(f)   # on disk before the rename
        os.replace(tmp, out)   # atomic: another process building the same file is harmless
        with tempfile.NamedTemporaryFile("w", dir=out.parent, prefix=digest.name, suffix=".tmp", delete=False) as f:
            tmp = f.name
            f.write(sha)
            f.flush()
            _sync(f)
        os.replace(tmp, digest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _sync(f) -> None:
    """fsync ``f``, where the file system can (some FUSE mounts refuse: EINVAL, ENOTSUP)."""
    try:
        os.fsync(f.fileno())
    except OSError:
        pass


def _intact(path: Path, digest: Path) -> bool:
    """True if ``path`` exists and hashes to the sha256 in ``digest`` (False: missing, cut
    short, changed, or built by a version without a digest)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() == digest.read_text().strip()
    except OSError:
        return False


def _import(path: Path):
    """The extension module at ``path``."""
    loader = importlib.machinery.ExtensionFileLoader(MODULE, str(path))
    spec = importlib.util.spec_from_file_location(MODULE, str(path), loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def load():
    """The built module's ``count(tw, cells, cap, *fields)`` function, or None (disabled, no
    compiler, build failed: logged once)."""
    if _lib:
        return _lib[0]
    with _lock:
        if _lib:
            return _lib[0]
        fn = None
        flag = os.environ.get("CHRONO_NATIVE", "1").strip().lower()
        if flag in OFF:
            log.info("probes: CHRONO_NATIVE=%s: counting on CPU with PyTorch ops", flag)
        else:
            try:
                try:
                    mod = _import(_build())
                except ImportError:   # a cached file that does not load (truncated, foreign)
                    mod = _import(_build(fresh=True))
                if mod.DESC != DESC:
                    raise OSError(f"{MODULE} has {mod.DESC} fields per call, not {DESC}")
                fn = mod.count
            except Exception as e:   # telemetry keeps working without it
                fn = None
                log.warning("probes: native CPU counting unavailable (%s); counting with PyTorch ops", e)
        _lib.append(fn)
        return fn


def describe(col0: int, routed, norm=None, mask=None, pad=None, cells=(0, 0, 0), hold=None) -> tuple | None:
    """One call's ``DESC`` int64 fields (``native_count.c``), or None when a tensor is not
    eligible: not on the CPU, another dtype (indices int64 / int32; weights and logits float32 /
    float64 / bfloat16 / float16; dropped bool; mask ``[T]`` and ``pad`` 0-d float64; ``norm``,
    a precomputed 0-d logit sum, float32 / float64), element counts that do not match (weights,
    dropped: as many as the indices; the indices a multiple of the mask's T), no storage of
    their own (``torch.func`` wrappers), not a plain ``torch.Tensor`` (a subclass: a FakeTensor
    says CPU and contiguous, and its data pointer is 0), or data at address 0 (a ZeroTensor).
    Non-contiguous (or negative-view) indices, weights or drops are copied contiguous,
    non-contiguous logits or more than ``C_LOGITS`` of them summed (``ops.logit_sum``), one op
    each; the copies go to ``hold`` (a list the caller keeps until the C call). ``cells``: the
    slot's dropped row, logit-sum and padding cells (0: the logit sum goes to the weight cell of
    column 0, as in the staged path)."""
    try:
        return _describe(col0, routed, norm, mask, pad, cells, hold)
    except RuntimeError:   # no storage: reading a data pointer raises
        return None


def _dense(t, codes: dict, hold) -> tuple | None:
    """(data pointer, dtype code) of CPU tensor ``t`` (copied contiguous into ``hold`` if it is
    not, or is a negative view), None for another dtype or device."""
    code = codes.get(t.dtype)
    if code is None or not t.is_cpu or type(t) is not torch.Tensor:
        return None   # (a subclass: a FakeTensor is "CPU", contiguous, and its data pointer 0)
    if not t.is_contiguous() or t.is_neg():   # (neg bit: memory holds the negated values)
        if hold is None:
            return None
        with grad_off():   # (the copy joins no autograd graph)
            t = t.resolve_neg().contiguous()
        hold.append(t)
    ptr = t.data_ptr()
    return None if ptr == 0 and t.numel() else (ptr, code)   # (0: no memory, e.g. a ZeroTensor)


def _describe(col0: int, routed, norm, mask, pad, cells, hold) -> tuple | None:
    indices, weights, dropped, logits = routed
    got = _dense(indices, INDEX_CODES, hold)
    if got is None:
        return None
    (ix, icode), n = got, indices.numel()
    w = wcode = lg = lcode = nl = d = m = p = 0
    t = 1
    if weights is not None:
        got = _dense(weights, FLOAT_CODES, hold)
        if got is None or weights.numel() != n:
            return None
        w, wcode = got
    if norm is None and logits is not None and type(logits) is torch.Tensor and logits.is_cpu \
            and logits.dtype in FLOAT_CODES and hold is not None \
            and (not logits.is_contiguous() or logits.numel() > C_LOGITS):
        with grad_off():
            norm = logit_sum(logits)
        hold.append(norm)
    if norm is not None:
        if norm.dtype not in (torch.float32, torch.float64) or not norm.is_cpu or norm.numel() != 1 \
                or type(norm) is not torch.Tensor or not norm.data_ptr():
            return None
        lg, lcode, nl = norm.data_ptr(), FLOAT_CODES[norm.dtype], -1
    elif logits is not None:
        got = _dense(logits, FLOAT_CODES, None)
        if got is None:
            return None
        (lg, lcode), nl = got, logits.numel()
    if dropped is not None:
        got = _dense(dropped, BOOL_CODES, hold)
        if got is None or dropped.numel() != n:
            return None
        d = got[0]
    if mask is not None:
        t = mask.numel()
        if t == 0 or n % t or pad is None or pad.dtype != torch.float64 or not pad.is_cpu or pad.numel() != 1 \
                or type(pad) is not torch.Tensor or not pad.data_ptr():
            return None
        got = _dense(mask, MASK_CODES, hold)
        if got is None:
            return None
        m, p = got[0], pad.data_ptr()
    return (col0, ix, icode, n, w, wcode, lg, lcode, nl, d, m, p, t, *cells)


def count(fn, tw: int, cells: int, cap: int, calls: list) -> bool:
    """Count ``calls`` (each ``describe``'s tuple, or None) into the recorder's ``[2, cells]``
    float64 tokens / weight-sum rows at pointer ``tw`` (``cap``: its capacity) with one C call
    (``fn``: ``load()``). False, with nothing written, when a call is None (not eligible): the
    caller then counts them with the PyTorch ops."""
    if None in calls:
        return False
    fn(tw, cells, cap, *(calls[0] if len(calls) == 1 else [x for c in calls for x in c]))
    return True

