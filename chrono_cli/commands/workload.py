"""``chrono workload NAME``: train one of the instrumented reference workloads into the store."""
from __future__ import annotations

import sys


def cmd_workload(args) -> int:
    from chrono.cli import UserError
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
    result = fn(**_call_kwargs(fn, args, run))
    _print_result(result)
    from chrono.cli import invocation

    exe = invocation()  # '.venv/bin/chrono' when the venv is not activated
    print(f"\nlook at it:\n  {exe} --root {args.root} show {run}\n  {exe} --root {args.root} alerts {run}\n"
          f"  {exe} --root {args.root} query \"SELECT * FROM lifecycle WHERE run_id = '{run}'\"")
    return 0


def _call_kwargs(fn, args, run: str) -> dict:
    """Keyword arguments for a workload function: ``run`` or ``run_id`` as it names it; steps
    only when given (the workload's own default otherwise)."""
    import inspect

    params = inspect.signature(fn).parameters
    kw = {"mode": args.mode, "seed": args.seed, "root": args.root, "progress": sys.stderr.isatty()}
    kw["run_id" if "run_id" in params and "run" not in params else "run"] = run
    if args.steps is not None:
        kw["steps"] = args.steps
    return {k: v for k, v in kw.items() if k in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())}


def _print_result(result) -> None:
    if hasattr(result, "summary"):
        print(result.summary())
    elif isinstance(result, dict):
        for k, v in result.items():
            print(f"{k}: {v}")
    elif result is not None:
        print(result)


def register(sub) -> None:
    try:
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
