"""Bio-MoE neurogenesis: does it fire, is the new expert taught, and does it then get traffic?

Runs the documented intended-mode setting ``reference_models.bio_moe.neurogenesis_config``
(staged growth stops at 3 experts; spawn when an epoch's mean normalised gate entropy exceeds
``NEUROGENESIS_ENTROPY``; the busiest expert teaches the new one) next to the default intended
setting (growth to 6, spawn trigger 0.97), per seed, each recorded in a chrono store. Reports
per run: every applied spawn (step, the trigger's entropy, teacher), the teach phase's MSE to
the teacher before / after the bootstrap, the new expert's share of routed traffic (top-2
assignments, from the ``routing`` table) in the epochs after its spawn, test accuracy, final
Neff and alerts. Test accuracy is reported, never used to choose anything.

    nice -n 10 python benchmarks/bio_neurogenesis.py [--seeds 0 1 2]

Writes ``benchmarks/results/bio_neurogenesis.json``; per-run results are cached in
``benchmarks/.cache/bio_neurogenesis/`` (a killed run resumes).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks._common import fresh_root, uptime, write_result  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache" / "bio_neurogenesis"


def run_one(setting: str, seed: int, root: Path) -> dict:
    import chrono
    from reference_models.bio_moe import BioTrainConfig, neurogenesis_config, train_bio

    run = f"bio-{setting}-s{seed}"
    root = fresh_root(root, run)
    cfg = (neurogenesis_config if setting == "neurogenesis" else BioTrainConfig)(seed=seed, run=run, root=str(root))
    t0 = time.perf_counter()
    res = train_bio(cfg)
    secs = time.perf_counter() - t0
    con = chrono.connect(root)
    spawns = []
    for step, new, teacher, n_after, reason in con.execute(
            "SELECT step, expert, source_expert, n_experts_after, reason FROM lifecycle WHERE run_id = ? "
            "AND event = 'spawn' AND applied ORDER BY step", [run]).fetchall():
        ((ent,),) = con.execute("SELECT value FROM signals WHERE run_id = ? AND name = 'bio_moe.gate_entropy' "
                                "AND step = ?", [run, step]).fetchall()
        after = con.execute("SELECT sum(tokens) FILTER (WHERE expert = ?)::BIGINT, sum(tokens)::BIGINT, "
                            "count(DISTINCT step), count(DISTINCT step) FILTER (WHERE expert = ? AND tokens > 0) "
                            "FROM routing WHERE run_id = ? AND mode = 'TRAIN' AND layer = 0 AND step > ?",
                            [new, new, run, step]).fetchone()
        spawns.append({"step": step, "new_expert": new, "teacher": teacher, "n_experts_after": n_after,
                       "trigger_gate_entropy": ent, "reason": reason,
                       "new_expert_share_after": after[0] / after[1] if after[1] else None,
                       "steps_after": after[2], "steps_new_expert_used": after[3]})
    return {"setting": setting, "seed": seed, "run": run, "train_seconds": secs,
            "accuracy": res.final["accuracy"], "n_experts": res.final["n_experts"], "neff": res.final["neff"],
            "top2": res.final["top2"], "alerts": res.final.get("alerts", {}), "spawns": spawns, "teach": res.teach,
            "gate_entropy_per_epoch": [round(e["gate_entropy"], 4) for e in res.epochs],
            "experts_per_epoch": [e["n_experts"] for e in res.epochs], "loadavg_1m": os.getloadavg()[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = CACHE / "store"
    root.mkdir(parents=True, exist_ok=True)
    load_before = uptime()
    runs = []
    for seed in args.seeds:
        for setting in ("neurogenesis", "default"):
            f = CACHE / f"{setting}_seed{seed}.json"
            r = json.loads(f.read_text()) if f.exists() else run_one(setting, seed, root)
            f.write_text(json.dumps(r))
            runs.append(r)
            sp = "; ".join(f"spawn at step {s['step']} (entropy {s['trigger_gate_entropy']:.3f}, taught by "
                           f"{s['teacher']}, then {100 * s['new_expert_share_after']:.1f} % of traffic, used in "
                           f"{s['steps_new_expert_used']}/{s['steps_after']} steps)" for s in r["spawns"]) or "no spawn"
            print(f"seed {seed} {setting:<13} accuracy {r['accuracy']:.4f}, {r['n_experts']} experts, "
                  f"Neff {r['neff']:.2f}; {sp}", flush=True)
    after = uptime()
    path = write_result("bio_neurogenesis", {"uptime_before": load_before, "uptime_after": after, "runs": runs,
                                             "config": {"seeds": args.seeds, "threads": torch.get_num_threads()}})
    print(f"load: {load_before} -> {after}\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
