"""``chrono astarte dream|generate``: sample text from a trained Astarte checkpoint.

The checkpoint is the one ``chrono workload astarte`` saved in the run directory
(``<root>/runs/run_id=<run>/checkpoints/astarte.pt``) unless ``--checkpoint`` names another.
Dreaming starts from the model's saved registers with Gaussian noise as input;
generating continues a prompt. Neither changes the checkpoint.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _checkpoint(args) -> Path:
    from chrono_cli.common import UserError
    from chrono.store import run_dir, run_meta_dir, validate_run_id

    if args.checkpoint:
        p = Path(args.checkpoint)
    elif args.run:
        p = (run_meta_dir(args.root, validate_run_id(args.run)) or run_dir(args.root, args.run)) \
            / "checkpoints" / "astarte.pt"
    else:
        raise UserError("give --run RUN (a run recorded by 'chrono workload astarte') or --checkpoint PATH")
    if not p.is_file():
        raise UserError(f"no Astarte checkpoint at {p} (train one with 'chrono workload astarte --run RUN')")
    return p


def _check(args) -> None:
    from chrono_cli.common import UserError

    if args.length < 1 or args.length > 100_000:
        raise UserError("--length must be between 1 and 100000")
    if args.noise_std < 0:
        raise UserError("--noise-std must be >= 0")


def cmd_astarte(args) -> int:
    from chrono_cli.common import UserError

    _check(args)
    path = _checkpoint(args)
    from reference_models.astarte.model import generate, load_checkpoint

    try:
        model, _ = load_checkpoint(path)
    except Exception as e:  # a corrupt or foreign file is a user mistake, not a crash
        raise UserError(f"cannot read Astarte checkpoint {path}: {type(e).__name__}: {e}") from None
    prompt = b"" if args.action == "dream" else args.prompt.encode("utf-8")
    if args.action == "generate" and not prompt:
        raise UserError("generate needs a non-empty --prompt (use 'dream' to sample without one)")
    out = generate(model, prompt, length=args.length, temperature=args.temperature,
                   noise_std=args.noise_std, seed=args.seed)
    sys.stdout.write((prompt + out).decode("utf-8", "replace") + "\n")
    return 0


def register(sub) -> None:
    p = sub.add_parser("astarte", help="dream or generate text with a trained Astarte model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["dream", "generate"],
                   help="dream: sample from the model's state plus noise; generate: continue --prompt")
    p.add_argument("--root", default=argparse.SUPPRESS, help="store root (same as chrono --root)")
    p.add_argument("--run", help="run recorded by 'chrono workload astarte'")
    p.add_argument("--checkpoint", help="path of an Astarte checkpoint (instead of --run)")
    p.add_argument("--prompt", default="", help="text to continue (generate)")
    p.add_argument("--length", type=int, default=200, help="bytes to sample (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--noise-std", type=float, default=0.0,
                   help="std of Gaussian noise added to the ABPE input (dream default: 0 = state only)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_astarte)
