"""Where a staged flush's CPU time goes inside a real forward, and whether a fused op helps.

chrono counts a forward's router calls together when the forward ends (``probes/staging.py``):
about seven device ops per forward whatever the depth. ``probe_overhead.py`` finds that this
fixed cost is what keeps chrono above the SGLang-style arm with 4 MoE layers on CPU. This
script measures it from two sides, on the HF Mixtral of ``probe_overhead.py`` (same builder,
shapes and depths), one torch thread, thread CPU time (``time.thread_time``):

1. **first vs again.** The script's own router hooks keep a reference to each router's output;
   when the forward ends, its forward hook runs the device ops of chrono's flush (written out
   here from the ``probes/staging.py`` docstring, not imported) twice in a row and times each
   op. The first pass is what a flush pays right after the model's own work; the second, the
   same ops on the same data moments later, is what they cost once their code is warm again.
2. **fused flush.** One arm flushes per forward, the arm order rotating every round:
   ``eager_a`` / ``eager_b`` (the same eager ops: the A/A control), ``compiled`` (the same
   function through ``torch.compile``, inductor, ``fullgraph``: one generated C++ kernel set
   instead of seven ATen ops) and ``chrono`` (``probes.attach``; its ``Stage.flush``, timed
   by wrapping the instance method: the real flush with its Python bookkeeping). Ratios are
   over ``eager_a``. Before timing, the token counts of the eager and compiled flushes are
   checked against a ``bincount`` of every router's indices (computed by a hook of its own).

Writes ``benchmarks/results/flush_anatomy.json``.

usage: nice -n 10 python benchmarks/flush_anatomy.py [--layers 4 32] [--modes train infer]
       [--rounds 20] [--quick]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import probes  # noqa: E402
from benchmarks._common import uptime, write_json  # noqa: E402
from benchmarks.probe_overhead import EXPERTS, SHAPES, VOCAB, build, routers  # noqa: E402

CLOCK = time.thread_time
WIDTH = EXPERTS + 2          # per router: the -1 column, the experts, the overflow column
LCAT_MIN = 8                 # as probes/staging.py: logits concatenated for one sum from 8 calls
# as probes/staging.py since 90220d3: weights concatenated in their own dtype, then one copy_ into the
# float64 source; fewer than 8 logit sums stacked in float32, then one copy_
OPS = ["cat indices", "cat weights + copy_", "logit sums", "clamp_", "add (column base)", "index_add_"]


def eager_flush(idx, w, logits, buf, acc, times=None):
    """The flush's device ops on preallocated buffers (``buf``: ``layout``). ``times``: a dict
    op -> seconds to add each op's thread CPU time to (None: untimed)."""
    raw, base, col, src, ix, wx, sums, wbuf, sbuf = buf
    n = ix.numel()
    steps = [lambda: torch.cat(idx, out=ix),
             lambda: wx.copy_(torch.cat(w, out=wbuf)),
             (lambda: sums.copy_(torch.cat(logits).view(len(logits), -1).sum(1))) if len(logits) >= LCAT_MIN
             else (lambda: sums.copy_(torch.stack([t.sum() for t in logits], out=sbuf))),
             lambda: raw[:n].clamp_(-1, EXPERTS),
             lambda: torch.add(raw, base, out=col),
             lambda: acc.index_add_(1, col, src)]
    for name, op in zip(OPS, steps):
        t0 = CLOCK() if times is not None else 0.0
        op()
        if times is not None:
            times[name] = times.get(name, 0.0) + CLOCK() - t0


def fused(idx, w, logits, base, acc):
    """The same counts as one function for ``torch.compile`` (no ``out=`` buffers)."""
    raw = torch.cat([i.reshape(-1) for i in idx]).clamp(-1, EXPERTS)
    sums = torch.stack([t.sum() for t in logits]).to(torch.float64)
    wt = torch.cat([x.reshape(-1) for x in w]).to(torch.float64)
    src = torch.stack([torch.cat([torch.ones_like(wt), torch.zeros_like(sums)]), torch.cat([wt, sums])])
    acc.index_add_(1, torch.cat([raw, torch.full_like(sums, -1, dtype=torch.int64)]) + base, src)


def layout(calls: int, tokens: int, k: int):
    """Buffers of one forward of ``calls`` router calls of ``tokens`` x ``k`` (as staging's)."""
    n = calls * tokens * k
    bases = torch.arange(calls, dtype=torch.int64) * WIDTH + 1
    base = torch.cat([bases.repeat_interleave(tokens * k), bases])
    raw = torch.full((n + calls,), -1, dtype=torch.int64)
    src = torch.ones((2, n + calls), dtype=torch.float64)
    src[0, n:] = 0
    return (raw, base, torch.empty_like(raw), src, raw[:n].view(-1, k), src[1, :n].view(-1, k), src[1, n:],
            torch.empty((calls * tokens, k)), torch.empty(calls))   # float32 weights and logit sums


def run_cell(shape: str, mode: str, layers: int, rounds: int, warmup: int, batch: int, seq: int) -> dict:
    model = build(**SHAPES[shape], layers=layers)
    model.train(mode == "train")
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0))
    rs = routers(model)
    staged, truth, state = [], torch.zeros(len(rs), EXPERTS, dtype=torch.int64), {"arm": None, "truth": False}

    def stage(layer):
        def hook(module, args, out):
            if state["arm"] in ("eager_a", "eager_b", "compiled", "first_again"):
                staged.append(out)
            if state["truth"]:   # ground truth, independent of the flushes: bincount per router
                truth[layer] += torch.bincount(out[2].reshape(-1), minlength=EXPERTS)
        return hook

    handles = [r.register_forward_hook(stage(i)) for i, r in enumerate(rs)]
    buf = layout(len(rs), batch * seq, rs[0].top_k)
    acc = {a: torch.zeros(2, len(rs) * WIDTH, dtype=torch.float64) for a in ("eager_a", "eager_b", "compiled", "first_again")}
    compiled = torch.compile(fused, fullgraph=True, dynamic=False)
    timings = {a: [] for a in ("eager_a", "eager_b", "compiled", "chrono")}
    first, again = {op: [] for op in OPS}, {op: [] for op in OPS}

    def flush(module, args, out):
        arm = state["arm"]
        if arm not in acc:
            return None
        calls, staged[:] = list(staged), []
        idx, w, logits = [c[2] for c in calls], [c[1] for c in calls], [c[0] for c in calls]
        with torch.no_grad():
            t0 = CLOCK()
            if arm == "first_again":
                for into in (first, again):
                    times = {}
                    eager_flush(idx, w, logits, buf, acc[arm], times)
                    for op, s in times.items():
                        into[op].append(s)
            elif arm == "compiled":
                compiled(idx, w, logits, buf[1], acc[arm])
            else:
                eager_flush(idx, w, logits, buf, acc[arm])
            if state["timed"] and arm != "first_again":
                timings[arm].append(CLOCK() - t0)
        return None

    handles.append(model.register_forward_hook(flush))
    h = probes.attach(model, run="chrono", root=tempfile.mkdtemp(prefix="flush_anatomy_"), tokens=0.0,
                      flush_every=50, steps="manual")
    stage_ = h._window.rec.stage
    real_flush = stage_.flush

    def timed_flush(forward_ended=None):   # the real Stage.flush at a forward's end, timed
        t0 = CLOCK()
        real_flush(forward_ended)
        if state["arm"] == "chrono" and state["timed"] and forward_ended is not None:
            timings["chrono"].append(CLOCK() - t0)
    stage_.flush = timed_flush

    def forward(arm, timed):
        state["arm"], state["timed"] = arm, timed
        h._active = arm == "chrono"
        if mode == "train":
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode():
                model(input_ids=ids)
        if arm == "chrono":
            h.step()

    t0 = time.perf_counter()   # check forwards (the first compiles the fused flush): counts vs truth
    check = {}
    for arm in ("compiled", "eager_a"):
        acc[arm].zero_()
        truth.zero_()
        state["truth"] = True
        forward(arm, False)
        state["truth"] = False
        check[arm] = bool(torch.equal(acc[arm][0].view(len(rs), WIDTH)[:, 1:-1].long(), truth))
    compile_s = time.perf_counter() - t0
    arms = ["eager_a", "eager_b", "compiled", "chrono", "first_again"]
    load = [os.getloadavg()]
    for r in range(warmup + rounds):
        for arm in arms[r % len(arms):] + arms[:r % len(arms)]:
            forward(arm, r >= warmup)
    load.append(os.getloadavg())
    h._active = True
    h.detach()
    for hd in handles:
        hd.remove()
    med = {a: 1e6 * statistics.median(v) for a, v in timings.items()}
    return {"shape": shape, "mode": mode, "layers": layers, "experts": EXPERTS, "top_k": rs[0].top_k,
            "batch": batch, "seq": seq, "rounds": rounds, "warmup": warmup,
            "check_forward_s": compile_s, "counts_equal_truth": check,
            "flush_us": med, "ratio_vs_eager_a": {a: v / med["eager_a"] for a, v in med.items()},
            "first_us": {op: 1e6 * statistics.median(v) for op, v in first.items()},
            "again_us": {op: 1e6 * statistics.median(v) for op, v in again.items()},
            "first_total_us": 1e6 * statistics.median([sum(t) for t in zip(*first.values())]),
            "again_total_us": 1e6 * statistics.median([sum(t) for t in zip(*again.values())]),
            "loadavg": load, "uptime_after": uptime()}


def table(c: dict) -> str:
    lines = [f"\n{c['shape']}, {c['layers']} MoE layers, {c['mode']}, batch {c['batch']}x{c['seq']}, "
             f"{c['rounds']} rounds; load {c['loadavg'][0][0]:.1f} -> {c['loadavg'][1][0]:.1f}; "
             f"counts equal truth: {c['counts_equal_truth']}",
             f"{'op':<26} {'first us':>9} {'again us':>9} {'first/again':>11}"]
    for op in OPS:
        f, a = c["first_us"][op], c["again_us"][op]
        lines.append(f"{op:<26} {f:9.1f} {a:9.1f} {f / a if a else float('nan'):11.2f}")
    lines.append(f"{'all ops':<26} {c['first_total_us']:9.1f} {c['again_total_us']:9.1f} "
                 f"{c['first_total_us'] / c['again_total_us']:11.2f}")
    lines.append(f"{'flush arm':<26} {'us':>9} {'/eager_a':>9}")
    for a, v in c["flush_us"].items():
        lines.append(f"{a:<26} {v:9.1f} {c['ratio_vs_eager_a'][a]:9.3f}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", nargs="+", type=int, default=[4, 32], help="MoE layers (default 4 32)")
    p.add_argument("--shapes", nargs="+", default=["small"], choices=list(SHAPES))
    p.add_argument("--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    p.add_argument("--rounds", type=int, default=20, help="timed rounds of all arms (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="3 layers, 2 rounds, batch 2x32, training only: "
                   "checks the script and the counts, not the target setup")
    p.add_argument("--out", default=str(HERE / "results" / "flush_anatomy.json"))
    a = p.parse_args(argv)
    if a.quick:
        a.layers, a.rounds, a.warmup, a.batch, a.seq, a.modes, a.shapes = [3], 2, 1, 2, 32, ["train"], ["small"]
    torch.set_num_threads(1)
    cells = []
    for layers in a.layers:
        for shape in a.shapes:
            for mode in a.modes:
                cell = run_cell(shape, mode, layers, a.rounds, a.warmup, a.batch, a.seq)
                print(table(cell), flush=True)
                cells.append(cell)
    return write_json(a.out, "flush_anatomy", {"cells": cells}, quick=a.quick, clock="time.thread_time")


if __name__ == "__main__":
    main()
