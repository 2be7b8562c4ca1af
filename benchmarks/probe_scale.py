"""Probes at DeepSeek-V3 and OLMoE routing shapes: in-hook time, h.step(), window-close stall, memory, bytes.

Routing-only stand-in models (the expert FFNs and attention are left out so CPU time and memory
stay bounded; the routers are real): transformers' own router modules in a
``layers.<i>.mlp.gate`` tree, with random weights and a small hidden size (the router input
width changes the router's matmul, not what the probes do). Each router runs its real forward
on ``--variants`` different inputs once; the timed steps replay those outputs in turn (same
tensors, same module class as far as the probes see: a subclass whose forward returns the
stored output), because the real DeepSeek-V3 routers cost ~28 ms of CPU per layer per step
here (61 layers: ~1.7 s a step) and the benchmark needs hundreds of steps per cell:

* ``deepseek_v3``: 61 MoE layers x 256 experts, top-8, ``DeepseekV3TopkRouter`` (sigmoid
  scores + e_score_correction_bias, 8 groups, top-4 groups, normalised, scaled by 2.5),
  4096 tokens per step (DeepSeek-V3: 58 MoE layers of 61 in the real model; the issue's shape
  counts 61, and so do we).
* ``olmoe``: 16 layers x 64 experts, top-8, ``OlmoeTopKRouter`` (softmax top-k), 4096 tokens.
* ``deepseek_v3_decode``: DeepSeek-V3's routers on 8 tokens per forward (one decoding step of
  8 sequences): the per-call overhead of the hooks, not the data, is the cost (not run by default).

Per ``flush_every`` in {1, 10, 50, 200}, one fresh ``probes.attach(steps="manual")`` per cell,
forwards under ``torch.no_grad`` (mode EVAL; ``--inference``: ``torch.inference_mode``),
``h.step()`` after each:

* in-hook ms per step: thread CPU time inside the router hooks (``HookBracket``,
  ``benchmarks/hook_cpu_time.py``), median over steps;
* ``h.step()`` ms (wall) of steps that close no window, median;
* window-close stall: wall ms of the ``h.step()`` calls that close a window (the training
  thread waits for them), median and max; and the training thread's CPU ms in them (load-proof:
  wall time on a loaded machine includes time descheduled, CPU time excludes any wait for the
  background writer, which the wall time includes);
* the ``h.step()`` right after a close (wall and CPU ms): since issue 19 item 3 it waits for
  the closed window's write when that is not done yet (durability), so a slow write shows here;
* device-buffer bytes of the recorder after the run (``Recorder.nbytes``: ``acc``, ``win`` and
  two history buffers, 4 kinds x 3 modes x layers x (experts + 2) float64 each, x
  (2 + 2 x flush_every); before item 3 ``acc`` + one ``hist``, x (1 + flush_every));
* Parquet bytes per step, by table, after detach.

``--backends native torch_ops`` measures the C counting and the PyTorch ops in one run: one
handle per backend on the same model, taking turns step by step (the order rotates), each cell
once per backend (``backend``, ``native``: whether its recorder counted in C;
``rows_equal_across_backends``: every backend stored the same routing rows, bit for bit).
Both handles close a window at the same step, so the step after it is not comparable between
them: the first to run waits for its write while the other's write shares the CPU, and the
second finds its write done (compare in-hook time and window-close CPU time instead).

Each (shape, flush_every) cell is cached under ``--cache`` (resumable). Writes
``benchmarks/results/probe_scale.json``.

With ``--on-snapshot`` a no-op ``on_snapshot`` callback is registered (what ``chrono.govern``
does), so the snapshot rows and alerts are built in the training thread at window close.

usage: nice -n 10 python benchmarks/probe_scale.py [--quick] [--shapes deepseek_v3 olmoe] [--flush 1 10 50 200]
       [--on-snapshot] [--backends native torch_ops]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import chrono  # noqa: E402
import probes  # noqa: E402
from probes import native  # noqa: E402
from benchmarks._common import cached, fmt, uptime, write_json  # noqa: E402
from benchmarks.hook_cpu_time import CLOCK, HookBracket  # noqa: E402

SHAPES = {
    "deepseek_v3": {"layers": 61, "experts": 256, "top_k": 8, "tokens": 4096, "router": "DeepseekV3TopkRouter"},
    "olmoe": {"layers": 16, "experts": 64, "top_k": 8, "tokens": 4096, "router": "OlmoeTopKRouter"},
    # one decoding step of a batch of 8 sequences: 8 tokens per forward, per-op overhead dominates
    "deepseek_v3_decode": {"layers": 61, "experts": 256, "top_k": 8, "tokens": 8, "router": "DeepseekV3TopkRouter"},
    "tiny": {"layers": 3, "experts": 16, "top_k": 4, "tokens": 64, "router": "DeepseekV3TopkRouter"},
}
HIDDEN = 64
STAND_IN = ("routing-only stand-in: transformers' router modules (linear + sigmoid/softmax top-k) with "
            f"random weights and hidden {HIDDEN}, no attention and no expert FFNs; each router's real "
            "outputs on a few inputs are computed once and replayed in turn by the timed steps")


def _router(kind: str, experts: int, top_k: int):
    if kind == "DeepseekV3TopkRouter":
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
        cfg = DeepseekV3Config(hidden_size=HIDDEN, n_routed_experts=experts, num_experts_per_tok=top_k,
                               n_group=8, topk_group=4, norm_topk_prob=True, routed_scaling_factor=2.5)
        return DeepseekV3TopkRouter(cfg)
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter
    return OlmoeTopKRouter(OlmoeConfig(hidden_size=HIDDEN, num_experts=experts, num_experts_per_tok=top_k))


class _Mlp(nn.Module):
    def __init__(self, gate):
        super().__init__()
        self.gate = gate


def _replay_forward(self, hidden):
    return self._replay[self._turn[0]]


class RoutingOnly(nn.Module):
    """``layers.<i>.mlp.gate``: one real router per layer (random weights).

    ``replay(inputs)``: run every router's real forward on each ``[T, HIDDEN]`` input once,
    then make each router a subclass of its own class whose forward returns the stored output
    of turn ``step % len(inputs)`` (``forward(step)``)."""

    def __init__(self, layers: int, experts: int, top_k: int, router: str, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(nn.Module() for _ in range(layers))
        for block in self.layers:
            block.mlp = _Mlp(_router(router, experts, top_k))
            with torch.no_grad():
                block.mlp.gate.weight.normal_(0, 0.5)
                if hasattr(block.mlp.gate, "e_score_correction_bias"):
                    block.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
        self._turn = [0]
        self._n = 1

    def replay(self, inputs, inference: bool = False) -> None:
        """``inference``: the stored outputs are made under ``torch.inference_mode`` (inference
        tensors, as a router run there returns), else under ``torch.no_grad``."""
        self._n = len(inputs)
        for block in self.layers:
            gate = block.mlp.gate
            with torch.inference_mode() if inference else torch.no_grad():
                gate._replay = [tuple(t.detach() for t in gate(x)) for x in inputs]
            gate._turn = self._turn
            gate.__class__ = type(f"Replay{type(gate).__name__}", (type(gate),), {"forward": _replay_forward})

    def forward(self, step: int):
        self._turn[0] = step % self._n
        for block in self.layers:
            block.mlp.gate(None)


def recorder_bytes(h, depth: int = 3) -> int | None:
    """Bytes of the handle's on-device count buffers: the first object found among the handle's
    attributes (searched ``depth`` levels deep) that holds ``acc`` and ``hist`` tensors (the
    recorder); None when there is none."""
    level = [h]
    for _ in range(depth):
        nxt = []
        for obj in level:
            acc, hist = getattr(obj, "acc", None), getattr(obj, "hist", None)
            if torch.is_tensor(acc) and torch.is_tensor(hist):
                nbytes = getattr(obj, "nbytes", None)   # all its buffers, where it says so
                return nbytes if isinstance(nbytes, int) else acc.nbytes + hist.nbytes
            if hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, torch.Tensor, type)):
                nxt += list(vars(obj).values())
        level = nxt
    return None


def parquet_bytes(root: Path, run: str) -> dict:
    out = {}
    for p in Path(root).rglob("*.parquet"):
        if f"run_id={run}" in p.parts:
            table = p.parts[p.parts.index(f"run_id={run}") - 1]
            out[table] = out.get(table, 0) + p.stat().st_size
    return out


@contextlib.contextmanager
def _backend(name: str):
    """Attach under counting backend ``name``: ``default`` (what ``probes.attach`` picks here),
    ``native`` (the C module; an error if it cannot be built) or ``torch_ops`` (``probes.native``
    made unavailable while attaching, as ``CHRONO_NATIVE=0`` does)."""
    if name == "native" and native.load() is None:
        raise SystemExit("probe_scale: --backends native: probes.native could not build its C module "
                         "(see the log); install a C compiler and Python headers, or drop it")
    saved = native.load
    if name == "torch_ops":
        native.load = lambda: None
    try:
        yield
    finally:
        native.load = saved


def run_cell(shape: str, flush_every: int, windows: int, min_steps: int, variants: int = 2,
             on_snapshot: bool = False, inference: bool = False, backends=("default",)) -> list:
    """One (shape, flush_every): a list of one cell per backend. With several backends each has
    its own handle on the same model and they take turns, step by step (the order rotates), so
    load drift hits them alike; only the handle whose turn it is records."""
    s = SHAPES[shape]
    model = RoutingOnly(s["layers"], s["experts"], s["top_k"], s["router"]).eval()
    g = torch.Generator().manual_seed(1)
    model.replay([torch.randn(s["tokens"], HIDDEN, generator=g) for _ in range(variants)], inference)
    steps = max(min_steps, windows * flush_every)
    root = Path(tempfile.mkdtemp(prefix="probe_scale_"))
    routers = [b.mlp.gate for b in model.layers]
    bracket = HookBracket(routers, [model])   # the model: where staged calls are counted
    arms = {}
    for b in backends:
        run = f"{shape}-f{flush_every}" + ("" if len(backends) == 1 else f"-{b}")
        with _backend(b):
            h = probes.attach(model, run=run, root=root, flush_every=flush_every, steps="manual")
        if on_snapshot:   # what chrono.govern does: the snapshot is then built in the training thread
            h.on_snapshot(lambda step, rows, handle: None)
        h._active = len(backends) == 1
        arms[b] = {"h": h, "run": run, "hook": [], "step": [], "stall": [], "stall_cpu": [], "fwd": [],
                   "after": [], "after_cpu": [], "closed_last": False}
    bracket.close()
    load_before = os.getloadavg()
    names = list(backends)
    with torch.inference_mode() if inference else torch.no_grad():
        for i in range(steps):
            for b in names[i % len(names):] + names[:i % len(names)]:
                a, h = arms[b], arms[b]["h"]
                h._active = True
                b0 = bracket.seconds
                t0 = time.perf_counter()
                model(i)
                t1 = time.perf_counter()
                w0 = h.stats()["windows"]
                c1 = CLOCK()
                h.step()
                t2 = time.perf_counter()
                if len(names) > 1:
                    h._active = False
                a["hook"].append(1e3 * (bracket.seconds - b0))
                a["fwd"].append(1e3 * (t1 - t0))
                closed = h.stats()["windows"] != w0
                if closed:
                    a["stall"].append(1e3 * (t2 - t1))
                    a["stall_cpu"].append(1e3 * (CLOCK() - c1))
                else:
                    a["step"].append(1e3 * (t2 - t1))
                if a["closed_last"]:   # the step after a close (it may wait for that window's write)
                    a["after"].append(1e3 * (t2 - t1))
                    a["after_cpu"].append(1e3 * (CLOCK() - c1))
                a["closed_last"] = closed
    for a in arms.values():
        a["buf_bytes"] = recorder_bytes(a["h"])   # after the windows: a second history buffer may exist
        a["native"] = a["h"]._window.rec.native is not None
    for a in arms.values():
        a["h"]._active = True
        a["h"].detach()
        a["stats"] = a["h"].stats()   # after detach: the last window's write is done
    bracket.remove()
    load_after = os.getloadavg()
    med = (lambda v: statistics.median(v) if v else None)
    same = None   # every backend stored the same rows (each handle saw the same router outputs)
    if len(arms) > 1:
        con = chrono.connect(root)
        q = ("SELECT step, mode, layer, expert, tokens, weight_sum, dropped FROM routing "
             "WHERE run_id = ? ORDER BY ALL")
        got = [con.execute(q, [a["run"]]).fetchall() for a in arms.values()]
        same = all(g == got[0] for g in got) and len(got[0]) > 0
    cells = []
    for b, a in arms.items():
        pq = parquet_bytes(root, a["run"])
        stats = a["stats"]
        cells.append({
            "shape": shape, **{k: v for k, v in s.items()}, "hidden": HIDDEN, "flush_every": flush_every,
            "backend": b, "native": a["native"], "interleaved_with": [x for x in names if x != b],
            "rows_equal_across_backends": same,
            "replayed_variants": variants, "on_snapshot_callback": on_snapshot,
            "grad_mode": "inference_mode" if inference else "no_grad",
            "steps": steps, "windows_closed": len(a["stall"]),
            "in_hook_ms_per_step": med(a["hook"]), "in_hook_ms_max": max(a["hook"]),
            "forward_ms_per_step": med(a["fwd"]),
            "h_step_ms": med(a["step"]), "h_step_ms_max": max(a["step"]) if a["step"] else None,
            "window_close_stall_ms_median": med(a["stall"]),
            "window_close_stall_ms_max": max(a["stall"]) if a["stall"] else None,
            "window_close_cpu_ms_median": med(a["stall_cpu"]),
            "window_close_cpu_ms_max": max(a["stall_cpu"]) if a["stall_cpu"] else None,
            "after_close_step_ms_median": med(a["after"]),
            "after_close_step_ms_max": max(a["after"]) if a["after"] else None,
            "after_close_step_cpu_ms_median": med(a["after_cpu"]),
            "device_buffer_bytes": a["buf_bytes"],
            "parquet_bytes_per_step": {t: n / steps for t, n in sorted(pq.items())},
            "parquet_bytes_per_step_total": sum(pq.values()) / steps,
            "rows_written": stats.get("rows_written"), "write_errors": stats.get("write_errors"),
            "stall_ms": a["stall"], "loadavg_before": load_before, "loadavg_after": load_after,
            "uptime_after": uptime(),
        })
    return cells


def table(cells) -> str:
    head = (f"{'shape':<12} {'backend':<9} {'flush':>5} {'steps':>5} {'in-hook ms':>10} {'fwd ms':>7} {'h.step ms':>9} "
            f"{'stall med':>9} {'stall max':>9} {'close CPU med':>13} {'close CPU max':>13} {'next step ms':>12} "
            f"{'buffers MiB':>11} {'Parquet B/step':>14}")
    rows = [head]
    f = fmt
    for c in cells:
        rows.append(f"{c['shape']:<12} {c.get('backend', 'default'):<9} {c['flush_every']:>5} {c['steps']:>5} {f(c['in_hook_ms_per_step'], 10, 2)} "
                    f"{f(c['forward_ms_per_step'], 7, 1)} {f(c['h_step_ms'], 9, 3)} "
                    f"{f(c['window_close_stall_ms_median'], 9, 1)} {f(c['window_close_stall_ms_max'], 9, 1)} "
                    f"{f(c.get('window_close_cpu_ms_median'), 13, 1)} {f(c.get('window_close_cpu_ms_max'), 13, 1)} "
                    f"{f(c.get('after_close_step_ms_median'), 12, 1)} "
                    f"{f(None if c['device_buffer_bytes'] is None else c['device_buffer_bytes'] / 2**20, 11, 2)} "
                    f"{c['parquet_bytes_per_step_total']:14.0f}")
    return "\n".join(rows)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["deepseek_v3", "olmoe"], choices=list(SHAPES))
    p.add_argument("--flush", nargs="+", type=int, default=[1, 10, 50, 200], help="flush_every values")
    p.add_argument("--windows", type=int, default=2, help="windows closed per cell (default 2)")
    p.add_argument("--min-steps", type=int, default=20, help="at least this many steps per cell (default 20)")
    p.add_argument("--variants", type=int, default=2, help="router outputs replayed in turn (default 2)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--on-snapshot", action="store_true",
                   help="register a no-op on_snapshot callback (as chrono.govern does): the snapshot "
                        "rows are then built in the training thread at window close")
    p.add_argument("--inference", action="store_true",
                   help="forwards under torch.inference_mode instead of torch.no_grad")
    p.add_argument("--backends", nargs="+", default=["default"], choices=["default", "native", "torch_ops"],
                   help="counting backends, each its own handle on the same model, taking turns step by "
                        "step (default: 'default', what probes.attach picks here; 'native torch_ops' "
                        "compares the C counting with the PyTorch ops in one run)")
    p.add_argument("--quick", action="store_true", help="tiny shape, flush_every 1 and 2: checks the script only")
    p.add_argument("--cache", default=str(HERE / "results" / "probe_scale_cache"),
                   help="per-(shape, flush_every) results; a cell found here is not rerun")
    p.add_argument("--out", default=str(HERE / "results" / "probe_scale.json"))
    a = p.parse_args(argv)
    if a.quick:
        a.shapes, a.flush, a.windows, a.min_steps = ["tiny"], [1, 2], 2, 4
    torch.set_num_threads(a.threads)
    cells = []
    for shape in a.shapes:
        for f in a.flush:
            cb = ("_cb" if a.on_snapshot else "") + ("_inf" if a.inference else "")
            be = "" if a.backends == ["default"] else "_" + "-".join(a.backends)
            path = Path(a.cache) / f"{shape}_f{f}_w{a.windows}{cb}{be}.json"
            got = cached(path, lambda: {"cells": run_cell(shape, f, a.windows, a.min_steps, a.variants,
                                                          a.on_snapshot, a.inference, a.backends)},
                         use_cache=not a.quick)
            got = got["cells"] if "cells" in got else [got]   # (a cell cached before --backends)
            cells += got
            print("\n".join(table(got).splitlines()[1:]), flush=True)
    print("\n" + STAND_IN + "\n" + table(cells))
    return write_json(a.out, "probe_scale", {"cells": cells}, quick=a.quick, model=STAND_IN)


if __name__ == "__main__":
    main()
