"""Semantic MoE, faithful mode: why does routing not collapse, and when does it?

The seed's defects reproduced by ``--mode faithful``: zero centroids that are never fitted (every
teacher score ties: ``-||z - 0||^2`` is the same for all experts), a student that gets no
gradient (it stays at its random initialisation), greedy top-1 (the original crashed for
top_k < E) and an unweighted expert output. With all teacher scores tied, the teacher alone
sends every token to the same expert (the tie-break winner): total collapse. Two things in the
faithful run can break the tie: the **load penalty** (``-load_penalty * relu(E * load_ema - 1)``,
the same for every token of a step) and the **untrained student**, whose random logits enter
the hybrid as soon as alpha > 0 (alpha ramps 0 -> 1 over the first 60 % of steps).

Arms, one seed, the workload's data and length, each recorded in a chrono store:

- ``faithful``: the mode as shipped;
- ``no_load_penalty``: load_penalty 0;
- ``teacher_only``: alpha stays 0 (the student never takes over);
- ``teacher_only_no_penalty``: both: nothing breaks the tie;
- ``intended``: the design working, as a control for the alert settings below.

Per arm: the workload's own snapshots (25-step windows) and the alerts chrono raised live, plus
the same routing rows re-windowed per step (``chrono snapshot RUN --every 1`` does the same),
where a batch that all goes to one expert is visible, and the validation loss.

    nice -n 10 python benchmarks/semantic_faithful.py [--steps 400] [--seed 0]

Writes ``benchmarks/results/semantic_faithful.json``; per-arm results are cached in
``benchmarks/.cache/semantic_faithful/`` (a killed run resumes).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._common import fresh_root, uptime, write_result  # noqa: E402

ARMS = {
    "faithful": ("faithful", {}),
    "no_load_penalty": ("faithful", {"load_penalty": 0.0}),
    "teacher_only": ("faithful", {"alpha_end": 0.0}),
    "teacher_only_no_penalty": ("faithful", {"alpha_end": 0.0, "load_penalty": 0.0}),
    "intended": ("intended", {}),
}
CACHE = Path(__file__).resolve().parent / ".cache" / "semantic_faithful"


def alert_summary(alerts) -> dict:
    """{alert: {"first_step", "raised"}} from an ALERTS table / rows."""
    out: dict = {}
    for a in alerts:
        if a["transition"] != "raised":
            continue
        d = out.setdefault(a["alert"], {"first_step": a["step"], "raised": 0})
        d["raised"] += 1
        d["first_step"] = min(d["first_step"], a["step"])
    return out


def analyse(root: Path, run: str) -> dict:
    """Routing health of ``run`` at the workload's windows and per step, and the alerts of both."""
    import chrono
    from chrono.metrics import summarize
    from chrono.snapshots import alerts_for, build_snapshots

    con = chrono.connect(root)
    live = con.execute("SELECT layer, step, neff, top2_share, dead FROM snapshots WHERE run_id = ? AND layer >= 0 "
                       "ORDER BY step, layer", [run]).fetchall()
    live_alerts = [dict(zip(("alert", "step", "transition"), r)) for r in con.execute(
        "SELECT alert, step, transition FROM alerts WHERE run_id = ? ORDER BY step", [run]).fetchall()]
    routing = con.sql("SELECT step, layer, expert, sum(tokens)::BIGINT AS tokens, sum(dropped)::BIGINT AS dropped "
                      "FROM routing "
                      "WHERE run_id = ? AND mode = 'TRAIN' GROUP BY ALL", params=[run]).to_arrow_table()
    per_step = build_snapshots(run, routing, 1)
    step_alerts = alerts_for(per_step).to_pylist()
    rows = [r for r in per_step.to_pylist() if r["layer"] >= 0]
    layers = sorted({r["layer"] for r in rows})
    out = {"layers": {}}
    for layer in layers:
        mine = [r for r in rows if r["layer"] == layer]
        win = [r for r in live if r[0] == layer]
        counts = {}
        for s, l_, e, t in zip(*(routing.column(c).to_pylist() for c in ("step", "layer", "expert", "tokens"))):
            if l_ == layer:
                counts.setdefault(s, {})[e] = counts.setdefault(s, {}).get(e, 0) + t
        single = sum(1 for c in counts.values() if max(c.values()) == sum(c.values()))
        n = 1 + max(e for c in counts.values() for e in c)
        whole = np.zeros(n)
        for c in counts.values():
            for e, t in c.items():
                whole[e] += t
        m = summarize(whole)
        bins = [(0, 5), (5, 25), (25, 100), (100, 240), (240, 10 ** 9)]   # alpha ramps to 1 at 60 % of 400
        out["layers"][str(layer)] = {
            "steps": len(mine),
            "per_step_neff_by_steps": {f"{a}-{min(b, len(mine)) - 1}": float(np.mean(
                [r["neff"] for r in mine if a <= r["step"] < b])) for a, b in bins if a < len(mine)},
            "per_step_neff_mean": float(np.mean([r["neff"] for r in mine])),
            "per_step_top2_mean": float(np.mean([r["top2_share"] for r in mine])),
            "steps_all_tokens_on_one_expert": single,
            "window_neff_mean": float(np.mean([w[2] for w in win])) if win else None,
            "window_neff_min": float(np.min([w[2] for w in win])) if win else None,
            "window_top2_max": float(np.max([w[3] for w in win])) if win else None,
            "windows_with_dead": int(sum(1 for w in win if w[4] > 0)),
            "whole_run_neff": float(m.neff), "whole_run_top2": float(m.top2_share),
            "whole_run_shares": (whole / max(1.0, whole.sum())).round(4).tolist(),
        }
    out["alerts_live_25_step_windows"] = alert_summary(live_alerts)
    out["alerts_per_step_windows"] = alert_summary(step_alerts)
    out["alerts_per_step_windows_raised"] = [(a["alert"], a["layer"], a["step"]) for a in step_alerts
                                             if a["transition"] == "raised"]
    return out


def run_arm(name: str, steps: int, seed: int, root: Path) -> dict:
    from reference_models.semantic_moe.workload import run_workload

    mode, kw = ARMS[name]
    run = f"sf-{name}-s{seed}"
    root = fresh_root(root, run)
    t0 = time.perf_counter()
    metrics = run_workload(mode, steps=steps, run=run, seed=seed, root=root, **kw)
    res = {"arm": name, "mode": mode, "overrides": kw, "run": run, "steps": steps, "seed": seed,
           "train_seconds": time.perf_counter() - t0, "val_loss": metrics.final.get("val_loss"),
           "agreement": metrics.final.get("agreement"), "final_neff": metrics.final.get("neff"),
           "final_top2": metrics.final.get("top2"), "loadavg_1m": os.getloadavg()[0]}
    res.update(analyse(root, run))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reanalyse", action="store_true", help="recompute the analysis of cached arms from the store")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = CACHE / "store"
    root.mkdir(parents=True, exist_ok=True)
    load_before = uptime()
    results = {}
    for name in args.arms:
        f = CACHE / f"{name}_steps{args.steps}_seed{args.seed}.json"
        if f.exists():
            results[name] = json.loads(f.read_text())
            if args.reanalyse:
                results[name].update(analyse(root / results[name]["run"], results[name]["run"]))
                f.write_text(json.dumps(results[name]))
        else:
            results[name] = run_arm(name, args.steps, args.seed, root)
            f.write_text(json.dumps(results[name]))
        r = results[name]
        print(f"{name:<26} val {r['val_loss']:.4f}  " + "  ".join(
            f"L{l}: step Neff {d['per_step_neff_mean']:.2f}, one-expert steps {d['steps_all_tokens_on_one_expert']}"
            f"/{d['steps']}, window Neff min {d['window_neff_min']}" for l, d in r["layers"].items())
            + f"  alerts@25 {sorted(r['alerts_live_25_step_windows'])} alerts@1 {sorted(r['alerts_per_step_windows'])}",
            flush=True)
    after = uptime()
    path = write_result("semantic_faithful", {
        "uptime_before": load_before, "uptime_after": after, "arms": results,
        "config": {"steps": args.steps, "seed": args.seed, "arms": {k: ARMS[k] for k in args.arms},
                   "threads": torch.get_num_threads()}})
    print(f"load: {load_before} -> {after}\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
