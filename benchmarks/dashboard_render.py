"""Dashboard benchmark: first full render of Routing and Health for a run with ~20 M routing rows.

Writes a synthetic run (10 000 steps x 32 layers x 64 experts = 20.48 M routing rows, snapshots
every 10 steps, alerts) through the real writer, then renders pages with Streamlit's AppTest in
fresh child processes and reports, side by side:

* cold render: first render of the page with an empty query cache (connection and views built,
  Python imports warm: the app was opened on the Runs page first, as a user would);
* warm render: the same page again (what a live-refresh tick costs when no part changed);
* raw SQL: the page's queries run directly on a ``chrono.connect`` connection;
* peak RSS of the child process (memory bound: the data is 20 M rows, about 0.9 GB if loaded).

Usage: python benchmarks/dashboard_render.py [--quick] [--root DIR] [--steps N]
Results: benchmarks/results/dashboard.json (or dashboard_quick.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RUN = "big"
LAYERS, EXPERTS, EVERY = 32, 64, 10


def generate(root: Path, steps: int) -> dict:
    """Write the synthetic run unless a complete one is already there."""
    import chrono
    from chrono.snapshots import AlertTracker, layer_rows
    from tqdm import tqdm

    from chrono.store import delete_run, run_dir

    marker = run_dir(root, RUN) / f".bench-complete-{steps}"
    if marker.exists():
        return json.loads(marker.read_text())
    delete_run(root, RUN)
    rng = np.random.default_rng(0)
    model = {"name": "bench-moe", "layers": list(range(LAYERS)),
             "experts_per_layer": {str(l): EXPERTS for l in range(LAYERS)}, "top_k": 2}
    tracker = AlertTracker()
    chunk = EVERY * 25
    t0 = time.perf_counter()
    with chrono.open_run(root, RUN, model=model) as w:
        for start in tqdm(range(0, steps, chunk), desc="writing routing", unit="chunk"):
            n = min(chunk, steps - start)
            step = np.arange(start, start + n)
            drift = (step / steps)[:, None, None] * np.linspace(0, 6, LAYERS)[None, :, None]
            logits = np.zeros((n, LAYERS, EXPERTS)) + drift * (np.arange(EXPERTS) == 0)
            p = np.exp(logits)
            p /= p.sum(-1, keepdims=True)
            counts = rng.multinomial(1024, p)
            w.log_routing(step[:, None], np.arange(LAYERS)[None, :], counts,
                          weight_sum=counts * np.float32(0.5))
            for ws in range(0, n, EVERY):
                win = counts[ws:ws + EVERY].sum(0)
                s0 = start + ws
                rows = layer_rows(RUN, s0, s0 + EVERY - 1, {l: win[l] for l in range(LAYERS)})
                w.log_rows("snapshots", rows)
                w.log_rows("alerts", tracker.update(rows))
    info = {"steps": steps, "routing_rows": steps * LAYERS * EXPERTS, "write_s": time.perf_counter() - t0}
    marker.write_text(json.dumps(info))
    return info


def child(root: str, page: str) -> None:
    """Render one page in this fresh process and print timings as JSON."""
    os.environ["CHRONO_ROOT"] = root
    from streamlit.testing.v1 import AppTest

    import chrono
    from dashboard import data

    app = str(REPO / "dashboard" / "streamlit_app.py")
    at = AppTest.from_file(app, default_timeout=600)
    t = time.perf_counter()
    at.query_params["run"] = RUN
    at.run()
    open_s = time.perf_counter() - t
    data._cached.clear()  # the page's own queries start cold
    at.switch_page(f"views/{page}.py")
    t = time.perf_counter()
    at.run()
    cold = time.perf_counter() - t
    assert not at.exception, [e.value for e in at.exception]
    n_charts = len(at.get("vega_lite_chart"))
    t = time.perf_counter()
    at.run()
    warm = time.perf_counter() - t
    # the same queries straight on a connection, no Streamlit
    con = chrono.connect(root)
    t = time.perf_counter()
    if page == "routing":
        con.execute(data.ROUTING_TOTALS_SQL, {"run": RUN}).df()
        rng = con.execute(data.ROUTING_RANGE_SQL, {"run": RUN}).df()
        lo, hi = int(rng["lo"][0]), int(rng["hi"][0])
        con.execute(data.ROUTING_HEATMAP_SQL, {"run": RUN, "layer": 0, "lo": lo,
                                               "w": data.bin_width(lo, hi, data.STEP_BINS)}).df()
        con.execute(data.TOKEN_WEIGHTS_SQL, {"run": RUN, "layer": 0, "bins": 20}).df()
    else:
        rng = con.execute(data.SNAPSHOT_RANGE_SQL, {"run": RUN}).df()
        lo, hi = int(rng["lo"][0]), int(rng["hi"][0])
        con.execute(data.LATEST_SNAPSHOTS_SQL, {"run": RUN, "windows": 2}).df()
        con.execute(data.HEALTH_SQL, {"run": RUN, "lo": lo, "w": data.bin_width(lo, hi, data.LINE_POINTS)}).df()
        con.execute(data.ALERTS_SQL, {"run": RUN}).df()
    raw = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"page": page, "app_open_s": open_s, "cold_render_s": cold, "warm_render_s": warm,
                      "raw_sql_s": raw, "charts": n_charts, "peak_rss_mib": rss}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 000 steps (2 M rows) to check the script works")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--root", default="/tmp/chrono_dashboard_bench")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per page")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.root, args.child)
        return 0
    steps = args.steps or (1_000 if args.quick else 10_000)
    root = Path(args.root) / f"steps{steps}"
    info = generate(root, steps)
    print(f"run {RUN}: {info['routing_rows']:,} routing rows ({steps:,} steps x {LAYERS} layers x {EXPERTS} experts)")
    results = {}
    for page in ("routing", "health"):
        runs = []
        for _ in range(args.repeats):
            out = subprocess.run([sys.executable, __file__, "--root", str(root), "--child", page],
                                 capture_output=True, text=True, cwd=REPO)
            if out.returncode:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        best = {k: min(r[k] for r in runs) for k in ("cold_render_s", "warm_render_s", "raw_sql_s", "app_open_s")}
        best["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
        best["charts"] = runs[0]["charts"]
        best["all_runs"] = runs
        results[page] = best
        print(f"{page:8s} cold render {best['cold_render_s']:.2f} s | warm {best['warm_render_s']:.3f} s | "
              f"raw SQL {best['raw_sql_s']:.2f} s | render/raw {best['cold_render_s'] / best['raw_sql_s']:.2f}x | "
              f"app open (Runs page) {best['app_open_s']:.2f} s | peak RSS {best['peak_rss_mib']:.0f} MiB")
    load = os.getloadavg()
    doc = {"benchmark": "dashboard", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
           "load_avg_1_5_15": load, "store": info, "pages": results,
           "goal": "first full render of Routing and Health < 2 s at 20 M routing rows"}
    out = REPO / "benchmarks" / "results" / ("dashboard_quick.json" if args.quick else "dashboard.json")
    out.write_text(json.dumps(doc, indent=2))
    print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
