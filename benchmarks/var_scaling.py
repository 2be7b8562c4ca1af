"""VAR vs the router it skips, as the router grows: at which size does VAR's bookkeeping pay?

VAR's cost per routed batch is its bookkeeping (table lookup, context keys, LRU cache) plus
the learned router on the misses; the own router's cost is one ``[N, d] @ [d, E]`` matmul +
softmax + max over every token. The first hardly depends on d_model and the expert count E,
the second grows with d·E. This script measures both on this CPU for d_model in 64..4096 and
E in 8..256.

What stays fixed across sizes, so only the cost changes: the token streams are the real
pydoc validation batches (16 × 64 bytes, 2 MoE layers) and VAR's fast-path table and tiers
come from the real trained ``var`` workload model (its statistics, default VAR setting), so
every size sees the same tier sequence (same expensive fraction). Hidden states are random
N(0, 1) ``[1024, d]`` per batch and layer, the routers random ``Linear(d, E)`` (the real
``moe_lm.Router``; VAR's learned tier starts from its weights, as in the workload).

Timing: per size, ``--rounds`` passes; each pass runs the three arms over all batches in a
rotated order: own router (A), VAR (B), a second identical own router (A', the A/A control).
One untimed warm-up pass first. Each call is timed with ``perf_counter`` around the routing decision only. Ratios are of
per-arm medians over passes; A'/A shows what noise alone does. Load is recorded.

    nice -n 10 python benchmarks/var_scaling.py
    python benchmarks/var_scaling.py --quick

Writes ``benchmarks/results/var_scaling.json`` (results per size are cached in
``benchmarks/.cache/var_scaling/`` so a killed run resumes).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks._common import RESULTS, machine, uptime  # noqa: E402
from reference_models.var.moe_lm import Router  # noqa: E402
from reference_models.var.var import VAR, TokenStats, VARConfig  # noqa: E402

D_MODELS = (64, 256, 1024, 4096)
EXPERTS = (8, 32, 128, 256)
CACHE = Path(__file__).resolve().parent / ".cache" / "var_scaling"


class RouterOnly:
    """The routers of an MoE LM of width ``d`` with ``E`` experts (no experts: only routing is timed)."""

    def __init__(self, d: int, E: int, n_layers: int, vocab_size: int, seed: int):
        torch.manual_seed(seed)
        self.cfg = SimpleNamespace(d_model=d, n_experts=E, n_layers=n_layers, vocab_size=vocab_size)
        self._routers = [Router(d, E, layer) for layer in range(n_layers)]

    def routers(self):
        return self._routers


def widen(stats: TokenStats, E: int) -> TokenStats:
    """The same statistics over ``E >= 8`` experts (extra experts never seen): identical
    eligibility, fast experts and confidences, so the tier sequence does not change with E."""
    L, V, E0 = stats.expert_counts.shape
    out = TokenStats(L, V, E)
    out.freq = stats.freq.clone()
    out.expert_counts[:, :, :E0] = stats.expert_counts
    out.conf_sum = stats.conf_sum.clone()
    return out


def measure_size(d: int, E: int, batches, stats, rounds: int, seed: int) -> dict:
    """Per-pass routing seconds of own (A), VAR (B) and own again (A')."""
    L = stats.freq.shape[0]
    model = RouterOnly(d, E, L, stats.freq.shape[1], seed)
    twin = RouterOnly(d, E, L, stats.freq.shape[1], seed)          # A/A control: identical weights
    st = widen(stats, E)
    g = torch.Generator().manual_seed(seed)
    hs = [[torch.randn(b.numel(), d, generator=g) for _ in range(L)] for b in batches]
    arms = {"own": None, "var": None, "own_aa": None}
    times = {a: [] for a in arms}
    fractions = None
    with torch.no_grad():
        for r in range(-1, rounds):                                   # round -1: untimed warm-up
            order = list(arms)[r % 3:] + list(arms)[:r % 3]            # rotate who goes first
            for arm in order:
                var = VAR(model, st, VARConfig(mode="intended"), clock=lambda: 0.0) if arm == "var" else None
                routers = (twin if arm == "own_aa" else model).routers()
                total = 0.0
                for b, hb in zip(batches, hs):
                    for layer in range(L):
                        h = hb[layer]
                        t0 = time.perf_counter()
                        if var is None:
                            routers[layer](h)
                        else:
                            var.route(layer, h, b)
                        total += time.perf_counter() - t0
                if r >= 0:
                    times[arm].append(total)
                if var is not None:
                    fractions = var.fractions()
    med = {a: statistics.median(v) for a, v in times.items()}
    return {"d_model": d, "n_experts": E, "seconds": times, "median_s": med,
            "var_over_own": med["var"] / med["own"], "aa_ratio": med["own_aa"] / med["own"],
            "var_wins": med["var"] < min(med["own"], med["own_aa"]),
            "expensive_fraction": fractions["expensive_fraction"], "decisions_per_pass": fractions["tokens"],
            "loadavg_1m": os.getloadavg()[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two small sizes, one round, quick model")
    ap.add_argument("--rounds", type=int, help="passes per arm (default 6, quick 1)")
    ap.add_argument("--batches", type=int, help="validation batches per pass (default 16, quick 2)")
    ap.add_argument("--d-models", type=int, nargs="*", help=f"default {D_MODELS}")
    ap.add_argument("--experts", type=int, nargs="*", help=f"default {EXPERTS}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (1 if args.quick else 6)
    n_batches = args.batches or (2 if args.quick else 16)
    dims = args.d_models or ((64, 256) if args.quick else D_MODELS)
    experts = args.experts or ((8,) if args.quick else EXPERTS)
    from benchmarks.var_sweep import load_model

    p = load_model(30 if args.quick else 600, args.seed, progress=True)
    batches = [p["val"].batch(i)[:, :-1] for i in range(n_batches)]
    tag = f"{'quick' if args.quick else 'full'}_r{rounds}_b{n_batches}_t{torch.get_num_threads()}"
    cache = CACHE / tag
    cache.mkdir(parents=True, exist_ok=True)
    load_before = uptime()
    rows = []
    from tqdm import tqdm

    for d in tqdm(dims, desc="d_model"):
        for E in experts:
            f = cache / f"d{d}_e{E}.json"
            if f.exists():
                rows.append(json.loads(f.read_text()))
                continue
            r = measure_size(d, E, batches, p["stats"], rounds, args.seed)
            f.write_text(json.dumps(r))
            rows.append(r)
    payload = {"benchmark": "var_scaling", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "machine": machine(), "uptime_before": load_before, "uptime_after": uptime(),
               "config": {"rounds": rounds, "batches": n_batches, "tokens_per_batch": int(batches[0].numel()),
                          "layers": int(p["stats"].freq.shape[0]), "var": VARConfig().__dict__,
                          "threads": torch.get_num_threads(), "model_steps": 30 if args.quick else 600},
               "sizes": rows}
    path = RESULTS / ("var_scaling_quick.json" if args.quick else "var_scaling.json")
    path.write_text(json.dumps(payload, indent=2))
    print(f"{'d_model':>8}{'E':>5}{'own ms':>9}{'VAR ms':>9}{'VAR/own':>9}{'A/A':>6}  VAR wins")
    per = n_batches * payload["config"]["layers"]
    for r in rows:
        m = r["median_s"]
        print(f"{r['d_model']:>8}{r['n_experts']:>5}{1e3 * m['own'] / per:>9.3f}{1e3 * m['var'] / per:>9.3f}"
              f"{r['var_over_own']:>9.2f}{r['aa_ratio']:>6.2f}  {r['var_wins']}")
    print(f"(ms per router call of {int(batches[0].numel())} tokens)\nload: {load_before} -> "
          f"{payload['uptime_after']}\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
