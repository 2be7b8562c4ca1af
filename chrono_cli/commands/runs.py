"""The commands over the store itself: ``runs``, ``show``, ``query``, ``snapshot``, ``alerts``, ``compact``.

They only read the store (``snapshot`` and ``compact`` also rewrite derived
tables and parts through ``chrono.store``); none imports torch.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from chrono_cli.common import (UserError, invocation, plural, print_table, refuse_inside_store,
                               require_store)


def _root(args) -> Path:
    """The store root of a command that reads an existing store (UserError if it is missing)."""
    return require_store(args.root)


def _json_value(v):
    """JSON for values DuckDB returns beyond the JSON types (HUGEINT sums arrive as Decimal)."""
    from decimal import Decimal

    if isinstance(v, Decimal):
        return int(v) if v == v.to_integral_value() else float(v)
    return str(v)


def _csv_ready(table):
    """``table`` with list / struct / map / union / interval columns (which pyarrow's CSV writer
    cannot write) as strings holding the JSON ``--format json`` writes for them."""
    import pyarrow as pa

    for i, f in enumerate(table.schema):
        if pa.types.is_nested(f.type) or pa.types.is_interval(f.type):
            cells = [None if v is None else json.dumps(v, default=_json_value)
                     for v in table.column(i).to_pylist()]
            table = table.set_column(i, f.name, pa.array(cells, pa.string()))
    return table


def _check_rows(con, run: str, tables) -> None:
    """Stop (exit 2, one line naming run, table, step, layer) at rows the write API would refuse."""
    from chrono.rules import check_run

    check_run(con, run, tables)


def _connect(args, tables=None):
    import warnings

    import chrono

    with warnings.catch_warnings():   # a mistyped root: `chrono runs` says it as a note
        warnings.simplefilter("ignore", UserWarning)
        return chrono.connect(_root(args), tables=tables)


# ------------------------------------------------------------------ commands
def cmd_runs(args) -> int:
    from chrono.health import OK, run_health
    from chrono.queries import RUNS_TABLE_SQL, RUNS_TABLE_VIEWS

    con = _connect(args, RUNS_TABLE_VIEWS)   # only what the table reads: no pyarrow, no numpy
    rel = con.execute(RUNS_TABLE_SQL)   # plain rows, not Arrow: pyarrow from Python objects imports pandas
    cols = [d[0] for d in rel.description]
    rows = rel.fetchall()
    health = run_health(con)
    labels = [health[r[0]].label() if r[0] in health else OK for r in rows]
    print_table((cols[:1] + ["health"] + cols[1:], [r[:1] + (h,) + r[1:] for r, h in zip(rows, labels)]))
    if not rows:
        from chrono.store import store_note

        note = store_note(_root(args))
        if note is not None:
            print(f"chrono: note: {note}", file=sys.stderr)
    return 0


def _when(ts) -> str:
    from datetime import datetime, timezone

    try:
        return datetime.fromtimestamp(float(ts), timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (TypeError, ValueError, OverflowError, OSError):
        return "unknown"


def _model_line(model: dict) -> str:
    if not model:
        return "no model description"
    per_layer = model.get("experts_per_layer") or {}
    experts = sorted({int(v) for v in per_layer.values()}) if isinstance(per_layer, dict) else []
    layers = model.get("layers")
    parts = [str(model.get("name") or "unnamed model")]
    if layers is not None:
        n_exp = ("/".join(map(str, experts)) if len(experts) <= 3 else f"{experts[0]}-{experts[-1]}") \
            if experts else "?"
        parts.append(f"{plural(len(layers), 'layer')} x {n_exp} experts")
    if model.get("top_k") is not None:
        parts.append(f"top-{model['top_k']}")
    if model.get("adapter"):
        parts.append(f"adapter {model['adapter']}")
    return ", ".join(parts)


def _governed_line(con, run: str, path, n_decisions: int) -> str:
    """'governed ACTUATORS, POLICY; N decisions, the latest (step S): A of L layers acting ...'."""
    from chrono.controller import read_config

    try:
        cfg = read_config(path) or {}
    except ValueError:
        cfg = {}   # unreadable: `chrono replay` says so
    policy = (f"setpoint policy (Neff target {cfg.get('neff_target')}·n)" if cfg.get("mode") == "setpoint"
              else "faithful policy")
    ((actuators, step, acting, layers),) = con.execute(
        "WITH d AS (SELECT * FROM decisions WHERE run_id = ?), last AS (SELECT * FROM d WHERE step = "
        "(SELECT max(step) FROM d)) SELECT (SELECT string_agg(DISTINCT actuator, ', ' ORDER BY actuator) "
        "FROM d), (SELECT max(step) FROM d), count(*) FILTER (WHERE NOT abstain), count(*) FROM last",
        [run]).fetchall()
    return (f"governed {actuators}, {policy}; {plural(n_decisions, 'decision')}, the latest (step {step}): "
            f"{acting} of {plural(layers, 'layer')} acting ('chrono replay {run}' re-derives them)")


def cmd_show(args) -> int:
    from chrono.health import Health, run_health
    from chrono.queries import LATEST_SNAPSHOTS_SQL
    from chrono.schema import TABLES
    from chrono.store import read_manifest, require_run

    path = require_run(_root(args), args.run)
    con = _connect(args)
    manifest = read_manifest(path) or {}
    counts = {}
    for t in TABLES:
        ((n,),) = con.execute(f"SELECT count(*) FROM {t} WHERE run_id = ?", [args.run]).fetchall()
        counts[t] = int(n)
    health = run_health(con, args.run).get(args.run, Health())   # no active alert: OK
    if args.json:
        print(json.dumps({"run_id": args.run, "path": str(path), "manifest": manifest, "rows": counts,
                          "health": {"status": health.status, "worst_layer": health.worst_layer,
                                     "active": [list(a) for a in health.active]}},
                         indent=2, default=str))
        return 0
    steps = con.execute("SELECT count(DISTINCT step), min(step), max(step) FROM routing WHERE run_id = ?",
                        [args.run]).fetchall()[0]
    print(f"run      {args.run}")
    print(f"path     {path}")
    print(f"created  {_when(manifest.get('created_at'))}, updated {_when(manifest.get('updated_at'))}")
    print(f"model    {_model_line(manifest.get('model') or {})}")
    host = manifest.get("host")
    print(f"world    {plural(int(manifest.get('world_size') or 1), 'rank')}" + (f" on {host}" if host else ""))
    config = manifest.get("config") or {}
    if config:
        shown = ", ".join(f"{k}={v}" for k, v in list(config.items())[:6])
        more = f" (+{len(config) - 6} more: --json)" if len(config) > 6 else ""
        print(f"config   {shown}{more}")
    if steps[0]:
        print(f"steps    {plural(int(steps[0]), 'step')} recorded, {steps[1]:,} to {steps[2]:,}")
    print("rows     " + ", ".join(f"{t} {n:,}" for t, n in counts.items() if n) if any(counts.values())
          else "rows     none yet")
    print(f"health   {health.label() if health.active else 'OK (no active alert)'}")
    if counts.get("decisions"):
        print(_governed_line(con, args.run, path, counts["decisions"]))
    latest = con.sql(
        "SELECT layer, step, token_count, round(neff, 3) AS neff, n_experts, "
        "round(top2_share, 3) AS top2_share, dead, nearly_dead "
        f"FROM ({LATEST_SNAPSHOTS_SQL}) ORDER BY layer",
        params={"run": args.run, "windows": 1}).to_arrow_table()
    if latest.num_rows:
        print("\nlatest snapshot (layer -1: all layers):")
        print_table(latest)
    else:
        print(f"\nno snapshots yet: run '{invocation()} --root {args.root} snapshot {args.run} --every K'")
    print(f"\nfull manifest: '{invocation()} --root {args.root} show {args.run} --json'")
    _check_rows(con, args.run, TABLES)   # after the overview: it is still worth seeing
    return 0


def cmd_query(args) -> int:
    from chrono.reader import run_readonly_sql

    fmt = args.format
    if args.max_rows < 1:
        raise UserError("--max-rows must be >= 1")
    con = _connect(args)
    to_screen = fmt == "table" and not args.output
    # on screen only max_rows are shown: fetch one more (to say that more exist) instead of
    # materialising a huge result such as SELECT * FROM range(1e10)
    result = run_readonly_sql(con, args.sql, limit=args.max_rows + 1 if to_screen else None)
    if fmt == "parquet" and not args.output:
        raise UserError("--format parquet needs --output FILE")
    if args.output:
        out_path = Path(args.output)
        if not out_path.parent.exists():
            raise UserError(f"output directory {out_path.parent} does not exist")
        refuse_inside_store(out_path, _root(args), "--output")
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        out = Path(args.output)
        tmp = out.with_name(f".{out.name}.chrono-tmp")   # a failed write leaves a file there intact
        try:
            pq.write_table(result, tmp)
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid) as e:   # interval, union columns
            tmp.unlink(missing_ok=True)
            raise UserError(f"cannot write this result as Parquet ({e}); cast that column, "
                            f"e.g. to VARCHAR, or use --format json") from None
        tmp.replace(out)
        print(f"wrote {result.num_rows} rows to {args.output}", file=sys.stderr)
        return 0
    if fmt == "table":
        if args.output:
            with open(args.output, "w") as f:
                print_table(result, f)
        else:
            print_table(result.slice(0, args.max_rows))
            if result.num_rows > args.max_rows:
                print(f"... more rows not shown (--max-rows {args.max_rows}; "
                      f"use --format csv/json/parquet --output F for all)")
        return 0
    if fmt == "csv":
        import pyarrow.csv as pcsv

        sink = args.output or sys.stdout.buffer
        pcsv.write_csv(_csv_ready(result), sink)
        return 0
    # json: one object per line
    lines = "".join(json.dumps(r, default=_json_value) + "\n" for r in result.to_pylist())
    if args.output:
        Path(args.output).write_text(lines)
    else:
        sys.stdout.write(lines)
    return 0


def cmd_snapshot(args) -> int:
    import chrono
    from chrono.snapshots import alerts_for, build_snapshots
    from chrono.store import require_run

    require_run(_root(args), args.run)
    if args.every < 1:
        raise UserError("--every must be >= 1")
    from chrono.rules import first_invalid, invalid_sql

    con = _connect(args)
    keep = "true"
    bad = first_invalid(con, "routing", args.run)
    if bad is not None and not args.skip_invalid:
        raise UserError(f"{bad}; rerun with --skip-invalid to leave them out")
    if bad is not None:
        keep = f"NOT ({invalid_sql('routing')})"
        print(f"chrono: warning: skipping {bad.count} invalid routing rows; first: step {bad.step}, "
              f"layer {bad.layer}: {bad.problem}", file=sys.stderr)
    routing = con.sql(
        "SELECT step, layer, expert, sum(tokens) AS tokens, sum(dropped) AS dropped FROM routing "
        f"WHERE run_id = ? AND {keep} GROUP BY ALL", params=[args.run]).to_arrow_table()
    if routing.num_rows == 0:
        raise UserError(f"run {args.run!r} has no routing rows yet")
    snaps = build_snapshots(args.run, routing, args.every)
    alerts = alerts_for(snaps)
    with chrono.open_run(_root(args), args.run) as w:
        w.replace_table("snapshots", snaps)
        w.replace_table("alerts", alerts)
    windows = len(set(snaps.column("step").to_pylist()))
    raised = sum(1 for t in alerts.column("transition").to_pylist() if t == "raised")
    print(f"{args.run}: {plural(windows, 'snapshot')} (every {plural(args.every, 'step')}), "
          f"{plural(snaps.num_rows, 'row')}, {plural(raised, 'alert')} raised")
    return 0


def cmd_alerts(args) -> int:
    from chrono.store import require_run

    require_run(_root(args), args.run)
    con = _connect(args)
    _check_rows(con, args.run, ("snapshots", "alerts"))
    t = con.sql(
        "SELECT step, layer, alert, transition, consecutive, round(neff, 3) AS neff, n_experts, "
        "round(top2_share, 3) AS top2_share, dead FROM alerts WHERE run_id = ? "
        "ORDER BY step, layer, alert", params=[args.run]).to_arrow_table()
    if t.num_rows == 0:
        ((snaps,),) = con.execute("SELECT count(*) FROM snapshots WHERE run_id = ?", [args.run]).fetchall()
        hint = "" if snaps else (f" (no snapshots yet: run "
                                 f"'{invocation()} --root {args.root} snapshot {args.run} --every K')")
        print(f"no alerts for run {args.run}{hint}")
        return 0
    print_table(t)
    return 0


def cmd_compact(args) -> int:
    from chrono.store import compact

    merged = compact(_root(args), args.run)
    if not merged:
        print(f"{args.run}: nothing to compact")
    for table, n in merged.items():
        print(f"{args.run}: {table}: merged {n} parts")
    return 0




def register(sub) -> None:
    s = sub.add_parser("runs", help="list runs with layers, experts, steps and alerts",
                       description="Every run in the store, newest update first: health (OK / PRE_COLLAPSE / "
                                   "COLLAPSE_CONFIRMED and the worst layer), layers, experts, top-k, "
                                   "adapter, steps, last step, alerts raised, last update.")
    s.set_defaults(func=cmd_runs)

    s = sub.add_parser("show", help="summary of one run: model, rows, health, latest snapshot",
                       description="A compact summary of one run; --json prints the raw manifest and "
                                   "row counts as JSON instead.")
    s.add_argument("run")
    s.add_argument("--json", action="store_true", help="raw manifest, row counts and health as JSON")
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("query", help="run read-only SQL over the store (DuckDB)",
                       description="Views: runs routing tokens snapshots alerts decisions signals "
                                   "lifecycle. Example: chrono query \"SELECT layer, expert, "
                                   "sum(tokens) FROM routing GROUP BY ALL ORDER BY ALL\"")
    s.add_argument("sql")
    s.add_argument("--format", choices=["table", "csv", "json", "parquet"], default="table")
    s.add_argument("--output", "-o", help="write to this file instead of stdout")
    s.add_argument("--max-rows", type=int, default=100, help="rows shown in table format (default 100)")
    s.set_defaults(func=cmd_query)

    s = sub.add_parser("snapshot", help="(re)compute snapshots and alerts of a run from its routing rows",
                       description="Replace RUN's snapshots and alerts by ones computed from its routing "
                                   "rows, windows of --every steps (steps kK .. kK+K-1; the last window "
                                   "ends at the run's last step). Refuses a run being written.")
    s.add_argument("run")
    s.add_argument("--every", type=int, default=10, help="window size in steps (default 10)")
    s.add_argument("--skip-invalid", action="store_true",
                   help="leave out routing rows the write API would refuse (negative counts, bad modes...) "
                        "instead of stopping at the first one")
    s.set_defaults(func=cmd_snapshot)

    s = sub.add_parser("alerts", help="alert transitions (raised / cleared) of a run",
                       description="RUN's PRE_COLLAPSE / COLLAPSE_CONFIRMED transitions, raised and "
                                   "cleared, with the Neff, Top2 and dead experts that triggered them.")
    s.add_argument("run")
    s.set_defaults(func=cmd_alerts)

    s = sub.add_parser("compact", help="merge a run's small part files into one per table and rank",
                       description="Merge RUN's part files into one per table and rank; readers never "
                                   "see duplicates, even if compaction is killed midway.")
    s.add_argument("run")
    s.set_defaults(func=cmd_compact)
