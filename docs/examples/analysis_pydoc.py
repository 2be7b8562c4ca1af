"""The worked example of docs/analysis.md: a tiny Hugging Face Mixtral (byte-level, 4 MoE
layers x 8 experts, top-2) trained on Python's pydoc text with every token recorded
(``probes.attach(..., tokens=1.0)``), then every analysis and the placement planner.

    nice -n 10 python docs/examples/analysis_pydoc.py [--root DIR] [--steps 400]

Deterministic (seed 0, one CPU thread). Prints what docs/analysis.md quotes.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

RUN = "pydoc-mixtral"


def train(root: Path, steps: int, seed: int) -> None:
    import torch
    from tqdm import tqdm
    from transformers import MixtralConfig, MixtralForCausalLM

    import probes
    from chrono.store import run_meta_dir
    from reference_models.corpus import byte_batches, split_bytes, text_bytes

    if run_meta_dir(root, RUN) is not None:
        print(f"{RUN} already recorded under {root}; reusing it")
        return
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                        num_experts_per_tok=2, max_position_embeddings=128, router_aux_loss_coef=0.0)
    model = MixtralForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train_bytes, _ = split_bytes(text_bytes())
    with probes.attach(model, run=RUN, root=root, tokens=1.0, flush_every=50,
                       config={"example": "docs/analysis.md", "byte_level": True, "seed": seed}) as h:
        for step, (x, _) in enumerate(tqdm(byte_batches(train_bytes, 64, 8, seed, steps), total=steps,
                                           desc="training", unit="step")):
            out = model(input_ids=x, labels=x)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            h.writer.log_signal(step, "loss", float(out.loss.detach()))
            h.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/tmp/chrono-analysis-example")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    root = Path(args.root)
    train(root, args.steps, args.seed)
    last = f"{args.steps - args.steps // 4}:"
    commands = [
        ["analyze", RUN, "loads"],
        ["analyze", RUN, "coactivation", "--layer", "3", "--steps", last, "--max-rows", "6"],
        ["analyze", RUN, "vocabulary", "--layer", "3", "--steps", last, "--top", "3", "--max-rows", "12"],
        ["analyze", RUN, "transitions", "--layer", "2", "--steps", last, "--max-rows", "8"],
        ["analyze", RUN, "drift", "--windows", "4", "--min-count", "20"],
        ["plan-placement", RUN, "--gpus", "4", "--replicas", "4", "--steps", last],
    ]
    for c in commands:
        print(f"\n$ chrono {' '.join(c)}", flush=True)
        subprocess.run([sys.executable, "-m", "chrono_cli", "--root", str(root), *c], check=True)


if __name__ == "__main__":
    main()
