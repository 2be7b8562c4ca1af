"""Scrape time of the Prometheus exporter for a 58-layer MoE (goal: < 50 ms per scrape).

58 MoE layers x 256 experts is DeepSeek-V3's routed-expert layout. Every
scenario is timed as what Prometheus sees: an HTTP GET of /metrics on the
exporter (127.0.0.1), body read to the end. Scenarios, side by side in one
process:

* live: a handle in the training process (a stand-in object with the probes
  Handle methods; its methods return prepared lists, as the real handle does).
* live + expert labels: the same with per-expert shares (58 x 256 series, cap raised).
* store, unchanged: ``chrono serve-metrics`` between two snapshot windows
  (nothing changed on disk: cached state, one stat per table directory).
* store, new window: a new window was written just before the scrape, so the
  exporter refreshes its DuckDB views and re-reads snapshots / alerts /
  decisions and the one new routing part.
* store, new window + expert labels: also reads the latest window's routing rows.

Usage: python benchmarks/prometheus_scrape.py [--quick] [--experts 256] [--reps 30]
Writes benchmarks/results/prometheus_scrape[_quick].json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import chrono  # noqa: E402
from chrono.exporters import prometheus as P  # noqa: E402
from chrono.follow import FRESH_SECONDS  # noqa: E402
from chrono.snapshots import AlertTracker, layer_rows  # noqa: E402

from _common import write_result  # noqa: E402

GOAL_MS = 50.0
N_LAYERS = 58


class StoreRun:
    """A run with N_LAYERS layers written window by window through the real writer."""

    def __init__(self, root: Path, n_experts: int, every: int, seed: int = 0):
        self.root, self.run, self.n_experts, self.every = root, "bench", n_experts, every
        self.rng = np.random.default_rng(seed)
        self.tracker = AlertTracker()
        self.window = 0
        model = {"name": "bench", "layers": list(range(N_LAYERS)),
                 "experts_per_layer": {str(l): n_experts for l in range(N_LAYERS)}, "top_k": 8}
        with chrono.open_run(root, self.run, model=model):
            pass

    def counts(self) -> np.ndarray:
        p = self.rng.dirichlet(np.full(self.n_experts, 0.3), size=N_LAYERS)
        return np.stack([self.rng.multinomial(4096 * 8, row) for row in p])  # [layers, experts]

    def add_window(self) -> None:
        with chrono.open_run(self.root, self.run) as w:
            start = self.window * self.every
            total = 0
            for step in range(start, start + self.every):
                c = self.counts()
                w.log_routing(step, np.arange(N_LAYERS), c)
                total = total + c
            rows = layer_rows(self.run, start, start + self.every - 1,
                              {l: total[l] for l in range(N_LAYERS)})
            w.log_rows("snapshots", rows)
            w.log_rows("alerts", self.tracker.update(rows))
            w.log_rows("decisions", [{"step": start + self.every - 1, "layer": l, "actuator": "lens",
                                      "debt": 0.1, "pressure": 0.1, "heat": 0.1, "forgetting": 0.03,
                                      "lens_scale": 0.02, "backoff": 1.0, "abstain": False, "reason": ""}
                                     for l in range(N_LAYERS)])
        self.window += 1

    def newest_mtime(self) -> float:
        """Newest mtime (s) of the run's manifest and table directories (hive layout)."""
        from chrono.follow import Follower

        return Follower(self.root).stamps()[self.run] / 1e9


class LiveStandIn:
    """The probes Handle methods the exporter reads, with 58 layers of prepared data."""

    def __init__(self, n_experts: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.run_id = "bench-live"
        self._counts = {l: rng.multinomial(4096 * 8 * 50, rng.dirichlet(np.full(n_experts, 0.3)))
                        for l in range(N_LAYERS)}
        self._rows = layer_rows(self.run_id, 0, 49, self._counts)
        self._decisions = [{"step": 49, "layer": l, "actuator": "lens", "debt": 0.1, "pressure": 0.1,
                            "heat": 0.1, "forgetting": 0.03, "lens_scale": 0.02, "backoff": 1.0,
                            "abstain": False, "reason": ""} for l in range(N_LAYERS)]

    def latest_snapshot(self):
        return list(self._rows)

    def active_alerts(self):
        return {l: {"PRE_COLLAPSE"} for l in range(0, N_LAYERS, 3)}

    def alert_transitions(self):
        return {(l, "PRE_COLLAPSE", "raised"): 1 for l in range(0, N_LAYERS, 3)}

    def latest_decisions(self):
        return list(self._decisions)

    def stats(self):
        return {"steps": 50, "tokens_total": {l: 4096 * 8 * 50 for l in range(N_LAYERS)},
                "hook_seconds": 1.5, "rows_written": {"routing": 10, "snapshots": 59},
                "write_errors": 0, "rows_dropped": 0, "nonfinite": 0}

    def latest_expert_counts(self):
        return self._counts


CPU_MS: list[float] = []  # process CPU time of each scrape (server thread + this client), same order


def scrape_ms(url: str) -> tuple[float, int]:
    """Wall time of one GET /metrics; its process CPU time is appended to CPU_MS.

    On this shared machine wall time mostly measures the wait for a core; the
    CPU time of the process (exporter thread + the small urllib client) is
    what a scrape costs on an idle core.
    """
    c0, t0 = time.process_time(), time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as r:
        body = r.read()
    wall = (time.perf_counter() - t0) * 1e3
    CPU_MS.append((time.process_time() - c0) * 1e3)
    return wall, len(body)


def summarise(times: list[float], cpu: list[float], nbytes: int, series: int) -> dict:
    times = sorted(times)
    p95 = times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))]
    med = statistics.median(times)
    cpu_med = statistics.median(cpu)
    return {"median_ms": round(med, 2), "p95_ms": round(p95, 2), "min_ms": round(times[0], 2),
            "cpu_median_ms": round(cpu_med, 2), "reps": len(times), "bytes": nbytes, "series": series,
            "median_vs_goal": round(med / GOAL_MS, 3), "cpu_median_vs_goal": round(cpu_med / GOAL_MS, 3)}


def count_series(url: str) -> int:
    with urllib.request.urlopen(url, timeout=30) as r:
        return sum(1 for line in r.read().decode().splitlines() if line and not line.startswith("#"))



def time_scrapes(url: str, reps: int, before_each=None) -> dict:
    """One untimed scrape (imports, connection set-up), then ``reps`` timed ones.

    ``before_each`` (untimed) runs before every timed scrape, e.g. to write a new window.
    """
    scrape_ms(url)
    series = count_series(url)
    times, nbytes = [], 0
    CPU_MS.clear()
    for _ in range(reps):
        if before_each is not None:
            before_each()
        ms, nbytes = scrape_ms(url)
        times.append(ms)
    return summarise(times, list(CPU_MS), nbytes, series)

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and windows (checks it works)")
    ap.add_argument("--experts", type=int, default=256, help="experts per layer (default 256)")
    ap.add_argument("--reps", type=int, default=None, help="scrapes per scenario (default 30, quick 5)")
    ap.add_argument("--every", type=int, default=None, help="steps per window (default 10, quick 2)")
    args = ap.parse_args()
    reps = args.reps or (5 if args.quick else 30)
    every = args.every or (2 if args.quick else 10)
    warm_windows = 3 if args.quick else 20
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None

    results: dict[str, dict] = {}
    full_cap = N_LAYERS * args.experts
    live = LiveStandIn(args.experts)
    for name, kw in [("live", {}), ("live + expert labels", {"expert_labels": True,
                                                             "max_expert_series": full_cap})]:
        with P.serve(live, port=0, **kw) as s:
            results[name] = time_scrapes(s.url, reps)

    with tempfile.TemporaryDirectory() as tmp:
        run = StoreRun(Path(tmp), args.experts, every)
        it = range(warm_windows)
        for _ in (tqdm(it, desc="writing history", unit="window") if tqdm else it):
            run.add_window()
        for name, kw in [("store, new window", {}),
                         ("store, new window + expert labels", {"expert_labels": True,
                                                                "max_expert_series": full_cap})]:
            with P.serve(str(run.root), port=0, run=run.run, **kw) as s:
                results[name] = time_scrapes(s.url, reps, before_each=run.add_window)
        with P.serve(str(run.root), port=0, run=run.run) as s:
            # the cache is trusted once the newest file is older than _FRESH_SECONDS: wait for that
            wait = run.newest_mtime() + FRESH_SECONDS + 0.05 - time.time()
            if wait > 0:
                time.sleep(wait)
            results["store, unchanged"] = time_scrapes(s.url, reps)
        history = {"windows": run.window, "routing_rows": run.window * every * N_LAYERS * args.experts}

    load = os.getloadavg()
    print(f"Prometheus scrape time, {N_LAYERS} layers x {args.experts} experts "
          f"(goal < {GOAL_MS:.0f} ms), load avg {load[0]:.1f}; store history: {history['windows']} windows, "
          f"{history['routing_rows']} routing rows")
    print(f"{'scenario':<36}{'series':>8}{'wall p50 ms':>13}{'wall p95 ms':>13}{'CPU p50 ms':>12}"
          f"{'wall/goal':>11}{'CPU/goal':>10}")
    for name, r in results.items():
        print(f"{name:<36}{r['series']:>8}{r['median_ms']:>13.2f}{r['p95_ms']:>13.2f}{r['cpu_median_ms']:>12.2f}"
              f"{r['median_vs_goal']:>11.2f}{r['cpu_median_vs_goal']:>10.2f}")
    out = write_result("prometheus_scrape" + ("_quick" if args.quick else ""), {
        "goal_ms": GOAL_MS, "layers": N_LAYERS, "experts": args.experts, "reps": reps,
        "steps_per_window": every, "store_history": history, "scenarios": results,
        "uptime_load_avg": list(load)})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
