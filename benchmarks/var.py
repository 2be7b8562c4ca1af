"""VAR benchmark: does tiered routing skip the router without hurting the model, and is it faster?

One process, one trained MoE LM (pydoc text), measured side by side:
- expensive fraction: share of (token, layer) decisions that needed the learned router (goal < 15 %);
- quality: validation cross-entropy routed by VAR vs by the model's own router (goal: within 5 %);
- agreement: share of decisions where VAR picked the same expert as the own router;
- control: validation loss with uniformly random experts (does routing matter for this model?);
- router time and end-to-end forward time, VAR vs own router, alternating repeats (own, VAR, own,
  VAR, ...) so machine load hits both alike; ratios are own / VAR (> 1 means VAR is faster).
Both VAR modes: faithful (per-token Python path, original's ``token_id < 10`` rule) and
intended (vectorised batch path).

    python benchmarks/var.py            # full: 600 training steps, 16 val batches, 3 repeats
    python benchmarks/var.py --quick    # a smoke run (seconds)

Writes ``benchmarks/results/var.json`` (``var_quick.json`` with --quick).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks._common import uptime  # noqa: E402

from reference_models.var.var import VAR, VARConfig  # noqa: E402
from reference_models.var.workload import _Timed, evaluate, prepare  # noqa: E402


class _Agreement:
    """Route by VAR, and count how often VAR's expert equals the own router's (untimed pass)."""

    def __init__(self, model, var):
        self.model, self.var, self.same, self.total = model, var, 0, 0

    def __call__(self, layer, h, idx):
        w, e = self.var.route(layer, h, idx)
        _, _, own = self.model.routers()[layer](h)
        self.same += int((own[:, 0] == e[:, 0]).sum())
        self.total += e.shape[0]
        return w, e


class _RandomRouting:
    """Control arm: each token goes to a uniformly random expert, weighted by that expert's own
    router probability. If this scores like the own router, routing barely matters for the model
    and the quality goal says little."""

    def __init__(self, model, seed: int = 0):
        self.model, self.g = model, torch.Generator().manual_seed(seed)

    def __call__(self, layer, h, idx):
        logits, _, _ = self.model.routers()[layer](h)
        e = torch.randint(0, logits.shape[-1], (h.shape[0], 1), generator=self.g)
        return logits.float().softmax(-1).gather(1, e).to(h.dtype), e


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--steps", type=int, help="MoE training steps (default 600, quick 30)")
    ap.add_argument("--val-batches", type=int, help="validation batches (default 16, quick 3)")
    ap.add_argument("--repeats", type=int, help="timed repeats per arm (default 3, quick 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    ap.add_argument("--out", help="JSON output path")
    args = ap.parse_args(argv)
    steps = args.steps or (30 if args.quick else 600)
    val_batches = args.val_batches or (3 if args.quick else 16)
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)

    load_before = uptime()
    t0 = time.perf_counter()
    p = prepare(steps, args.seed, progress=True)
    train_s = time.perf_counter() - t0
    model, val, stats = p["model"], p["val"], p["stats"]

    results = {"own": {"router_s": [], "forward_s": []}}
    for mode in ("faithful", "intended"):
        results[mode] = {"router_s": [], "forward_s": []}
    own_loss = None
    for r in range(repeats):
        timed = _Timed(model)
        own_loss, fwd = evaluate(model, val, val_batches, route=timed)
        results["own"]["router_s"].append(timed.seconds)
        results["own"]["forward_s"].append(fwd)
        for mode in ("faithful", "intended"):
            var = VAR(model, stats, VARConfig(mode=mode))      # fresh caches each repeat
            loss, fwd = evaluate(model, val, val_batches, route=var.route)
            fr = var.fractions()
            results[mode]["router_s"].append(fr.pop("router_seconds"))
            results[mode]["forward_s"].append(fwd)
            results[mode].update(fr, val_loss=loss)
    for mode in ("faithful", "intended"):
        agree = _Agreement(model, VAR(model, stats, VARConfig(mode=mode)))
        evaluate(model, val, val_batches, route=agree)
        res = results[mode]
        res["agreement"] = agree.same / max(agree.total, 1)
        res["fast_coverage_train"] = stats.coverage(VARConfig(mode=mode))
        res["eligible_tokens_per_layer"] = VAR(model, stats, VARConfig(mode=mode)).eligible.sum(1).tolist()
        res["val_loss_ratio"] = res["val_loss"] / own_loss
        res["router_speedup"] = min(results["own"]["router_s"]) / min(res["router_s"])
        res["end_to_end_speedup"] = min(results["own"]["forward_s"]) / min(res["forward_s"])
        res["goal_expensive_fraction_lt_0.15"] = res["expensive_fraction"] < 0.15
        res["goal_val_loss_within_5pct"] = abs(res["val_loss_ratio"] - 1) <= 0.05
    results["own"]["val_loss"] = own_loss
    rnd_loss, _ = evaluate(model, val, val_batches, route=_RandomRouting(model, args.seed))
    results["random_routing_control"] = {"val_loss": rnd_loss, "val_loss_ratio": rnd_loss / own_loss}
    out = {
        "benchmark": "var", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "uptime_before": load_before, "uptime_after": uptime(),
        "config": {"steps": steps, "val_batches": val_batches, "repeats": repeats, "seed": args.seed,
                   "preset": p["preset"], "moe": p["cfg"].to_dict(), "batch_size": p["batch_size"],
                   "stat_batches": p["stat_batches"], "var": VARConfig().__dict__, "train_seconds": train_s},
        "results": results,
    }
    path = Path(args.out) if args.out else (Path(__file__).parent / "results" /
                                           ("var_quick.json" if args.quick else "var.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"{'arm':<10}{'val_loss':>9}{'ratio':>7}{'expens.':>8}{'fast':>6}{'hit':>6}{'agree':>7}"
          f"{'router x':>9}{'e2e x':>7}")
    print(f"{'own':<10}{own_loss:>9.4f}{1:>7.3f}{1:>8.3f}{0:>6.2f}{0:>6.2f}{1:>7.3f}{1:>9.2f}{1:>7.2f}")
    for mode in ("faithful", "intended"):
        r = results[mode]
        print(f"{mode:<10}{r['val_loss']:>9.4f}{r['val_loss_ratio']:>7.3f}{r['expensive_fraction']:>8.3f}"
              f"{r['fast_fraction']:>6.2f}{r['cache_hit_rate']:>6.2f}{r['agreement']:>7.3f}"
              f"{r['router_speedup']:>9.2f}{r['end_to_end_speedup']:>7.2f}")
    print(f"{'random':<10}{rnd_loss:>9.4f}{rnd_loss / own_loss:>7.3f}   (control: uniformly random experts)")
    print(f"load: {load_before} -> {out['uptime_after']}\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
