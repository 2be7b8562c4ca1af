"""``chrono workload NAME``: train one of the instrumented reference workloads into the store."""
from __future__ import annotations

import sys

from chrono_cli.common import UserError, invocation


def cmd_workload(args) -> int:
    from chrono.store import StoreError, validate_run_id

    try:
        from reference_models import registry
    except ImportError as e:  # reference_models ships with the package
        raise UserError(f"reference workloads are not installed ({e})") from None
    if args.name not in registry.WORKLOADS:
        raise UserError(f"unknown workload {args.name!r}; workloads: {', '.join(sorted(registry.WORKLOADS))}")
    if args.steps is not None and args.steps < 1:
        raise UserError("--steps must be >= 1")
    run = args.run or args.name if args.mode == "intended" else (args.run or f"{args.name}-faithful")
    try:
        validate_run_id(run)
    except StoreError as e:
        raise UserError(str(e)) from None
    from chrono.store import delete_run, list_runs
    if run in list_runs(args.root):
        if not args.overwrite:
            raise UserError(f"run {run!r} already exists under {args.root}; a workload trains from step 0, "
                            f"so pass --overwrite to replace it (or choose another --run)")
        try:
            delete_run(args.root, run)
        except StoreError as e:
            raise UserError(str(e)) from None
        print(f"removed the stored run {run!r} (--overwrite)", file=sys.stderr)
    fn = registry.resolve(args.name)
    print(f"workload {args.name} ({args.mode}) -> run '{run}' under {args.root}", file=sys.stderr)
    # the one signature of every registry entry (see reference_models.registry); steps=None: its default
    result = fn(mode=args.mode, steps=args.steps, run=run, seed=args.seed, root=args.root,
                progress=sys.stderr.isatty())
    _print_result(result)
    exe = invocation()  # '.venv/bin/chrono' when the venv is not activated
    print(f"\nlook at it:\n  {exe} --root {args.root} show {run}\n  {exe} --root {args.root} alerts {run}\n"
          f"  {exe} --root {args.root} query \"SELECT * FROM lifecycle WHERE run_id = '{run}'\"")
    return 0


def _print_result(result) -> None:
    if hasattr(result, "summary"):
        print(result.summary())
    elif isinstance(result, dict):
        for k, v in result.items():
            print(f"{k}: {v}")
    elif result is not None:
        print(result)


def register(sub) -> None:
    try:  # the registry imports only the standard library: cheap enough for --help
        from reference_models.registry import DESCRIPTIONS
    except ImportError:
        DESCRIPTIONS = {}
    names = "; ".join(f"{k}: {v}" for k, v in sorted(DESCRIPTIONS.items()))
    s = sub.add_parser("workload", help="train an instrumented reference MoE workload into the store",
                       description=f"Train a reference workload with telemetry. Workloads: {names}. "
                                   "'intended' runs the design as its text says; 'faithful' reproduces "
                                   "the original's behaviour (often a routing collapse chrono flags).")
    s.add_argument("name", help="workload name (" + ", ".join(sorted(DESCRIPTIONS)) + ")")
    s.add_argument("--mode", choices=["intended", "faithful"], default="intended")
    s.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the workload's own)")
    s.add_argument("--run", default=None, help="run id (default: NAME, or NAME-faithful)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true",
                   help="replace the run if it exists (default: refuse; a run's steps are never written twice)")
    s.set_defaults(func=cmd_workload)
