"""Semantic MoE vs a dense model of equal active parameters on pydoc_data text.

Trains both in one process on the same batches (same seed), prints val losses side by side,
the student/teacher agreement and final routing health, and writes
benchmarks/results/semantic_moe_vs_dense.json.  ``--quick`` for a smoke run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

from reference_models.corpus import byte_batches, fixed_val_batches, split_bytes, text_bytes
from reference_models.semantic_moe import TrainingConfig, train


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--n-experts", type=int, default=8)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    if a.quick:
        a.steps, a.preset, a.n_experts = 30, "quick", 4
    train_data, val_data = split_bytes(text_bytes())
    results = []
    for seed in a.seeds:
        row = {"seed": seed}
        for arm in ("moe", "dense"):
            cfg = TrainingConfig(preset=a.preset, seed=seed, dense=(arm == "dense"))
            block = cfg.model_config(256, a.n_experts).block_size
            loader = byte_batches(train_data, block, 16, seed, a.steps + cfg.calib_batches)
            val = fixed_val_batches(val_data, block, 16, n_batches=8)
            t = time.perf_counter()
            if arm == "dense":  # same batches as the MoE arm after its calibration batches
                loader = list(loader)[cfg.calib_batches:]
            m = train(loader, 256, a.n_experts, cfg, val_batches=val, steps=a.steps)
            row[arm] = {"val_loss": m.final.get("val_loss"), "active_params": m.final["active_params"],
                        "total_params": m.final["total_params"], "seconds": time.perf_counter() - t}
            if arm == "moe":
                row[arm].update(agreement=m.final.get("agreement"), neff=m.final.get("neff"),
                                n_experts=m.final.get("n_experts"), top2=m.final.get("top2"),
                                lifecycle=[r for r in m.lifecycle if r["applied"]])
            print(f"seed {seed} {arm:5s}: " + m.summary().replace("\n", "\n             "))
        row["val_loss_ratio_moe_over_dense"] = row["moe"]["val_loss"] / row["dense"]["val_loss"]
        results.append(row)
    out = {"steps": a.steps, "preset": a.preset, "n_experts": a.n_experts, "results": results,
           "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if not a.quick:
        Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
        Path("benchmarks/results/semantic_moe_vs_dense.json").write_text(json.dumps(out, indent=2, default=str))
    for r in results:
        print(f"seed {r['seed']}: val loss MoE {r['moe']['val_loss']:.4f} vs dense {r['dense']['val_loss']:.4f} "
              f"(ratio {r['val_loss_ratio_moe_over_dense']:.3f}); agreement {r['moe']['agreement']:.3f}")
    print(out["uptime"])


if __name__ == "__main__":
    main()
