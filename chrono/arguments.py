"""One write call's arguments as checked NumPy arrays, and the error that names the bad one.

``Call`` names the run, the method and (once known) the step and layer of each
row; ``Call.fail`` raises ``InvalidInputError`` (a ``ValueError``) saying which
argument, at which element, broke which rule, and that nothing was written.
``as_ints`` / ``as_floats`` turn Python numbers, lists, NumPy arrays (any real
dtype) and anything ``np.asarray`` reads into arrays after checking every
element; bools, strings, objects and complex numbers are refused. Used by
``chrono.validate``'s per-method checks. No torch import.
"""
from __future__ import annotations

import numpy as np

from .rules import INT_MAX as _INT_MAX, InvalidInputError
from .schema import MODES

def raw_numbers(v):
    try:
        a = np.asarray(v)
        return a if a.dtype.kind in "iufb" else None
    except Exception:
        return None


def fmt(x) -> str:
    x = x.item() if isinstance(x, np.generic) else x
    if isinstance(x, float) and x.is_integer() and abs(x) < 2 ** 63:
        return str(int(x))
    return repr(x)


class Call:
    """Names the run, the method and (once known) the step and layer of each row in errors."""

    def __init__(self, w, method: str):
        self.run, self.method = getattr(w, "run_id", "?"), method
        self.steps = self.layers = None

    def where(self, row: int | None):
        def pick(a):
            if a is None or row is None or not np.size(a):
                return "?"
            return fmt(np.ravel(a)[min(row, np.size(a) - 1)])
        return pick(self.steps), pick(self.layers)

    def known(self, step, layer) -> None:
        """Name these (raw, not yet checked) step and layer values in errors until checked ones are set."""
        self.steps, self.layers = raw_numbers(step), raw_numbers(layer)

    def fail(self, arg: str, problem: str, row: int | None = 0):
        step, layer = self.where(row)
        raise InvalidInputError(f"run {self.run!r}: {self.method} refused at step {step}, layer {layer}: "
                                f"{arg} {problem}; nothing was written")


def as_array(call: Call, name: str, value, shape=None) -> tuple[np.ndarray, np.ndarray | None]:
    """``value`` as a numeric array (+ its null mask for masked arrays); refuses non-numbers."""
    mask = None
    if np.ma.isMaskedArray(value):
        mask = np.ma.getmaskarray(value)
        value = np.ma.getdata(value)
    try:
        a = np.asarray(value)
    except Exception as e:
        call.fail(name, f"cannot be read as numbers ({type(e).__name__}: {str(e)[:80]})")
    if a.dtype.kind not in "iuf":
        what = {"b": "booleans", "O": "objects (mixed types, None, or integers beyond int64)",
                "U": "strings", "S": "bytes", "c": "complex numbers"}.get(a.dtype.kind, f"{a.dtype}")
        if a.size or a.dtype.kind in "bUSc":
            call.fail(name, f"must be real numbers, got {what}")
        a = a.astype(np.float64)   # an empty list: no values to check
    if shape is not None and a.shape != shape:
        call.fail(name, f"has shape {a.shape}, expected {shape} (the shape of counts)")
    return a, mask


def as_ints(call: Call, name: str, value, lo: int, hi: int, per: int = 1, shape=None) -> np.ndarray:
    """``value`` as an integer array after checking every element is an integer in [lo, hi].

    Reductions first (min / max / all), element masks only to name a failure: the
    check costs a few passes over the data and no copy for integer input.
    """
    a, mask = as_array(call, name, value, shape)
    if mask is not None and mask.any():
        call.fail(name, "has missing (masked) values", int(np.argmax(mask.ravel())) // per)
    flat = a.reshape(-1)
    if not flat.size:
        return a.astype(np.int64)
    kind = a.dtype.kind
    if kind == "f":
        if not np.isfinite(flat).all():
            i = int(np.argmax(~np.isfinite(flat)))
            call.fail(at(name, a, i), f"= {fmt(flat[i])} is not finite", i // per)
        if (np.floor(flat) != flat).any():
            i = int(np.argmax(np.floor(flat) != flat))
            call.fail(at(name, a, i), f"= {fmt(flat[i])} is not an integer", i // per)
    info = np.iinfo(a.dtype) if kind in "iu" else None   # the dtype's own range may make a side moot
    mn = flat.min() if info is None or info.min < lo else lo
    mx = flat.max() if info is None or info.max > hi else hi
    if mn < lo or mx > hi or (kind == "f" and mx >= 2.0 ** 63):
        i = int(np.argmax(flat < lo)) if mn < lo else int(np.argmax(flat == mx))
        rule = f"must be >= {lo}" if mn < lo else f"must be <= {hi}"
        call.fail(at(name, a, i), f"= {fmt(flat[i])} out of range ({rule})", i // per)
    return a if kind in "iu" and a.dtype != np.uint64 else a.astype(np.int64)


def at(name: str, a: np.ndarray, i: int) -> str:
    if a.ndim == 0:
        return name
    return f"{name}[{', '.join(str(int(x)) for x in np.unravel_index(i, a.shape))}]"


def as_floats(call: Call, name: str, value, shape=None, finite: bool = True, per: int = 1) -> np.ndarray:
    a, mask = as_array(call, name, value, shape)
    if finite and not np.isfinite(a).all():
        flat = a.reshape(-1)
        i = int(np.argmax(~np.isfinite(flat)))
        call.fail(at(name, a, i), f"= {fmt(flat[i])} is not finite", i // per)
    return a if a.dtype.kind == "f" else a.astype(np.float64)


def scalar_int(call: Call, name: str, value, lo: int = 0, hi: int = _INT_MAX[64]) -> int:
    if isinstance(value, (bool, np.bool_)):
        call.fail(name, f"must be an integer, got {value!r}")
    a = as_ints(call, name, value, lo, hi)
    if a.ndim != 0:
        call.fail(name, f"must be a single integer, got shape {a.shape}")
    return int(a)


def check_mode(call: Call, mode) -> None:
    if not isinstance(mode, str) or mode not in MODES:
        call.fail("mode", f"{mode!r} is not one of {', '.join(MODES)}")


def broadcast(call: Call, name: str, a: np.ndarray, shape: tuple) -> np.ndarray:
    try:
        return np.broadcast_to(a, shape)
    except ValueError:
        call.fail(name, f"has shape {a.shape}, which does not broadcast to counts' leading shape {shape}")


def no_bool(call: Call, name: str, v):
    if isinstance(v, (bool, np.bool_)) or (isinstance(v, np.ndarray) and v.dtype.kind == "b"):
        call.fail(name, f"must be integers, got booleans ({v!r:.40})")
    return v
