"""``chrono export tensorboard RUN --logdir DIR``: a stored run as TensorBoard event files.

For users who live in TensorBoard and never open the Streamlit dashboard.
Writes one event file under ``DIR/RUN`` (TensorBoard shows it as run ``RUN``)
with the tensorboard package's own ``EventFileWriter`` and summary protos:

==============================================  ====================================================
tag                                             from
==============================================  ====================================================
``chrono/<metric>/layer_<L>``                   snapshots: every numeric column (neff, top2_share,
``chrono/<metric>/all``                         dead, nearly_dead, entropy, token_count, cv, gini,
                                                ...) per layer; ``all`` = the global row (layer -1)
``chrono/alerts`` (text)                        alert transitions of that snapshot step, one line each
``chrono/decision/<field>/layer_<L>``           controller decisions: debt, pressure, heat,
                                                forgetting, lens_scale, backoff, abstain (0/1)
``chrono/signal/<name>[/layer_<L>][/rank_<r>]``  signals (loss, val_loss, ...); rank only when the run
                                                has several ranks
==============================================  ====================================================

The step of every point is the store's ``step`` (snapshot step = window end).
Scalars are written as float64 tensors with the scalar plugin's metadata, so
the values read back (``EventAccumulator.Tensors``) equal the store's bit for
bit; TensorBoard's Scalars dashboard plots them like any other scalar.
Imports no torch.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path


EVENT_SUFFIX = ".chrono"   # our event files end with it: --overwrite removes only those
SNAPSHOT_SKIP = ("run_id", "step", "window_start", "window_end", "layer")


class ExportError(Exception):
    """The export would clobber an earlier one (see ``--overwrite``)."""


DECISION_FIELDS = ("debt", "pressure", "heat", "forgetting", "lens_scale", "backoff", "abstain")


def register(sub) -> None:
    s = sub.add_parser("export", help="export a stored run to another tool (tensorboard)",
                       description="Export a stored run to another tool's format.")
    kinds = s.add_subparsers(dest="kind", metavar="FORMAT")
    kinds.required = True
    t = kinds.add_parser(
        "tensorboard", help="snapshots, alerts, decisions and signals as TensorBoard event files",
        description="Write RUN's snapshots (one scalar tag per metric and layer), alert transitions "
                    "(text), controller decisions and signals as a TensorBoard event file under "
                    "DIR/RUN. View with: tensorboard --logdir DIR")
    t.add_argument("run")
    t.add_argument("--logdir", required=True, metavar="DIR",
                   help="TensorBoard log directory (the run goes to DIR/RUN)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace event files a previous 'chrono export' wrote for this run")
    t.set_defaults(func=cmd_export_tensorboard)


def snapshot_tags(row: dict) -> dict[str, float]:
    """``{tag: value}`` of one snapshot row: every numeric column but the keys."""
    from chrono.integrations.health import metric_name

    return {metric_name(k, row["layer"]): float(v) for k, v in row.items()
            if k not in SNAPSHOT_SKIP and isinstance(v, (int, float)) and v is not None}


def decision_tags(row: dict, with_actuator: bool) -> dict[str, float]:
    from chrono.integrations.health import layer_tag

    base = f"chrono/decision/{row['actuator']}" if with_actuator else "chrono/decision"
    lt = layer_tag(row["layer"])
    return {f"{base}/{f}/{lt}": float(row[f]) for f in DECISION_FIELDS if row.get(f) is not None}


def signal_tag(row: dict, with_rank: bool) -> str:
    from chrono.integrations.health import layer_tag

    tag = f"chrono/signal/{row['name']}"
    if row.get("layer") is not None:
        tag += f"/{layer_tag(row['layer'])}"
    if with_rank:
        tag += f"/rank_{int(row['rank'])}"
    return tag


def alert_line(row: dict) -> str:
    return (f"layer {row['layer']}: {row['alert']} {row['transition']} after {row['consecutive']} "
            f"snapshots (neff {row['neff']:.4g} of {row['n_experts']}, top2_share "
            f"{row['top2_share']:.4g}, dead {row['dead']})")


class _EventWriter:
    """Scalars (float64) and text into one event file, through tensorboard's own writer."""

    def __init__(self, logdir: Path):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._w = EventFileWriter(str(logdir), max_queue_size=1000, filename_suffix=EVENT_SUFFIX)
        self._wall = time.time()
        self.points = 0

    def _add(self, summary, step: int) -> None:
        from tensorboard.compat.proto import event_pb2

        self._w.add_event(event_pb2.Event(wall_time=self._wall, step=int(step), summary=summary))
        self.points += 1

    def scalars(self, step: int, values: dict[str, float]) -> None:
        import numpy as np
        from tensorboard.compat.proto import summary_pb2
        from tensorboard.plugins.scalar import metadata
        from tensorboard.util import tensor_util

        s = summary_pb2.Summary()
        for tag, v in values.items():
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            s.value.add(tag=tag, metadata=metadata.create_summary_metadata(display_name=None,
                                                                           description=None),
                        tensor=tensor_util.make_tensor_proto(np.float64(v)))
        if s.value:
            self._add(s, step)

    def text(self, step: int, tag: str, text: str) -> None:
        from tensorboard.plugins.text.summary_v2 import text_pb

        self._add(text_pb(tag, text), step)

    def close(self) -> None:
        self._w.close()


def _rows(con, table: str, run: str, order: str) -> list[dict]:
    return con.sql(f"SELECT * FROM {table} WHERE run_id = ? ORDER BY {order}",
                   params=[run]).to_arrow_table().to_pylist()


def export_tensorboard(root, run: str, logdir, overwrite: bool = False, progress: bool = False) -> dict:
    """Write run ``run`` of the store at ``root`` as an event file under ``logdir/run``.

    Returns ``{"path": event file, "points": events written, <table>: rows read}``.
    Raises ``chrono.store.StoreError`` (unknown run / bad id) and ``ExportError``
    (chrono event files for the run exist and ``overwrite`` is false).
    """
    import chrono
    from chrono.store import require_run
    from tqdm import tqdm

    require_run(root, run)
    out = Path(logdir) / run
    old = sorted(p for p in out.glob(f"events.out.tfevents.*{EVENT_SUFFIX}")) if out.is_dir() else []
    if old and not overwrite:
        raise ExportError(f"{out} already holds an export of run {run!r} ({old[0].name}); "
                         f"pass --overwrite to replace it")
    con = chrono.connect(root)
    snaps = _rows(con, "snapshots", run, "step, layer")
    alerts = _rows(con, "alerts", run, "step, layer, alert")
    decisions = _rows(con, "decisions", run, "step, layer, actuator")
    signals = _rows(con, "signals", run, "step, name, layer, rank")
    for p in old:
        os.unlink(p)
    w = _EventWriter(out)
    try:
        with tqdm(total=len(snaps) + len(alerts) + len(decisions) + len(signals), unit="row",
                  desc=f"export {run}", disable=not progress) as bar:
            by_step: dict[int, dict[str, float]] = {}
            for r in snaps:
                by_step.setdefault(int(r["step"]), {}).update(snapshot_tags(r))
            bar.update(len(snaps))
            many_actuators = len({r["actuator"] for r in decisions}) > 1
            for r in decisions:
                by_step.setdefault(int(r["step"]), {}).update(decision_tags(r, many_actuators))
            bar.update(len(decisions))
            many_ranks = len({r["rank"] for r in signals}) > 1
            for r in signals:
                by_step.setdefault(int(r["step"]), {})[signal_tag(r, many_ranks)] = r["value"]
            bar.update(len(signals))
            for step in sorted(by_step):
                w.scalars(step, by_step[step])
            lines: dict[int, list[str]] = {}
            for r in alerts:
                lines.setdefault(int(r["step"]), []).append(alert_line(r))
            for step, ls in sorted(lines.items()):
                w.text(step, "chrono/alerts", "\n\n".join(ls))
            bar.update(len(alerts))
    finally:
        w.close()
    path = next(iter(sorted(out.glob(f"events.out.tfevents.*{EVENT_SUFFIX}"))), None)
    return {"path": path, "points": w.points, "snapshots": len(snaps), "alerts": len(alerts),
            "decisions": len(decisions), "signals": len(signals)}


def cmd_export_tensorboard(args) -> int:
    import sys

    from chrono_cli.common import UserError, refuse_inside_store

    logdir = Path(args.logdir)
    if logdir.exists() and not logdir.is_dir():
        raise UserError(f"--logdir {logdir} is not a directory")
    refuse_inside_store(logdir, args.root, "--logdir")   # DIR/RUN would be a legacy run's place
    try:
        res = export_tensorboard(args.root, args.run, logdir, overwrite=args.overwrite,
                                 progress=sys.stderr.isatty())
    except ExportError as e:
        raise UserError(str(e)) from None
    if not (res["snapshots"] or res["signals"] or res["decisions"]):
        print(f"note: run {args.run!r} has no snapshots, decisions or signals "
              f"(compute snapshots with 'chrono snapshot {args.run} --every K')", file=sys.stderr)
    print(f"exported {args.run}: {res['snapshots']} snapshot rows, {res['alerts']} alert transitions, "
          f"{res['decisions']} decisions, {res['signals']} signals -> {res['path']}")
    print(f"view with: tensorboard --logdir {logdir}")
    return 0
