"""Hypothesis strategies and the checked run for fuzzing the write API (issue 23).

Used by ``test_fuzz_write_api.py`` (20 examples fast, 300 slow) and by
``benchmarks/fuzz_write_api.py`` (the count in docs/reliability.md). Every call either
raises ``InvalidInputError`` or writes rows that read back identically (``chrono.connect``
and ``chrono.read``); an independent oracle (plain Python, not ``chrono.validate``) says
which calls must be refused and which must be accepted; ``chrono snapshot`` then works.
"""
from __future__ import annotations

import contextlib
import io
import math
import re
import shutil
import tempfile
from collections import Counter

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import chrono
from chrono_cli.main import main as cli_main
from chrono.rules import check_run
from chrono.validate import InvalidInputError

EXPERTS = {0: 4, 1: 4, 2: 2}
MODEL = {"layers": [0, 1, 2], "experts_per_layer": {str(k): v for k, v in EXPERTS.items()}, "top_k": 2}
MODES = ("TRAIN", "EVAL", "INFER")
DTYPES = [np.int8, np.int16, np.int64, np.uint8, np.uint64, np.float16, np.float32, np.float64, np.bool_,
          np.complex64]
BAD_SCALARS = [-1, 1.5, float("nan"), True, 2 ** 64, "3", None]
FRESH = "fresh"
STATS: Counter = Counter()   # calls / accepted / refused per method, summed over every run_case


def _mostly(good, bad, draw=False):
    """Three draws in four from ``good``, one from ``bad`` (strategies themselves when ``draw``)."""
    pick = st.one_of(*bad) if draw else st.sampled_from(bad)
    return st.integers(0, 3).flatmap(lambda i: pick if i == 3 else st.sampled_from(good))


def _counts(dtype, shape):
    return hnp.arrays(dtype, shape)   # default elements: NaN, inf, negative, huge, fractional included


ROUTING_FAULTS = ["none", "none", "none", "counts", "step", "mode", "layer", "n", "weight_sum", "dropped",
                  "shape", "any"]


@st.composite
def routing_call(draw):
    """A call with at most one kind of fault (``any``: every argument drawn from everything)."""
    fault = draw(st.sampled_from(ROUTING_FAULTS))
    every = fault == "any"
    kind = draw(st.sampled_from(["one", "steps", "grid"] + (["scalar", "empty"] if fault in ("shape", "any")
                                                             else [])))
    layer = draw(st.sampled_from(list(EXPERTS)))
    if fault in ("layer", "any"):
        layer = draw(st.sampled_from([7, -1, 1.0, 0.5, True, "0"] + list(EXPERTS) * every))
    n = EXPERTS.get(layer, 4) if isinstance(layer, int) else 4
    if fault in ("n", "any"):
        n = draw(st.integers(0, 6))
    rows = draw(st.integers(1, 3))
    shape = {"one": (n,), "steps": (rows, n), "grid": (rows, 2, n), "scalar": (), "empty": (0, n)}[kind]
    if kind == "grid":
        layer = draw(st.sampled_from([[0, 1], [1, 0]] + ([[0, 7], [0, 2]] if fault in ("layer", "any")
                                                          else [])))
    if fault in ("counts", "any"):   # any dtype, default elements: NaN, inf, negative, huge, fractions
        counts = draw(_counts(draw(st.sampled_from(DTYPES)), shape))
    else:
        dtype = draw(st.sampled_from([np.int8, np.int64, np.uint8, np.uint64, np.float32, np.float64]))
        counts = draw(hnp.arrays(dtype, shape, elements=st.integers(0, 100)))
    step = draw(st.sampled_from(BAD_SCALARS)) if fault in ("step", "any") and draw(st.booleans()) else FRESH
    mode = draw(st.sampled_from(MODES))
    if fault in ("mode", "any"):
        mode = draw(st.sampled_from(["train", "", "X", None, 3] + list(MODES) * every))
    weight_sum = draw(st.one_of(st.none(), hnp.arrays(np.float32, shape)))
    if fault in ("weight_sum", "any"):
        weight_sum = draw(hnp.arrays(np.float64, draw(st.sampled_from([(5,), (1,), shape[:-1] or (2,)]))))
    dropped = draw(st.one_of(st.none(), hnp.arrays(np.int64, shape, elements=st.integers(0, 9))))
    if fault in ("dropped", "any"):
        dropped = draw(hnp.arrays(np.int64, shape, elements=st.integers(-2, 9)))
    return dict(kind=kind, step=step, layer=layer, counts=counts, mode=mode, weight_sum=weight_sum,
                dropped=dropped)


@st.composite
def tokens_call(draw):
    rows = draw(st.integers(0, 6))
    layer = draw(_mostly(list(EXPERTS), [5, -1]))
    expert = draw(hnp.arrays(np.int64, (rows,), elements=st.integers(-1, 4)))
    length = draw(st.sampled_from([rows, rows, rows, rows + 1, None]))   # None: a scalar

    def col(lo, hi):
        if length is None:
            return draw(st.integers(lo, hi))
        return draw(hnp.arrays(np.int64, (length,), elements=st.integers(lo, hi)))

    return dict(step=draw(_mostly([FRESH], [-1, 2.5])), layer=layer,
                expert=expert, k=draw(st.one_of(st.none(), st.just(col(0, 2)))),
                position=draw(st.one_of(st.none(), st.just(col(-1, 50)))),
                token_id=draw(st.one_of(st.none(), st.just(col(-1, 1000)))),
                weight=draw(st.one_of(st.none(), hnp.arrays(np.float32, (rows,)))),
                mode=draw(_mostly(list(MODES), ["eval"])))


SIGNAL_NAMES = ["loss", "val_loss", "var.val_loss", "accuracy", "teacher_agreement", "x.y", "", "a\nb", 5]


@st.composite
def signal_call(draw):
    fault = draw(st.sampled_from(["none", "none", "value", "step", "name", "layer"]))
    value = draw(st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-10, 10), st.none(),
                           st.just(np.float32(0.5))))
    if fault == "value":
        value = draw(st.one_of(st.floats(), st.booleans(), st.just("1"), st.just(np.array([1.0, 2.0]))))
    return dict(step=draw(st.sampled_from([-3, 1.5, True])) if fault == "step" else FRESH,
                name=draw(st.sampled_from(SIGNAL_NAMES[6:] if fault == "name" else SIGNAL_NAMES[:6])),
                value=value, layer=draw(st.sampled_from([-1, 1.5] if fault == "layer" else [None, 0, 3])))


LIFECYCLE_GOOD = dict(step=[FRESH], layer=[0, 1], event=["spawn", "prune", "grow"], expert=[-1, 0, 3],
                      n_experts_after=[1, 4, 6], applied=[True, False], reason=["", "why"])
LIFECYCLE_BAD = dict(step=[-2, 1.5], layer=[-1], event=["explode", 3], expert=[-2], n_experts_after=[-1],
                     applied=[1, "yes"], reason=[None, 7])


@st.composite
def lifecycle_call(draw):
    """One row; at most one field bad or missing (``any``: every field may be)."""
    fault = draw(st.sampled_from(["none", "none", "any"] + sorted(LIFECYCLE_GOOD)))
    row = {}
    for k, good in LIFECYCLE_GOOD.items():
        bad = fault == k or (fault == "any" and draw(st.booleans()))
        row[k] = draw(st.sampled_from(LIFECYCLE_BAD[k] if bad else good))
    if fault != "none" and draw(st.booleans()):
        row.pop(fault if fault in row else draw(st.sampled_from(sorted(row))))
    return dict(rows=[row])


calls = st.lists(st.one_of(routing_call().map(lambda c: ("routing", c)),
                           tokens_call().map(lambda c: ("tokens", c)),
                           signal_call().map(lambda c: ("signal", c)),
                           lifecycle_call().map(lambda c: ("lifecycle", c))), min_size=1, max_size=6)


# ------------------------------------------------------------------ the oracle
def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _clean_ints(a, lo, hi) -> bool:
    a = np.asarray(a)
    if a.dtype.kind not in "iu":
        return False
    return bool(a.size == 0 or (int(a.min()) >= lo and int(a.max()) <= hi))


def _bad_ints(a, lo) -> bool:
    """Values no reading could make valid: NaN/inf, fractions, or below ``lo`` (numeric arrays only)."""
    a = np.asarray(a)
    if a.dtype.kind in "bUSOc":
        return True
    if a.dtype.kind == "f":
        f = a.astype(np.float64)
        return bool((~np.isfinite(f)).any() or (f != np.floor(f)).any() or (f < lo).any())
    return a.dtype.kind == "i" and a.size > 0 and int(a.min()) < lo


def _layer_verdict(l) -> bool | None:
    """False: no layer value like it is valid; True: a plain int; None: an integral float (either)."""
    if isinstance(l, (bool, np.bool_, str)) or (isinstance(l, float) and l != int(l)) or l < 0:
        return False
    return True if _is_int(l) else None


def routing_verdict(c) -> bool | None:
    """True: must be accepted; False: must be refused; None: the oracle does not say."""
    counts = np.asarray(c["counts"])
    layers = c["layer"] if isinstance(c["layer"], list) else [c["layer"]]
    if c["mode"] not in MODES or counts.ndim == 0 or c["step"] != FRESH:
        return False
    lv = [_layer_verdict(l) for l in layers]
    if False in lv:
        return False
    n, rows = counts.shape[-1], int(np.prod(counts.shape[:-1]))
    if rows and (_bad_ints(counts, 0) or any(int(l) not in EXPERTS or EXPERTS[int(l)] != n for l in layers)):
        return False
    if c["weight_sum"] is not None and np.shape(c["weight_sum"]) != counts.shape:
        return False
    if c["dropped"] is not None and (np.asarray(c["dropped"]) < 0).any():
        return False
    return True if _clean_ints(counts, 0, 2 ** 53) and all(lv) else None


def tokens_verdict(c) -> bool | None:
    rows = len(c["expert"])
    if c["mode"] not in MODES or c["step"] != FRESH or c["layer"] < 0:
        return False
    for name in ("k", "position", "token_id"):
        v = c[name]
        if v is not None and ((np.ndim(v) and len(v) != rows) or (np.size(v) and np.min(v) < 0)):
            return False
    if rows and (c["layer"] not in EXPERTS or (c["expert"] < 0).any()
                 or (c["expert"] >= EXPERTS[c["layer"]]).any()):
        return False
    if rows and c["k"] is not None and np.max(c["k"]) > 1:   # top_k 2 in the manifest
        return False
    return True


LOSS = re.compile(r"(\A|[._])loss\Z")


def signal_verdict(c) -> bool | None:
    name, v, layer = c["name"], c["value"], c["layer"]
    if c["step"] != FRESH or not isinstance(name, str) or not name or "\n" in name:
        return False
    if layer is not None and (not _is_int(layer) or layer < 0):
        return False
    if v is None:
        return True
    if isinstance(v, (bool, str)) or np.ndim(v) != 0:
        return False
    f = float(v)
    if not math.isfinite(f) and not LOSS.search(name):
        return False
    if name in ("accuracy", "teacher_agreement") and not 0 <= f <= 1:
        return False
    return True


def lifecycle_verdict(c) -> bool | None:
    r = c["rows"][0]
    need = ("step", "layer", "event", "expert", "n_experts_after", "applied", "reason")
    if any(r.get(k) is None for k in need):
        return False
    return all(any(type(r[k]) is type(g) and r[k] == g for g in good) for k, good in LIFECYCLE_GOOD.items())


# ------------------------------------------------------------------ one checked run
def _f(v):
    """Comparable float: NaN equals NaN, float32 rounding applied by the caller."""
    return "nan" if v is not None and isinstance(v, float) and math.isnan(v) else v


def _expected(method, c, step):
    if method == "routing":
        counts = np.asarray(c["counts"])
        lead, n = counts.shape[:-1], counts.shape[-1]
        layer = np.asarray(c["layer"])[None, :] if c["kind"] == "grid" else np.asarray(c["layer"])
        steps = step + np.arange(lead[0]).reshape((-1,) + (1,) * (len(lead) - 1)) if lead else step
        steps, layers = np.broadcast_to(steps, lead), np.broadcast_to(layer, lead)
        ws = None if c["weight_sum"] is None else np.asarray(c["weight_sum"], np.float32)
        out = []
        for idx in np.ndindex(*lead):
            for e in range(n):
                w = None if ws is None else _f(float(ws[idx + (e,)]))
                d = 0 if c["dropped"] is None else int(c["dropped"][idx + (e,)])
                out.append((int(steps[idx]), c["mode"], int(layers[idx]), e, int(counts[idx + (e,)]), w, d))
        return "routing", out
    if method == "tokens":
        rows = len(c["expert"])

        def at(v, i, default):
            return default if v is None else int(v if np.ndim(v) == 0 else v[i])
        return "tokens", [(step, c["mode"], c["layer"], at(c["position"], i, 0), at(c["k"], i, 0),
                           int(c["expert"][i]), None if c["weight"] is None else _f(float(c["weight"][i])),
                           None if c["token_id"] is None else at(c["token_id"], i, None))
                          for i in range(rows)]
    if method == "signal":
        v = None if c["value"] is None else _f(float(c["value"]))
        return "signals", [(step, c["name"], c["layer"], v)]
    r = c["rows"][0]
    return "lifecycle", [(step, r["layer"], r["event"], r["expert"], r["n_experts_after"], r["applied"])]


READ_BACK = {
    "routing": "SELECT step, mode, layer, expert, tokens, weight_sum, dropped FROM routing",
    "tokens": "SELECT step, mode, layer, position, k, expert, weight, token_id FROM tokens",
    "signals": "SELECT step, name, layer, value FROM signals",
    "lifecycle": "SELECT step, layer, event, expert, n_experts_after, applied FROM lifecycle",
}


def _norm(rows):
    return sorted((tuple(_f(v) for v in r) for r in rows), key=repr)


def run_case(case) -> None:
    """Play ``case`` (a list of (method, call)) against a fresh run and check every promise."""
    root = tempfile.mkdtemp(prefix="chrono-fuzz-")
    try:
        expected = {t: [] for t in READ_BACK}
        step = 0
        with chrono.open_run(root, "r", model=MODEL) as w:
            for method, c in case:
                c = dict(c)
                first = c["rows"][0] if method == "lifecycle" else c
                fresh = first.get("step") == FRESH
                args = dict(c)
                if method == "lifecycle":
                    args = {"rows": [dict(c["rows"][0], step=step if fresh else c["rows"][0].get("step"))]}
                else:
                    args["step"] = step if fresh else c["step"]
                verdict = {"routing": routing_verdict, "tokens": tokens_verdict, "signal": signal_verdict,
                           "lifecycle": lifecycle_verdict}[method](c)
                if method == "routing" and c["kind"] in ("steps", "grid") and fresh:
                    lead0 = np.shape(c["counts"])[0]
                    trail = (1,) if c["kind"] == "grid" else ()
                    args["step"] = (step + np.arange(lead0)).reshape((-1,) + trail)
                    if c["kind"] == "grid":
                        args["layer"] = np.asarray(c["layer"])[None, :]
                STATS[f"{method} calls"] += 1
                try:
                    _call(w, method, args)
                except InvalidInputError as e:
                    STATS[f"{method} refused"] += 1
                    assert verdict is not True, f"{method} refused but valid: {c!r}: {e}"
                    assert "nothing was written" in str(e) and "\n" not in str(e)
                else:
                    STATS[f"{method} accepted"] += 1
                    assert verdict is not False, f"{method} accepted but invalid: {c!r}"
                    table, rows = _expected(method, c, step)
                    expected[table].extend(rows)
                step += 10
        con = chrono.connect(root)
        for table, sql in READ_BACK.items():
            got = con.execute(sql).fetchall()
            assert _norm(got) == _norm(expected[table]), table
            lf = chrono.read(root, table, run="r").collect()
            assert lf.height == len(expected[table])
        check_run(con, "r", READ_BACK)   # every stored row passes the readers' rules too
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = cli_main(["--root", root, "snapshot", "r", "--every", "7"])
        assert rc == (0 if expected["routing"] else 2) and "Traceback" not in err.getvalue()
        STATS["examples"] += 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _call(w, method, a):
    if method == "routing":
        w.log_routing(a["step"], a["layer"], a["counts"], mode=a["mode"], weight_sum=a["weight_sum"],
                      dropped=a["dropped"])
    elif method == "tokens":
        w.log_tokens(a["step"], a["layer"], a["expert"], weight=a["weight"], position=a["position"],
                     k=a["k"], token_id=a["token_id"], mode=a["mode"])
    elif method == "signal":
        w.log_signal(a["step"], a["name"], a["value"], layer=a["layer"])
    else:
        w.log_rows("lifecycle", a["rows"])
