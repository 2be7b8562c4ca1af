"""The write API's door: every ``RunWriter.log_*`` call is checked before it writes.

``@door(check)`` runs ``check(writer, **arguments)`` before the method
(``log_routing``, ``log_tokens``, ``log_signal``, ``log_rows``). A bad call raises
``InvalidInputError`` (a ``ValueError``) naming the argument, the run, the step
and the layer, and writes nothing: rows logged before it stay buffered and
intact. With ``on_error="count"`` (what probes use) the call is dropped instead,
counted in ``stats.calls_refused`` and ``stats.write_errors`` and logged once per
method: never raised into training.

What is checked: the value rules of ``chrono.rules`` (non-negative integral
counts and steps, finite values, known modes...), array shapes and lengths, and
the run's manifest (``chrono.declared``): a layer must be declared when the
manifest lists layers; ``log_routing`` gives one count per expert of the layer
(a count declared for it), or, with ``expert_offset``, a shard inside it; token
rows name experts below the layer's largest declared count and ``k`` below
``top_k``. A layer whose expert count the manifest does not declare is declared
by its first ``log_routing`` call; growth or shrinkage is declared explicitly
with ``RunWriter.declare_experts(layer, n)``. Inputs: Python numbers and lists,
NumPy arrays (any real dtype; a float must be integral where an integer is
expected; bools, strings and objects are refused) and anything ``np.asarray``
reads (CPU tensors). No torch import.
"""
from __future__ import annotations

import functools
import inspect
import logging
import math
import re

import numpy as np

from .arguments import Call, as_array, as_floats, as_ints, broadcast, check_mode, no_bool, scalar_int
from .declared import Layout
from .rules import ENUMS, INT_MAX as _INT_MAX, LOSS_NAME_RE, MAX_COUNT, UNIT_SIGNALS, InvalidInputError, \
    bounds, finite_required
from .schema import COLUMN_DEFAULTS, TABLES

log = logging.getLogger("chrono.store")

MAX_NAME_LEN = 256
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


# ============================================================== the checks, one per write method
def check_routing(w, step, layer, counts, mode, weight_sum, rank, dropped, expert_offset) -> dict:
    call = Call(w, "log_routing")
    call.known(step, layer)
    check_mode(call, mode)
    c, cmask = as_array(call, "counts", counts)
    if c.ndim == 0:
        call.fail("counts", "is a scalar; it needs a trailing expert dimension [..., n_experts]")
    lead, n = c.shape[:-1], c.shape[-1]
    step_a = broadcast(call, "step", as_ints(call, "step", no_bool(call, "step", step), 0, _INT_MAX[64]),
                        lead)
    call.steps = step_a.reshape(-1)
    layer_a = broadcast(call, "layer", as_ints(call, "layer", no_bool(call, "layer", layer), 0,
                                              _INT_MAX[32]), lead)
    call.layers = layer_a.reshape(-1)
    offset_a = None if expert_offset is None else broadcast(
        call, "expert_offset", as_ints(call, "expert_offset", expert_offset, 0, _INT_MAX[32]), lead)
    if rank is not None:
        rank = scalar_int(call, "rank", rank, 0, _INT_MAX[32])
    counts_i = as_ints(call, "counts", np.ma.array(c, mask=cmask) if cmask is not None else c,
                     0, MAX_COUNT, per=max(n, 1))
    ws = None if weight_sum is None else as_floats(call, "weight_sum", weight_sum, c.shape, finite=False,
                                                 per=max(n, 1))
    dr = None if dropped is None else as_ints(call, "dropped", dropped, 0, MAX_COUNT, per=max(n, 1),
                                            shape=c.shape)
    learn = {}
    if call.layers.size:
        if n == 0:
            call.fail("counts", "has no expert dimension (shape ends in 0); give one count per expert")
        lay = Layout(getattr(w, "manifest", {}).get("model"))
        uniq, first = np.unique(call.layers, return_index=True)
        for l, i in zip(uniq.tolist(), first.tolist()):
            if lay.layers is not None and l not in lay.layers:
                call.fail("layer", f"{l} is not declared in the run's manifest (layers "
                          f"{sorted(lay.layers)}); declare it first with w.declare_experts({l}, n_experts)", i)
            sizes = lay.sizes.get(l)
            if offset_a is None:
                if sizes and n not in sizes:
                    call.fail("counts", f"has {n} values per row but layer {l} has "
                              f"{lay.current.get(l, max(sizes))} experts (manifest experts_per_layer); "
                              f"declare a change with w.declare_experts({l}, {n})", i)
                if not sizes:
                    learn[l] = n
            elif sizes:
                top = int(offset_a.reshape(-1)[call.layers == l].max()) + n
                if top > max(sizes):
                    call.fail("expert_offset", f"+ {n} experts reaches expert {top - 1}, beyond layer "
                              f"{l}'s {max(sizes)} experts (manifest experts_per_layer)", i)
    for l, k in learn.items():   # a layer the manifest did not size: its first call declares it
        w.declare_experts(l, k)
    return dict(step=step_a, layer=layer_a, counts=counts_i, mode=mode, weight_sum=ws, rank=rank,
                dropped=dr, expert_offset=0 if offset_a is None else offset_a)


def check_tokens(w, step, layer, expert, weight, batch_idx, position, k, token_id, mode, rank) -> dict:
    call = Call(w, "log_tokens")
    call.known(step, layer)
    check_mode(call, mode)
    if step is None or layer is None:
        call.fail("step" if step is None else "layer", "is required")
    e = as_ints(call, "expert", no_bool(call, "expert", expert), 0, _INT_MAX[32]).reshape(-1)
    rows = e.shape[0]

    def col(name, v, lo, hi):
        if v is None:
            return None
        a = as_ints(call, name, no_bool(call, name, v), lo, hi)
        if a.ndim and a.size != rows:
            call.fail(name, f"has {a.size} values for {rows} rows (expert has {rows}); give a scalar "
                      f"or one value per row")
        return a.reshape(-1) if a.ndim else a

    s = col("step", step, 0, _INT_MAX[64])
    call.steps = np.broadcast_to(s, (rows,)) if rows else s
    lyr = col("layer", layer, 0, _INT_MAX[32])
    call.layers = np.broadcast_to(lyr, (rows,)) if rows else lyr
    b, p, kk = (col("batch_idx", batch_idx, 0, _INT_MAX[32]), col("position", position, 0, _INT_MAX[32]),
                col("k", k, 0, _INT_MAX[16]))
    if rank is not None:
        rank = scalar_int(call, "rank", rank, 0, _INT_MAX[32])
    wt = None
    if weight is not None:
        wt = as_floats(call, "weight", weight, finite=False)
        if wt.ndim and wt.size != rows:
            call.fail("weight", f"has {wt.size} values for {rows} rows")
        wt = wt.reshape(-1) if wt.ndim else wt
    tid = _token_ids(call, token_id, rows)
    lay = Layout(getattr(w, "manifest", {}).get("model"))
    if rows:
        layers = np.broadcast_to(lyr, (rows,))
        for l in ([int(lyr)] if lyr.ndim == 0 else np.unique(layers).tolist()):
            sel = slice(None) if lyr.ndim == 0 else layers == l
            i = 0 if lyr.ndim == 0 else int(np.argmax(sel))
            if lay.layers is not None and l not in lay.layers:
                call.fail("layer", f"{l} is not declared in the run's manifest (layers "
                          f"{sorted(lay.layers)})", i)
            sizes = lay.sizes.get(l)
            if sizes and e[sel].max() >= max(sizes):
                j = int(np.flatnonzero((layers == l) & (e >= max(sizes)))[0])
                call.fail(f"expert[{j}]", f"= {int(e[j])} is beyond layer {l}'s {max(sizes)} experts", j)
        if kk is not None and lay.top_k is not None and np.max(kk) >= lay.top_k:
            j = int(np.argmax(np.broadcast_to(kk, (rows,)) >= lay.top_k))
            call.fail("k", f"= {int(np.broadcast_to(kk, (rows,))[j])} is not below the run's top_k "
                      f"{lay.top_k} (manifest)", j)
    return dict(step=s, layer=lyr, expert=e, weight=wt, batch_idx=b, position=p, k=kk, token_id=tid,
                mode=mode, rank=rank)


def _token_ids(call: Call, token_id, rows: int):
    """None, the ids as an array, or a pyarrow int64 array when some are unknown (None, masked
    or Arrow nulls: stored as NULL)."""
    if token_id is None:
        return None
    import pyarrow as pa

    if isinstance(token_id, (pa.Array, pa.ChunkedArray)):
        mask = token_id.is_null().to_numpy(zero_copy_only=False)
        if not pa.types.is_integer(token_id.type) and not pa.types.is_null(token_id.type):
            call.fail("token_id", f"must be integers, got {token_id.type}")
        vals = token_id.fill_null(0).to_numpy(zero_copy_only=False) if len(token_id) else np.zeros(0)
        token_id = np.ma.array(vals, mask=mask)
    elif isinstance(token_id, (list, tuple)) and any(v is None for v in token_id):
        mask = np.array([v is None for v in token_id])
        token_id = np.ma.array([0 if v is None else v for v in token_id], mask=mask)
    mask = np.ma.getmaskarray(token_id) if np.ma.isMaskedArray(token_id) else None
    data = token_id if mask is None else np.where(mask, 0, np.ma.getdata(token_id))  # masked: unknown
    a = as_ints(call, "token_id", no_bool(call, "token_id", data), 0, _INT_MAX[64])
    if a.ndim and a.size != rows:
        call.fail("token_id", f"has {a.size} values for {rows} rows")
    if mask is None or not mask.any():
        return a
    a = np.broadcast_to(a.reshape(-1) if a.ndim else a, (rows,))
    return pa.array(a, type=pa.int64(), mask=np.broadcast_to(mask.reshape(-1) if mask.ndim else mask, (rows,)))


def check_signal_value(call: Call, name, value, arg: str = "value", row: int | None = 0):
    """The value of signal ``name`` as a float (None stays None); see the module docstring."""
    if not isinstance(name, str) or not name:
        call.fail("name", f"must be a non-empty string, got {name!r:.60}", row)
    if len(name) > MAX_NAME_LEN or _CONTROL_RE.search(name):
        call.fail("name", f"{name[:40]!r}... must be at most {MAX_NAME_LEN} characters without control "
                  f"characters", row)
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_, str, bytes)):
        call.fail(arg, f"must be a number, got {value!r:.40}", row)
    try:
        a = np.asarray(value)
    except Exception as e:
        call.fail(arg, f"cannot be read as a number ({type(e).__name__})", row)
    if a.ndim != 0 or a.dtype.kind not in "iuf":
        call.fail(arg, f"must be one real number, got {value!r:.60}", row)
    v = float(a)
    if not math.isfinite(v) and not LOSS_NAME_RE.search(name):
        call.fail(arg, f"= {v} is not finite (only loss-like signals, name matching "
                  f"{LOSS_NAME_RE.pattern}, may be NaN/Inf)", row)
    if name in UNIT_SIGNALS and not 0.0 <= v <= 1.0:
        call.fail(arg, f"= {v} for {name!r} is outside [0, 1]", row)
    return v


def check_signal(w, step, name, value, layer, rank) -> dict:
    call = Call(w, "log_signal")
    call.known(step, layer)
    step = scalar_int(call, "step", step)
    call.steps = np.array([step])
    if layer is not None:
        layer = scalar_int(call, "layer", layer, 0, _INT_MAX[32])
        call.layers = np.array([layer])
    if rank is not None:
        rank = scalar_int(call, "rank", rank, 0, _INT_MAX[32])
    value = check_signal_value(call, name, value)
    return dict(step=step, name=name, value=value, layer=layer, rank=rank)


def check_rows(w, table, rows) -> dict:
    """``log_rows``: every row a dict of the table's columns, each value within its rule."""
    call = Call(w, "log_rows")
    if not isinstance(table, str) or table not in TABLES:
        call.fail("table", f"{table!r} is not one of {', '.join(TABLES)}", None)
    call.method = f"log_rows({table!r})"
    if isinstance(rows, dict) or not isinstance(rows, (list, tuple)):
        call.fail("rows", f"must be a list of dicts, got {type(rows).__name__}", None)
    schema = TABLES[table]
    names = set(schema.names)
    defaults = COLUMN_DEFAULTS.get(table, {})
    writer_fills = {"mode", "rank"}   # RunWriter.log_rows fills these when missing
    lay = Layout(getattr(w, "manifest", {}).get("model")) if table in ("routing", "tokens") else None
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            call.fail(f"rows[{i}]", f"must be a dict, got {type(r).__name__}", None)
        call.known(r.get("step"), r.get("layer"))
        extra = set(r) - names
        if extra:
            call.fail(f"rows[{i}]", f"has unknown column(s) {sorted(extra)}; {table} has {sorted(names)}")
        if r.get("run_id") not in (None, call.run):
            call.fail(f"rows[{i}]['run_id']", f"= {r['run_id']!r} is not this run")
        row = {}
        for f in schema:
            if f.name == "run_id":
                continue
            v = r.get(f.name)
            if v is None:
                if f.name in writer_fills or f.nullable:
                    row[f.name] = None
                    continue
                if f.name in defaults and defaults[f.name] is not None:
                    row[f.name] = defaults[f.name]
                    continue
                call.fail(f"rows[{i}][{f.name!r}]", "is missing (the column cannot be null)")
            row[f.name] = _cell(call, table, f, v, i)
        if table == "signals":
            row["value"] = check_signal_value(call, row["name"], r.get("value"), f"rows[{i}]['value']")
        if lay is not None:
            _cell_vs_manifest(call, lay, table, row, i)
        out.append(row)
    return dict(table=table, rows=out)


def _cell(call: Call, table: str, f, v, i: int):
    import pyarrow as pa

    arg, t = f"rows[{i}][{f.name!r}]", f.type
    if pa.types.is_string(t):
        if not isinstance(v, str):
            call.fail(arg, f"must be a string, got {v!r:.40}")
        allowed = ENUMS.get(f.name)
        if allowed is not None and v not in allowed:
            call.fail(arg, f"= {v!r} is not one of {', '.join(allowed)}")
        return v
    if pa.types.is_boolean(t):
        if not isinstance(v, (bool, np.bool_)):
            call.fail(arg, f"must be True or False, got {v!r:.40}")
        return bool(v)
    if isinstance(v, (bool, np.bool_, str, bytes)) or np.ndim(v) != 0:
        call.fail(arg, f"must be one number, got {v!r:.40}")
    if pa.types.is_integer(t):
        lo, hi = bounds(table, f.name) or (-_INT_MAX[t.bit_width] - 1, None)
        hi = _INT_MAX[t.bit_width] if hi is None else hi
        return int(as_ints(call, arg, v, lo, hi))
    finite = finite_required(table, f.name)
    return float(as_floats(call, arg, v, finite=finite))


def _cell_vs_manifest(call: Call, lay: Layout, table: str, row: dict, i: int) -> None:
    l, e = row["layer"], row["expert"]
    if lay.layers is not None and l not in lay.layers:
        call.fail(f"rows[{i}]['layer']", f"= {l} is not declared in the run's manifest "
                  f"(layers {sorted(lay.layers)})")
    sizes = lay.sizes.get(l)
    if sizes and e >= max(sizes):
        call.fail(f"rows[{i}]['expert']", f"= {e} is beyond layer {l}'s {max(sizes)} experts")
    if table == "tokens" and lay.top_k is not None and row["k"] >= lay.top_k:
        call.fail(f"rows[{i}]['k']", f"= {row['k']} is not below the run's top_k {lay.top_k}")


def door(check):
    """Decorator for a ``RunWriter.log_*`` method: run ``check(writer, **arguments)`` first.

    ``check`` returns the arguments normalised (validated arrays) or raises
    ``InvalidInputError``. With the writer's ``on_error="count"`` a refused call is
    counted (``stats.calls_refused``, ``stats.write_errors``) and logged once per
    method instead of raised.
    """
    def wrap(method):
        sig = inspect.signature(method)

        @functools.wraps(method)
        def guarded(self, *args, **kwargs):
            try:
                bound = sig.bind(self, *args, **kwargs)
            except TypeError as e:
                raise InvalidInputError(f"run {getattr(self, 'run_id', '?')!r}: {method.__name__}: {e}; "
                                        f"nothing was written") from None
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            del arguments[next(iter(sig.parameters))]
            try:
                arguments = check(self, **arguments)
            except InvalidInputError as e:
                if getattr(self, "on_error", "raise") != "count":
                    raise
                _count_refusal(self, method.__name__, e)
                return None
            return method(self, **arguments)

        return guarded
    return wrap


def _count_refusal(w, method: str, e: Exception) -> None:
    stats = w.stats
    stats.calls_refused = getattr(stats, "calls_refused", 0) + 1
    stats.write_errors += 1
    stats.last_error = f"{type(e).__name__}: {e}"
    logged = w.__dict__.setdefault("_logged_refusals", set())
    if method not in logged:
        logged.add(method)
        log.error("chrono: %s; later refusals of %s are only counted (stats.calls_refused)", e, method)
