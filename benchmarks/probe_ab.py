"""A code change to the probes, measured: this tree's probes (A, A') against git ref REF's (B).

Three ``probes.attach`` handles on one HF Mixtral model (random weights, from a config), in one
process: A and A' are this tree's ``probes`` (two identical arms: the A/A control, the noise),
B is the ``probes`` package at ``--ref`` (extracted with ``git archive``, imported as
``probes_base``, as ``probe_overhead.py --base`` does). Only one handle is active per step and
the arm order rotates every round. In-hook time is thread CPU time inside the router hooks and
the model's and decoder stack's hooks, every arm measured by one ``HookBracket``
(``benchmarks/hook_cpu_time.py``): the same instrument as ``probe_overhead.py``, with fewer
arms, so more rounds per minute. Per round, A/B and A'/B are taken between steps run seconds
apart; the reported ratio is the median of those per-round ratios (and its quartiles), which
load drift moves less than a ratio of medians. Before timing, one forward with all three
active checks that their stored counts are equal.

usage: nice -n 10 python benchmarks/probe_ab.py --ref 926539c [--layers 32] [--mode infer]
       [--batch 8 --seq 1] [--tokens 0.01] [--rounds 60] [--out benchmarks/results/probe_ab.json]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from benchmarks._common import uptime, write_json  # noqa: E402
from benchmarks.hook_cpu_time import HookBracket  # noqa: E402
from benchmarks.probe_overhead import SHAPES, VOCAB, ChronoArm, base_probes, build, routers  # noqa: E402


def _quartiles(xs: list) -> tuple:
    q = np.percentile(np.asarray(xs), [25, 50, 75])
    return float(q[0]), float(q[1]), float(q[2])


def run(ref: str, shape: str, mode: str, layers: int, batch: int, seq: int, rounds: int, warmup: int,
        tokens: float) -> dict:
    model = build(**SHAPES[shape], layers=layers)
    model.train(mode == "train")
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0))
    tmp = tempfile.mkdtemp(prefix="probe_ab_")
    bracket = HookBracket(routers(model), [model, model.model])
    arms = {"A": ChronoArm(model, tmp, "a", tokens), "B": ChronoArm(model, tmp, "b", tokens, package=base_probes(ref)),
            "A2": ChronoArm(model, tmp, "a2", tokens)}
    bracket.close()

    def forward(update=True):   # one training step (``update``: with the optimizer step), or inference
        if mode == "train":
            model(input_ids=ids, labels=ids).loss.backward()
            if update:
                opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode():
                model(input_ids=ids)

    def step(name):
        arm = arms[name]
        arm.active = True
        s0 = bracket.seconds
        forward()
        arm.end_step()
        arm.active = False
        return bracket.seconds - s0

    for arm in arms.values():   # the check step (step 0 of every handle): all three active
        arm.active = True
    forward(update=False)
    for arm in arms.values():
        arm.end_step()
        arm.active = False
    names = list(arms)
    load_before = os.getloadavg()
    t0 = time.time()
    for _ in range(warmup):
        for n in names:
            step(n)
    per = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % 3:] + names[:r % 3]:
            per[n].append(step(n))
    wall = time.time() - t0
    load_after = os.getloadavg()
    for arm in arms.values():
        arm.close()
    stored = {n: arms[n].stored_counts(0) for n in names}
    equal = all(np.array_equal(stored[n], stored["B"]) for n in names)
    med = {n: 1e3 * statistics.median(v) for n, v in per.items()}
    ratio = {f"{a}/B": _quartiles([x / y for x, y in zip(per[a], per["B"])]) for a in ("A", "A2")}
    ratio["A/A2"] = _quartiles([x / y for x, y in zip(per["A"], per["A2"])])
    return {"ref": ref, "shape": shape, "mode": mode, "layers": layers, "batch": batch, "seq": seq,
            "tokens": tokens, "rounds": rounds, "warmup": warmup, "counts_equal": bool(equal),
            "check_tokens": int(stored["A"].sum()), "in_hook_ms_median": med,
            "per_round_ratio_quartiles": ratio, "in_hook_s": per, "seconds": wall,
            "loadavg_before": load_before, "loadavg_after": load_after, "uptime_after": uptime()}


def report(cell: dict) -> str:
    m, r = cell["in_hook_ms_median"], cell["per_round_ratio_quartiles"]
    q = {k: f"{v[1]:.3f} [{v[0]:.3f}, {v[2]:.3f}]" for k, v in r.items()}
    return (f"{cell['shape']} {cell['layers']} layers, {cell['mode']}, {cell['batch']}x{cell['seq']}, tokens "
            f"{cell['tokens']}, {cell['rounds']} rounds, load {cell['loadavg_before'][0]:.1f} -> "
            f"{cell['loadavg_after'][0]:.1f}, counts equal: {cell['counts_equal']}\n"
            f"  in-hook ms (median): A {m['A']:.3f}  B ({cell['ref']}) {m['B']:.3f}  A' {m['A2']:.3f}\n"
            f"  per-round ratio, median [quartiles]: A/B {q['A/B']}  A'/B {q['A2/B']}  A/A' (noise) {q['A/A2']}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", required=True, help="git ref of the probes to compare with (arm B)")
    p.add_argument("--shape", default="small", choices=list(SHAPES))
    p.add_argument("--mode", default="train", choices=["train", "infer"])
    p.add_argument("--layers", type=int, default=4, help="MoE layers (default 4)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128, help="tokens per row (default 128; 1: a decoding step)")
    p.add_argument("--tokens", type=float, default=0.0, help="attach(tokens=...) of all three arms (default 0)")
    p.add_argument("--rounds", type=int, default=40, help="timed rounds of the three arms (default 40)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--quick", action="store_true", help="2 rounds, batch 2x16: checks the script, not a timing")
    p.add_argument("--out", default=str(HERE / "results" / "probe_ab.json"))
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.warmup, a.batch, a.seq = 2, 0, 2, 16
    torch.set_num_threads(1)
    cell = run(a.ref, a.shape, a.mode, a.layers, a.batch, a.seq, a.rounds, a.warmup, a.tokens)
    print(report(cell), flush=True)
    return write_json(a.out, "probe_ab", {"cell": cell}, quick=a.quick,
                      in_hook_clock="time.thread_time (thread CPU time), HookBracket")


if __name__ == "__main__":
    main()
