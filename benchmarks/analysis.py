"""Speed and memory of `chrono.analysis` over 10 M per-token rows, and of the placement planner.

Analyses: a synthetic run of 10 M per-token rows (4 layers x 64 experts, top-2,
batch 8 x 256 tokens per step, token ids Zipf over 4096 with a per-layer
preferred expert, the same tokens at every layer so transitions match), plus a
routing-only run of 10 M routing rows (16 layers x 64 experts x 9766 steps) for
`loads` and `drift`'s JS part. Each analysis runs in a fresh subprocess (its
peak RSS measured alone): one cold run (connect + query) and two warm ones;
wall seconds and process CPU seconds (all threads) are both recorded, because on
a shared machine wall time mostly measures the other tenants.
DuckDB runs with chrono.connect's settings (2 threads, default memory limit).

A side-by-side competitor for one analysis: co-activation counts written the way
a one-off Polars script would (self-join on the token key), same data.

Planner: 61 layers x 256 experts (lognormal loads) on 64 GPUs, EPLB
hierarchical (8 groups, 8 nodes, 64 replicas) and global (1 node), with and
without chrono's swap refinement, best of 5, interleaved.

    nice -n 10 python benchmarks/analysis.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

LAYERS, EXPERTS, TOP_K, VOCAB = 4, 64, 2, 4096
BATCH, SEQ = 8, 256
ROWS_PER_STEP = BATCH * SEQ * TOP_K * LAYERS
KINDS = ["coactivation", "vocabulary", "transitions", "drift", "loads"]


def generate(root: Path, rows: int, seed: int = 0) -> None:
    """Token-level run 'bench' (rows per-token rows) and routing-only run 'bench-routing'."""
    import chrono
    from chrono.store import run_meta_dir
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    if run_meta_dir(root, "bench") is None:
        steps = rows // ROWS_PER_STEP
        n = BATCH * SEQ
        b = np.repeat(np.arange(BATCH, dtype=np.int32), SEQ * TOP_K)
        pos = np.tile(np.repeat(np.arange(SEQ, dtype=np.int32), TOP_K), BATCH)
        k = np.tile(np.arange(TOP_K, dtype=np.int16), n)
        zipf = 1.0 / np.arange(1, VOCAB + 1)
        zipf /= zipf.sum()
        model = {"layers": list(range(LAYERS)), "experts_per_layer": {str(l): EXPERTS for l in range(LAYERS)},
                 "top_k": TOP_K}
        with chrono.open_run(root, "bench", model=model, auto_flush_rows=4_000_000) as w:
            for step in tqdm(range(steps), desc=f"tokens {rows / 1e6:.0f}M rows", unit="step"):
                tid = rng.choice(VOCAB, n, p=zipf)
                counts = np.zeros((LAYERS, EXPERTS), dtype=np.int64)
                for layer in range(LAYERS):
                    pref = (tid * (2 * layer + 7) * 40503 + step // 100) % EXPERTS  # drifts slowly
                    e0 = np.where(rng.random(n) < 0.6, pref, rng.integers(0, EXPERTS, n))
                    e1 = (e0 + 1 + rng.integers(0, EXPERTS - 1, n)) % EXPERTS
                    ex = np.stack([e0, e1], 1).reshape(-1)
                    w.log_tokens(step, layer, ex, weight=rng.random(n * TOP_K, dtype=np.float32),
                                 batch_idx=b, position=pos, k=k, token_id=np.repeat(tid, TOP_K))
                    counts[layer] = np.bincount(ex, minlength=EXPERTS)
                w.log_routing(step, np.arange(LAYERS), counts)
    if run_meta_dir(root, "bench-routing") is None:
        layers = 16
        steps = -(-rows // (layers * EXPERTS))
        p = rng.dirichlet(np.ones(EXPERTS) * 0.5, size=layers)
        model = {"layers": list(range(layers)), "experts_per_layer": {str(l): EXPERTS for l in range(layers)}}
        with chrono.open_run(root, "bench-routing", model=model, auto_flush_rows=4_000_000) as w:
            for step in tqdm(range(steps), desc="routing rows", unit="step"):
                c = np.stack([rng.multinomial(4096, p[l]) for l in range(layers)])
                w.log_routing(step, np.arange(layers), c)


def child(kind: str, root: str, run: str) -> None:
    import chrono
    from chrono.analysis import Scope, analyze

    times, cpu, rows = [], [], 0
    for _ in range(3):
        t0, c0 = time.perf_counter(), time.process_time()
        con = chrono.connect(root)
        if kind == "polars-coactivation":
            import polars as pl

            key = ["layer", "mode", "rank", "step", "batch_idx", "position"]
            t = chrono.read(root, "tokens", run).select(key + ["k", "expert"])
            q = (t.join(t, on=key, suffix="_b").filter(pl.col("k") < pl.col("k_b"))
                  .group_by("layer", "expert", "expert_b").agg(pl.len()))
            rows = q.collect(engine="streaming").height
        else:
            rows = analyze(con, kind, Scope(run)).table.num_rows
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    import duckdb

    settings = dict(chrono.connect(root).execute(
        "SELECT name, value FROM duckdb_settings() WHERE name IN ('threads', 'memory_limit')").fetchall())
    print(json.dumps({"rows_out": rows, "seconds": times, "cpu_seconds": cpu, "duckdb": duckdb.__version__,
                      "duckdb_settings": settings,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def planner(repeats: int = 5) -> list[dict]:
    from chrono.analysis.placement import gpu_loads, plan, trivial

    rng = np.random.default_rng(0)
    w = rng.lognormal(0, 1, size=(61, 256)) * 1000
    arms = [("hierarchical", dict(replicas=64, groups=8, nodes=8)),
            ("global", dict(replicas=64, groups=1, nodes=1))]
    out = {}
    for _ in range(repeats):  # interleaved: every arm once per round
        for name, kw in arms:
            for refine in (False, True):
                t0 = time.perf_counter()
                p = plan(w, 64, method="eplb", refine=refine, **kw)
                dt = time.perf_counter() - t0
                r = out.setdefault((name, refine), {"arm": name, "refine": refine, "seconds": [], **kw})
                r["seconds"].append(dt)
                a = gpu_loads(w, p.phy2log, 64)
                b = gpu_loads(w, trivial(61, 256, 256 + kw["replicas"]), 64)
                r["mean_max_over_mean_before"] = float((b.max(1) / b.mean(1)).mean())
                r["mean_max_over_mean_after"] = float((a.max(1) / a.mean(1)).mean())
    for r in out.values():
        r["best_s"] = min(r["seconds"])
        print(f"planner 61x256 on 64 GPUs  {r['arm']:<12} refine={r['refine']!s:<5} best {r['best_s']:.3f}s  "
              f"max/mean {r['mean_max_over_mean_before']:.3f} -> {r['mean_max_over_mean_after']:.4f}")
    return list(out.values())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--data-dir", default="/tmp/chrono-analysis-bench")
    ap.add_argument("--quick", action="store_true", help="1M rows, no result file")
    ap.add_argument("--child", nargs=3, metavar=("KIND", "ROOT", "RUN"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    import os

    from benchmarks._common import write_result

    rows = 1_000_000 if args.quick else args.rows
    root = Path(args.data_dir) / f"rows{rows}"
    generate(root, rows)
    results = []
    jobs = [(k, "bench") for k in KINDS] + [("loads", "bench-routing"), ("drift", "bench-routing"),
                                            ("polars-coactivation", "bench")]
    for kind, run in jobs:
        load = os.getloadavg()[0]
        proc = subprocess.run([sys.executable, __file__, "--child", kind, str(root), run],
                              capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-3000:])
            raise SystemExit(1)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r.update(kind=kind, run=run, best_s=min(r["seconds"]), cold_s=r["seconds"][0],
                 best_cpu_s=min(r["cpu_seconds"]), load_before=load, load_after=os.getloadavg()[0])
        results.append(r)
        print(f"{kind:<20} {run:<14} cold {r['cold_s']:6.3f}s  warm {r['best_s']:6.3f}s  "
              f"cpu {r['best_cpu_s']:6.3f}s  peak RSS {r['peak_rss_mib']:6.0f} MiB  (load {load:.2f})")
    plans = planner()
    if not args.quick:
        print("wrote", write_result("analysis", {"rows": rows, "analyses": results, "planner": plans}))


if __name__ == "__main__":
    main()
