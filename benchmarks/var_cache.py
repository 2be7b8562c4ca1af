"""VAR's batch LRU cache: the stack-distance count as a Python chunk loop vs vectorised.

``BatchContextCache.access`` decides, for every access whose previous access of the same key
lies more than ``cache_size`` accesses back, whether fewer than ``cache_size`` distinct keys
were touched in between (``prefix_count_leq``). Arms, interleaved in one process on the key
streams the ``var`` workload's default VAR really produces (16 validation batches × 2 layers):

- ``loop``: the earlier algorithm's shape: a Python loop over chunks of 256 accesses, each a
  ``[256, m]`` mask (reimplemented here as a drop-in for ``prefix_count_leq``);
- ``vectorised``: the current code (one dense mask up to ``DENSE_LIMIT`` pairs, tree beyond);
- ``tree``: the merge-sort tree forced for every call (``DENSE_LIMIT = 0``);
- ``vectorised_aa``: the current code again (A/A control).

    nice -n 10 python benchmarks/var_cache.py [--rounds 5]

Writes ``benchmarks/results/var_cache.json``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import reference_models.var.cache as var_mod  # noqa: E402  (the cached tier: patched per arm)
from reference_models.var.var import VARConfig  # noqa: E402
from benchmarks._common import uptime, write_result  # noqa: E402

SETTINGS = ((4, 1000), (4, 16000), (3, 4000), (1, 250))       # (context, cache size)
CURRENT = var_mod.prefix_count_leq


def loop_prefix_count_leq(values, ends, bounds, dense_limit=None):
    """The chunk loop: 256 queries at a time, a ``[256, m]`` mask each."""
    out = torch.zeros(ends.numel(), dtype=torch.long)
    j = torch.arange(values.numel())
    for lo in range(0, ends.numel(), 256):
        e, b = ends[lo:lo + 256], bounds[lo:lo + 256]
        out[lo:lo + 256] = ((j[None, :] <= e[:, None]) & (values[None, :] <= b[:, None])).sum(1)
    return out


ARMS = {"loop": (loop_prefix_count_leq, var_mod.DENSE_LIMIT), "vectorised": (CURRENT, var_mod.DENSE_LIMIT),
        "tree": (CURRENT, 0), "vectorised_aa": (CURRENT, var_mod.DENSE_LIMIT)}


def streams(stats, val, context: int, cache_size: int, n_batches: int = 16):
    """Per (batch, layer): the context keys of the tokens that miss the fast path."""
    cfg = VARConfig(context=context, cache_size=cache_size)
    elig = stats.eligible(cfg)
    out = []
    for b in range(n_batches):
        idx = val.batch(b)[:, :-1]
        for layer in range(elig.shape[0]):
            slow = (~elig[layer][idx.reshape(-1)]).nonzero(as_tuple=True)[0]
            out.append(var_mod.context_keys(layer, idx, elig.shape[1], elig.shape[0], context)[slow])
    return out


def run_arm(arm: str, keys, cache_size: int) -> tuple[float, int]:
    fn, limit = ARMS[arm]
    var_mod.prefix_count_leq, var_mod.DENSE_LIMIT = fn, limit
    try:
        cache = var_mod.BatchContextCache(60.0, cache_size, clock=lambda: 0.0)
        learned = lambda pos: (torch.zeros(len(pos), dtype=torch.long), torch.zeros(len(pos)))  # noqa: E731
        t0 = time.perf_counter()
        hits = sum(int(cache.access(k, learned)[2].sum()) for k in keys)
        return time.perf_counter() - t0, hits
    finally:
        var_mod.prefix_count_leq, var_mod.DENSE_LIMIT = CURRENT, ARMS["vectorised"][1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from benchmarks.var_sweep import load_model

    p = load_model(600, 0, progress=True)
    before = uptime()
    rows = []
    for context, size in SETTINGS:
        keys = streams(p["stats"], p["val"], context, size)
        times = {a: [] for a in ARMS}
        hits = {}
        for r in range(-1, args.rounds):                        # round -1: warm-up
            order = list(ARMS)[r % len(ARMS):] + list(ARMS)[:r % len(ARMS)]
            for arm in order:
                t, h = run_arm(arm, keys, size)
                hits[arm] = h
                if r >= 0:
                    times[arm].append(t)
        if len(set(hits.values())) != 1:
            raise AssertionError(f"arms disagree on cache hits: {hits}")
        med = {a: statistics.median(v) for a, v in times.items()}
        rows.append({"context": context, "cache_size": size, "hits": hits["vectorised"], "median_s": med,
                     "seconds": times, "vectorised_over_loop": med["vectorised"] / med["loop"],
                     "tree_over_loop": med["tree"] / med["loop"], "aa": med["vectorised_aa"] / med["vectorised"]})
        print(f"context {context} cache {size:>6}: loop {med['loop']:.3f} s, vectorised {med['vectorised']:.3f} s "
              f"(x{rows[-1]['vectorised_over_loop']:.2f}), tree {med['tree']:.3f} s (x{rows[-1]['tree_over_loop']:.2f}), "
              f"A/A {rows[-1]['aa']:.2f}", flush=True)
    after = uptime()
    path = write_result("var_cache", {"uptime_before": before, "uptime_after": after, "rows": rows,
                                      "config": {"rounds": args.rounds, "threads": torch.get_num_threads(),
                                                 "settings": SETTINGS}})
    print(f"load: {before} -> {after}\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
