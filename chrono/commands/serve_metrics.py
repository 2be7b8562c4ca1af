"""``chrono serve-metrics``: a Prometheus endpoint for a run on disk.

Follows the run's newest snapshots, alert transitions and controller
decisions as they are written (by a training process elsewhere); the
exporter re-reads the store only when the run's files changed.
"""
from __future__ import annotations

import sys


def register(sub) -> None:
    s = sub.add_parser(
        "serve-metrics",
        help="serve a run's routing health as Prometheus metrics (/metrics)",
        description="Serve Prometheus metrics (Neff, Top2 share, dead experts, active alerts, "
                    "controller pressure, tokens routed, ...) for a run in the store, following "
                    "its newest snapshots. Without --run it follows the most recently written run. "
                    "Binds 127.0.0.1 unless --host says otherwise. Scrape config and alert rules: "
                    "deploy/prometheus/. Stop with Ctrl-C.",
    )
    s.add_argument("--run", default=None, help="run id (default: the most recently written run)")
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

    from chrono.cli import UserError
    from chrono.exporters.prometheus import DEFAULT_MAX_EXPERT_SERIES, ExporterError, StoreSource, serve

    root = Path(args.root)
    if not root.is_dir():
        raise UserError(f"store root {root} does not exist (set --root or $CHRONO_ROOT)")
    cap = DEFAULT_MAX_EXPERT_SERIES if args.max_expert_series is None else args.max_expert_series
    if cap < 0:
        raise UserError("--max-expert-series must be >= 0")
    try:
        source = StoreSource(root, run=args.run)
        server = serve(source, port=args.port, host=args.host, expert_labels=args.expert_labels,
                       max_expert_series=cap)
    except ExporterError as e:
        raise UserError(str(e)) from None
    following = args.run or f"the newest run under {root}"
    print(f"serving Prometheus metrics for {following} at {server.url} (Ctrl-C to stop)", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # `kill` stops it as cleanly as Ctrl-C
    try:
        stop.wait()
    except KeyboardInterrupt:
        print("chrono: stopped", file=sys.stderr)
    finally:
        server.close()
    return 0
