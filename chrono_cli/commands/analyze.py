"""``chrono analyze RUN KIND``: routing analytics over the store (no torch).

KIND is one of coactivation, vocabulary, transitions, drift, loads (see
``chrono.analysis``). Table format prints the rows (up to --max-rows), the
summary and any notes; csv prints all rows; json prints one document with
rows, summary, notes and the table the analysis needs.
"""
from __future__ import annotations

import json
import sys

KIND_HELP = {
    "coactivation": "how often expert pairs are picked for the same token, vs independence (lift)",
    "vocabulary": "top token ids per expert, vocabulary entropy and KL to the corpus",
    "transitions": "P(top-1 expert at the next layer | top-1 expert at this layer)",
    "drift": "Jensen-Shannon divergence and top-1 changes between step ranges",
    "loads": "tokens-per-expert percentiles per layer and imbalance percentiles across layers",
}


def _options(args) -> dict:
    from chrono.analysis import parse_steps

    if args.kind == "vocabulary":
        return {"top": args.top}
    if args.kind == "drift":
        return {"against": parse_steps(args.against) if args.against else None,
                "n_windows": args.windows, "min_count": args.min_count}
    return {}


def pa_array(values):
    import pyarrow as pa

    return pa.array(values, pa.string())


def _json_default(v):
    if isinstance(v, float) and v != v:
        return None
    return str(v)


def cmd_analyze(args) -> int:
    import chrono
    from chrono.analysis import AnalysisError, Scope, analyze, parse_steps
    from chrono_cli.common import UserError, print_table
    from chrono.store import require_run

    require_run(args.root, args.run)
    if args.max_rows < 1:
        raise UserError("--max-rows must be >= 1")
    try:
        scope = Scope(args.run, parse_steps(args.steps), args.layer, args.mode)
        res = analyze(chrono.connect(args.root), args.kind, scope, **_options(args))
    except AnalysisError as e:
        raise UserError(str(e)) from None
    if args.kind == "vocabulary":
        from chrono.analysis.labels import token_labeler

        label = token_labeler(chrono.connect(args.root), args.run)
        if label is not None:  # byte-level run or a tokenizer file in the manifest
            res.table = res.table.add_column(
                4, "text", pa_array([label(t) for t in res.table.column("token_id").to_pylist()]))
    if args.format == "json":
        sys.stdout.write(json.dumps(res.to_json(), default=_json_default) + "\n")
        return 0
    if args.format == "csv":
        import pyarrow.csv as pcsv

        pcsv.write_csv(res.table, sys.stdout.buffer)
        for n in res.notes:
            print(f"note: {n}", file=sys.stderr)
        return 0
    print(f"{res.kind} of run {res.run} ({scope.describe()}; needs: {res.needs})")
    print_table(res.table.slice(0, args.max_rows))
    if res.table.num_rows > args.max_rows:
        print(f"... {res.table.num_rows - args.max_rows} more rows (--max-rows N, or --format csv/json "
              f"for all; --layer L for one layer)")
    if res.summary:
        print("\nsummary:")
        for k, v in res.summary.items():
            print(f"  {k}: {json.dumps(v, default=_json_default)}")
    for n in res.notes:
        print(f"note: {n}")
    return 0


def register(sub) -> None:
    kinds = "\n".join(f"  {k:<13} {v}" for k, v in KIND_HELP.items())
    import argparse

    s = sub.add_parser(
        "analyze", help="routing analytics: coactivation, vocabulary, transitions, drift, loads",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Analyses of a recorded run (details: docs/analysis.md).\n\n" + kinds +
                    "\n\ncoactivation, vocabulary and transitions need per-token rows: record them "
                    "with probes.attach(model, ..., tokens=RATE).")
    s.add_argument("run")
    s.add_argument("kind", choices=list(KIND_HELP), metavar="KIND", help=", ".join(KIND_HELP))
    s.add_argument("--layer", type=int, help="one layer only (default: all)")
    s.add_argument("--steps", help="step range START:STOP, stop excluded (default: all steps)")
    s.add_argument("--mode", choices=["TRAIN", "EVAL", "INFER"], help="one mode only (default: all)")
    s.add_argument("--format", choices=["table", "csv", "json"], default="table")
    s.add_argument("--max-rows", type=int, default=60, help="rows shown in table format (default 60)")
    s.add_argument("--top", type=int, default=5, help="vocabulary: token ids per expert (default 5)")
    s.add_argument("--against", help="drift: compare --steps with this range START:STOP instead of "
                                     "splitting --steps into windows")
    s.add_argument("--windows", type=int, default=10,
                   help="drift: windows compared with the last one (default 10)")
    s.add_argument("--min-count", type=int, default=5,
                   help="drift: occurrences a token id needs in both ranges (default 5)")
    s.set_defaults(func=cmd_analyze)
