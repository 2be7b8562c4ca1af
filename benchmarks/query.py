"""Query speed over token-level rows: DuckDB (chrono.connect) vs Polars (chrono.read), side by side.

Two queries over synthetic per-token routing rows (4 layers x 64 experts,
top-2), at each size:

* counts:  tokens per (layer, expert)
* entropy: routing entropy per (step, layer)

Each (size, engine, query) runs in a fresh subprocess, so its peak resident
memory (ru_maxrss) is measured on its own: reading must stream, not
materialise the table. Data is generated once per size under --data-dir and
reused across runs.

    python benchmarks/query.py [--sizes 10000000 100000000] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

LAYERS, EXPERTS, TOP_K = 4, 64, 2
ROWS_PER_STEP = 8 * 256 * TOP_K * LAYERS  # batch 8 x 256 tokens, top-2, all layers

COUNTS_SQL = "SELECT layer, expert, count(*) AS n FROM tokens GROUP BY ALL"
ENTROPY_SQL = """
WITH c AS (SELECT step, layer, expert, count(*) AS n FROM tokens GROUP BY ALL),
     s AS (SELECT step, layer, n / sum(n) OVER (PARTITION BY step, layer) AS p FROM c)
SELECT step, layer, -sum(p * ln(p)) AS entropy FROM s GROUP BY ALL
"""


def generate(root: Path, rows: int, seed: int = 0) -> None:
    import chrono

    from chrono.store import run_meta_dir

    if run_meta_dir(root, "bench") is not None:
        return
    rng = np.random.default_rng(seed)
    per_layer = ROWS_PER_STEP // LAYERS
    b = np.repeat(np.arange(8, dtype=np.int32), 256 * TOP_K)
    pos = np.tile(np.repeat(np.arange(256, dtype=np.int32), TOP_K), 8)
    k = np.tile(np.arange(TOP_K, dtype=np.int16), 8 * 256)
    # skewed expert popularity so entropies differ between layers
    p = rng.dirichlet(np.ones(EXPERTS) * 0.5, size=LAYERS)
    steps = rows // ROWS_PER_STEP
    from tqdm import tqdm

    with chrono.open_run(root, "bench", auto_flush_rows=4_000_000) as w:
        for step in tqdm(range(steps), desc=f"generating {rows / 1e6:.0f}M rows", unit="step"):
            for layer in range(LAYERS):
                w.log_tokens(step=step, layer=layer, expert=rng.choice(EXPERTS, per_layer, p=p[layer]),
                             weight=rng.random(per_layer, dtype=np.float32), batch_idx=b, position=pos, k=k)


def child(engine: str, query: str, root: str) -> None:
    """Run one query once (cold) and twice more (warm); print JSON with timings and peak RSS."""
    import chrono

    times, threads = [], None
    for _ in range(3):
        t0 = time.perf_counter()
        if engine == "duckdb":
            con = chrono.connect(root)
            out = con.sql(COUNTS_SQL if query == "counts" else ENTROPY_SQL).to_arrow_table()
            n = out.num_rows
            threads = con.execute("SELECT current_setting('threads')").fetchone()[0]
        else:
            import polars as pl

            lf = chrono.read(root, "tokens")
            threads = pl.thread_pool_size()
            if query == "counts":
                q = lf.group_by("layer", "expert").agg(pl.len().alias("n"))
            else:
                c = lf.group_by("step", "layer", "expert").agg(pl.len().alias("n"))
                q = (c.with_columns((pl.col("n") / pl.col("n").sum().over("step", "layer")).alias("p"))
                      .group_by("step", "layer").agg((-(pl.col("p") * pl.col("p").log())).sum().alias("entropy")))
            n = q.collect(engine="streaming").height
        times.append(time.perf_counter() - t0)
    print(json.dumps({"rows_out": n, "seconds": times, "threads": threads,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000_000, 100_000_000])
    ap.add_argument("--data-dir", default="/tmp/chrono-query-bench")
    ap.add_argument("--quick", action="store_true", help="1M rows only, to check the script runs")
    ap.add_argument("--threads", type=int, default=None,
                    help="DuckDB worker threads (sets $CHRONO_DUCKDB_THREADS for the queries; default: "
                         "chrono.connect's default, one per core); recorded per result as 'threads'")
    ap.add_argument("--child", nargs=3, metavar=("ENGINE", "QUERY", "ROOT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    sizes = [1_000_000] if args.quick else args.sizes
    from benchmarks._common import write_result

    results = []
    for size in sizes:
        root = Path(args.data_dir) / f"rows{size}"
        generate(root, size)
        for query in ("counts", "entropy"):
            for engine in ("duckdb", "polars"):
                env = dict(os.environ)
                if args.threads is not None:
                    env["CHRONO_DUCKDB_THREADS"] = str(args.threads)
                proc = subprocess.run([sys.executable, __file__, "--child", engine, query, str(root)],
                                      capture_output=True, text=True, check=True, env=env)
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                r.update(rows=size, engine=engine, query=query, best_s=min(r["seconds"]), cold_s=r["seconds"][0])
                results.append(r)
                print(f"{size / 1e6:6.0f}M rows  {query:<8} {engine:<7} cold {r['cold_s']:7.3f}s  "
                      f"warm {r['best_s']:7.3f}s  peak RSS {r['peak_rss_mib']:7.0f} MiB  threads {r['threads']}")
        for query in ("counts", "entropy"):
            d = next(r for r in results if r["rows"] == size and r["query"] == query and r["engine"] == "duckdb")
            p = next(r for r in results if r["rows"] == size and r["query"] == query and r["engine"] == "polars")
            print(f"{size / 1e6:6.0f}M rows  {query:<8} polars/duckdb warm time ratio x{p['best_s'] / d['best_s']:.2f}")
    if not args.quick:
        from benchmarks._common import uptime
        print("wrote", write_result("query", {"results": results, "uptime": uptime()}))


if __name__ == "__main__":
    main()
