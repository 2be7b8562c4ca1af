"""``chrono serve-metrics``: a Prometheus endpoint for the runs on disk.

Without ``--run`` it exports every run written within ``--recent`` (default
30 min), each with its ``run`` label, newest first and at most ``--max-runs``;
``--run`` pins one run. Follows each run's newest snapshots, alert transitions
and controller decisions as they are written (by training processes
elsewhere); the exporter re-reads a run only when its files changed.
"""
from __future__ import annotations

import re
import sys

_UNITS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds in '900', '90s', '15m', '15min', '2h', '1d' (> 0); ValueError otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d)?\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"--recent must be a positive duration like 900, 15m, 2h; got {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2) or ""]


def register(sub) -> None:
    s = sub.add_parser(
        "serve-metrics",
        help="serve the routing health of recent runs as Prometheus metrics (/metrics)",
        description="Serve Prometheus metrics (Neff, Top2 share, dead experts, active alerts, "
                    "controller pressure, tokens routed, ...) for the runs in the store, following "
                    "their newest snapshots. Without --run every run written within --recent is "
                    "exported with its run label (a new run appears by itself, a quiet one drops "
                    "out); --run pins one. Binds 127.0.0.1 unless --host says otherwise. Scrape "
                    "config and alert rules: deploy/prometheus/. Stop with Ctrl-C.",
    )
    s.add_argument("--run", default=None,
                   help="export only this run (default: every run written within --recent)")
    s.add_argument("--recent", default=None, metavar="DURATION",
                   help="without --run: export runs written within this long (default 30m; "
                        "e.g. 900, 15m, 2h)")
    s.add_argument("--max-runs", type=int, default=None,
                   help="without --run: export at most this many recent runs, newest first (default 20)")
    s.add_argument("--port", type=int, default=9108, help="TCP port (default 9108; 0 = any free port)")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it to the network)")
    s.add_argument("--expert-labels", action="store_true",
                   help="also export per-expert shares (chrono_expert_share{expert=...}); capped")
    s.add_argument("--max-expert-series", type=int, default=None,
                   help="cap on per-expert series with --expert-labels (default 2048)")
    s.set_defaults(func=cmd_serve_metrics)


def cmd_serve_metrics(args) -> int:
    import signal
    import threading
    from pathlib import Path

    from chrono_cli.common import UserError
    from chrono.exporters.prometheus import (DEFAULT_MAX_EXPERT_SERIES, DEFAULT_MAX_RUNS, ExporterError,
                                             StoreSource, serve)

    root = Path(args.root)
    if not root.is_dir():
        raise UserError(f"store root {root} does not exist (set --root or $CHRONO_ROOT)")
    cap = DEFAULT_MAX_EXPERT_SERIES if args.max_expert_series is None else args.max_expert_series
    if cap < 0:
        raise UserError("--max-expert-series must be >= 0")
    if args.run is not None:
        for name, value in (("--recent", args.recent), ("--max-runs", args.max_runs)):
            if value is not None:
                raise UserError(f"{name} picks which recent runs to export; with --run {args.run} "
                                f"only that run is exported: drop one of them")
    recent = args.recent or "30m"
    try:
        recent_s = parse_duration(recent)
    except ValueError as e:
        raise UserError(str(e)) from None
    max_runs = DEFAULT_MAX_RUNS if args.max_runs is None else args.max_runs
    if max_runs < 1:
        raise UserError("--max-runs must be >= 1")
    try:
        source = StoreSource(root, run=args.run, recent_s=recent_s, max_runs=max_runs)
        server = serve(source, port=args.port, host=args.host, expert_labels=args.expert_labels,
                       max_expert_series=cap)
    except ExporterError as e:
        raise UserError(str(e)) from None
    if args.run:
        following = f"run {args.run}"
    else:
        runs = source.current_runs()
        following = (f"every run under {root} written within {recent} (now: "
                     f"{', '.join(runs) if runs else 'none'}; at most {max_runs})")
    if not args.run:
        from chrono.store import list_runs, store_note

        note = None if list_runs(root) else store_note(root)
        if note is not None:   # e.g. the parent of the store: the runs are one level down
            print(f"chrono: note: {note}", file=sys.stderr, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # `kill` stops it as cleanly as Ctrl-C
    # the banner last: whoever waits for it may stop the process right away
    print(f"serving Prometheus metrics for {following} at {server.url} (Ctrl-C to stop)", flush=True)
    try:
        stop.wait()
    except KeyboardInterrupt:
        print("chrono: stopped", file=sys.stderr)
    finally:
        server.close()
    return 0
