"""``chrono replay RUN``: re-run the controller policy over a run's stored snapshots.

The controller is a pure function of the snapshot sequence and its config
(``control_config.json`` in the run directory), so replaying must reproduce the
stored ``decisions`` exactly, float for float, and, where the run has a
``control_decisions.jsonl`` mirror, its extra fields too (mode, set point, PI error,
integral, effort, informational signals). Exit code 0 when every decision
matches, 1 when any differs (the differences are printed). Imports no torch.
"""
from __future__ import annotations

import json
import math

DECISION_FIELDS = ("step", "layer", "actuator", "debt", "pressure", "heat", "forgetting",
                   "lens_scale", "backoff", "abstain", "reason", "neff", "top2_share")
RECORD_FIELDS = ("mode", "target", "error", "integral", "effort", "informational")  # JSONL only


def replay_decisions(snapshot_rows: list[dict], config, first_step: int | None = None) -> list[dict]:
    """Decisions (JSONL records without run_id: table columns + RECORD_FIELDS) the policy
    takes over these snapshot rows, from the window at ``first_step`` on (the run's first
    stored decision: the controller starts there, see ``chrono.control_history``; None: all)."""
    from chrono.control_history import governed_windows
    from chrono.controller import Controller

    layers = sorted({int(r["layer"]) for r in snapshot_rows if int(r["layer"]) >= 0})
    ctl = Controller(len(layers), {l: 0 for l in layers}, config)
    first = min((int(r["step"]) for r in snapshot_rows), default=0) if first_step is None else first_step
    return [d.as_record() for window in governed_windows(snapshot_rows, first) for d in ctl.update(window)]


def ungoverned(stored: list[dict], replayed: list[dict]) -> tuple[list[dict], int]:
    """Split off the replayed decisions of windows without any stored decision (no governor was
    attached then: after ``gov.remove()``, between sessions): ``(the rest, number of such windows)``."""
    steps = {int(r["step"]) for r in stored}
    rest = [r for r in replayed if int(r["step"]) in steps]
    return rest, len({int(r["step"]) for r in replayed} - steps)


def unwritten_tail(stored: list[dict], records: list[dict]) -> tuple[list[dict], int]:
    """Split off the JSONL mirror's records after the last stored decision's step: a process
    killed while their window was written (the mirror is written first, see
    ``chrono.control_history``). ``(the rest, number split off)``; lines without a step stay."""
    last = max(int(r["step"]) for r in stored)

    def after(r):
        try:
            return int(r["step"]) > last
        except (KeyError, TypeError, ValueError):
            return False
    rest = [r for r in records if not after(r)]
    return rest, len(records) - len(rest)


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


def compare(stored: list[dict], replayed: list[dict], fields=DECISION_FIELDS) -> list[str]:
    """Human-readable differences between stored and replayed decisions (empty = identical)."""
    key = lambda r: (int(r["step"]), int(r["layer"]))  # noqa: E731
    s = {key(r): r for r in stored}
    p = {key(r): r for r in replayed}
    diffs = []
    for k in sorted(set(s) | set(p)):
        if k not in s:
            diffs.append(f"step {k[0]} layer {k[1]}: replay decided, nothing stored")
        elif k not in p:
            diffs.append(f"step {k[0]} layer {k[1]}: stored decision, no snapshot to replay it")
        else:
            for f in fields:
                if not _same(s[k].get(f), p[k].get(f)):
                    diffs.append(f"step {k[0]} layer {k[1]}: {f} stored {s[k].get(f)!r} "
                                 f"replayed {p[k].get(f)!r}")
    if len(stored) != len(s):
        diffs.append(f"{len(stored) - len(s)} duplicate stored decisions")
    return diffs


def cmd_replay(args) -> int:
    import chrono
    from pathlib import Path

    from chrono_cli.common import UserError, print_table, require_store
    from chrono.controller import CONFIG_NAME, JSONL_NAME, ControlConfig, read_config
    from chrono.store import require_run
    from chrono.rules import check_run

    for name in ("show", "max_diffs"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0")
    path = require_run(require_store(Path(args.root)), args.run)
    try:
        stored_config = read_config(path)   # (its errors name the file)
    except ValueError as e:
        raise UserError(str(e)) from None
    try:
        config = ControlConfig.from_dict(stored_config)
    except (ValueError, TypeError) as e:
        raise UserError(f"{path / CONFIG_NAME}: {e}") from None
    con = chrono.connect(args.root)
    check_run(con, args.run, ("snapshots", "decisions"))   # invalid rows: one line, exit 2
    snaps = con.sql("SELECT * FROM snapshots WHERE run_id = ? ORDER BY step, layer",
                    params=[args.run]).to_arrow_table().to_pylist()
    stored = con.sql("SELECT * FROM decisions WHERE run_id = ? ORDER BY step, layer",
                     params=[args.run]).to_arrow_table().to_pylist()
    if not snaps:
        raise UserError(f"run {args.run!r} has no snapshots to replay")
    if not stored:
        raise UserError(f"run {args.run!r} has no stored decisions to compare with")
    replayed, gaps = ungoverned(stored, replay_decisions(snaps, config, min(int(r["step"]) for r in stored)))
    diffs = compare(stored, replayed)
    jsonl, unwritten = path / JSONL_NAME, 0
    if jsonl.exists():
        try:
            records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
        except ValueError as e:
            raise UserError(f"{jsonl}: not JSON lines ({e})") from None
        records, unwritten = unwritten_tail(stored, records)
        if records and "mode" in records[0]:   # mirrors written before the setpoint mode lack these
            diffs += [f"{JSONL_NAME}: {d}" for d in compare(records, replayed, RECORD_FIELDS)]
    if diffs:
        for line in diffs[: args.max_diffs]:
            print(line)
        if len(diffs) > args.max_diffs:
            print(f"... {len(diffs) - args.max_diffs} more differences")
        print(f"{args.run}: replay DIFFERS: {len(diffs)} differences over {len(stored)} stored decisions")
        return 1
    acted = sum(1 for r in replayed if not r["abstain"])
    print(f"{args.run}: replay reproduces all {len(stored)} decisions exactly "
          f"({acted} acted, {len(replayed) - acted} abstained)")
    if gaps:
        print(f"{gaps} windows without stored decisions after the first one (no governor attached "
              f"then, e.g. after gov.remove() or between sessions; or their decisions were lost); "
              f"the controller's state followed them")
    if unwritten:
        print(f"{unwritten} lines of {JSONL_NAME} after the last stored decision have no stored "
              f"decision (the process ended before their window was written); not compared, a "
              f"later govern on the run removes them")
    if args.show:
        import pyarrow as pa

        print_table(pa.Table.from_pylist([{k: r[k] for k in ("step", "layer", "debt", "pressure",
                                                                "lens_scale", "backoff", "abstain")}
                                          for r in replayed]), max_rows=args.show,
                    more=f"--show {len(replayed)} shows all")
    return 0


def register(sub) -> None:
    s = sub.add_parser("replay", help="re-run the governance policy over stored snapshots and "
                                      "check it reproduces the stored decisions",
                       description="Re-derives every controller decision of RUN from its snapshots "
                                   "(from the window of the first stored decision on: the run's one "
                                   "controller, across re-attaches) and control_config.json; exit 0 "
                                   "if identical, 1 if not. Windows without any stored decision (no "
                                   "governor attached then) are counted, not compared.")
    s.add_argument("run")
    s.add_argument("--max-diffs", type=int, default=20, help="differences printed (default 20)")
    s.add_argument("--show", type=int, default=0, metavar="N",
                   help="also print the first N replayed decisions")
    s.set_defaults(func=cmd_replay)
