"""``chrono demo``: record two runs into the store, summarise them, serve the views.

1. ``demo`` — a synthetic workload whose routing drifts into collapse: 4 MoE
   layers x 8 experts, top-2, 2048 tokens per step; router logits drift towards
   expert 0 (deeper layers faster) until one expert takes almost everything.
   Written through the real store; snapshots and alerts by the same code the
   CLI uses. Deterministic, so it always shows PRE_COLLAPSE before
   COLLAPSE_CONFIRMED.
2. ``demo-mixtral`` — a real model: a tiny Hugging Face Mixtral (random
   weights from a config, offline) trained as a byte-level language model on
   Python's own documentation (``pydoc_data.topics``), instrumented with
   ``probes.attach`` and governed by ``chrono.govern`` (informed lens).

Then, unless ``--no-serve``, the dashboard and the Prometheus endpoint are
served on 127.0.0.1 until Ctrl-C.
"""
from __future__ import annotations

import sys
import time

from chrono_cli.common import UserError, invocation, plural

N_LAYERS, N_EXPERTS, TOP_K, TOKENS_PER_STEP = 4, 8, 2, 2048
SNAPSHOT_EVERY = 10


def synthetic_counts(rng, step: int, steps: int):
    """Counts ``[layers, experts]`` (int64 ndarray) of (token, k) assignments at ``step``.

    ``rng``: a ``numpy.random.Generator``.
    """
    import numpy as np

    out = np.zeros((N_LAYERS, N_EXPERTS), dtype=np.int64)
    progress = step / max(1, steps - 1)
    for layer in range(N_LAYERS):
        drift = 9.0 * progress * (0.5 + 0.5 * layer / (N_LAYERS - 1))
        logits = np.zeros(N_EXPERTS)
        logits[0] += drift
        logits[1] += 0.6 * drift
        logits[N_EXPERTS // 2:] -= drift  # the back half starves
        p = np.exp(logits - logits.max())
        p /= p.sum()
        out[layer] = rng.multinomial(TOKENS_PER_STEP * TOP_K, p)
    return out


def _bar(iterable, total: int, desc: str, progress: bool):
    """A tqdm bar on stderr; redrawn at most every 5 s when stderr is not a terminal (logs, CI)."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, disable=not progress, unit="step",
                mininterval=0.1 if tty else 5.0, dynamic_ncols=tty, file=sys.stderr)


class Stages:
    """Numbered stage lines ('[1/3] recording ...', '      done in 4.2 s') on stdout, flushed at once."""

    def __init__(self, total: int, out=None):
        self.total, self.i, self.out, self._t0 = total, 0, out or sys.stdout, None

    def start(self, what: str) -> None:
        self.end()
        self.i += 1
        self._t0 = time.perf_counter()
        print(f"[{self.i}/{self.total}] {what}", file=self.out, flush=True)

    def end(self) -> None:
        if self._t0 is not None:
            print(f"      done in {time.perf_counter() - self._t0:.1f} s", file=self.out, flush=True)
            self._t0 = None


def record(root, run: str, steps: int, seed: int, progress: bool = True) -> None:
    import numpy as np

    import chrono
    from chrono.snapshots import AlertTracker, layer_rows

    rng = np.random.default_rng(seed)
    model = {"name": "synthetic-drift", "layers": list(range(N_LAYERS)),
             "experts_per_layer": {str(l): N_EXPERTS for l in range(N_LAYERS)},
             "top_k": TOP_K, "adapter": "synthetic"}
    tracker = AlertTracker()
    window: dict = {}  # layer -> counts summed over the window
    with chrono.open_run(root, run, model=model, config={"steps": steps, "seed": seed, "demo": True}) as w:
        for step in _bar(range(steps), steps, f"recording {run}", progress):
            counts = synthetic_counts(rng, step, steps)
            w.log_routing(step, np.arange(N_LAYERS), counts, mode="TRAIN")
            w.log_signal(step, "loss", float(3.0 - 1.2 * step / steps + rng.normal(0, 0.03)))
            for l in range(N_LAYERS):
                window[l] = window.get(l, 0) + counts[l]
            if (step + 1) % SNAPSHOT_EVERY == 0 or step == steps - 1:
                start = (step // SNAPSHOT_EVERY) * SNAPSHOT_EVERY
                rows = layer_rows(run, start, start + SNAPSHOT_EVERY - 1, window)
                w.log_rows("snapshots", rows)
                w.log_rows("alerts", tracker.update(rows))
                window = {}
                w.flush()


def record_mixtral(root, run: str, steps: int, seed: int, progress: bool = True) -> dict:
    """Train a tiny HF Mixtral on pydoc text under probes + governor; returns final numbers."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    import chrono
    import probes
    from reference_models.corpus import byte_batches, split_bytes, text_bytes

    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                        num_experts_per_tok=2, max_position_embeddings=128, router_aux_loss_coef=0.0)
    model = MixtralForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train, _ = split_bytes(text_bytes())
    loss = float("nan")
    with probes.attach(model, run=run, root=root, flush_every=SNAPSHOT_EVERY,
                       config={"demo": True, "steps": steps, "seed": seed}) as h:
        gov = chrono.govern(model, h, actuators=("informed-lens",))
        batches = byte_batches(train, 64, 8, seed, steps)
        for step, (x, _) in enumerate(_bar(batches, steps, f"training {run}", progress)):
            out = model(input_ids=x, labels=x)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss = float(out.loss.detach())
            h.writer.log_signal(step, "loss", loss)
            h.step()
            gov.step()
        routers = len(h.routers)
    return {"loss": loss, "routers": routers, "decisions": len(gov.decisions)}


def _default_else_any(start, port: int, busy: type[Exception]):
    """``start(port)``; if that port is taken, ``start(0)`` (any free port)."""
    try:
        return start(port)
    except busy:
        return start(0)


def _serve(root) -> int:
    """Serve the dashboard and the metrics endpoint until Ctrl-C."""
    import signal

    from chrono.exporters.prometheus import DEFAULT_PORT as METRICS_PORT
    from chrono.exporters.prometheus import ExporterError
    from chrono.exporters.prometheus import serve as serve_metrics
    from dashboard.server import DEFAULT_PORT as DASHBOARD_PORT
    from dashboard.server import ServeError
    from dashboard.server import serve as serve_dashboard
    from dashboard.server import stop, url

    def _terminated(signum, frame):   # `kill` stops both servers too, also while they start
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminated)
    # the well-known ports (8501, 9108) when free, so bookmarks and scrape configs keep working;
    # else port 0: a port the system picks (no scanning)
    try:
        proc = _default_else_any(lambda port: serve_dashboard(root, port=port), DASHBOARD_PORT, ServeError)
    except ServeError as e:
        print(f"chrono: dashboard not started: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:   # serve() stopped the starting server
        return 0
    metrics = None
    try:
        try:
            metrics = _default_else_any(lambda port: serve_metrics(root, port=port), METRICS_PORT,
                                        ExporterError)
        except ExporterError as e:
            print(f"chrono: metrics endpoint not started: {e}", file=sys.stderr)
        print(f"\ndashboard:  {url('127.0.0.1', proc.port)}")
        if metrics is not None:
            print(f"prometheus: {metrics.url}")
        print("press Ctrl-C to stop")
        proc.wait()                # until Ctrl-C / kill (KeyboardInterrupt) or the server exits
    except KeyboardInterrupt:
        pass
    finally:
        stop(proc)
        if metrics is not None:
            metrics.close()
    return 0


def _clear_previous(root, runs: list[str]) -> None:
    """Remove earlier demo runs of these names, so ``make demo`` is idempotent.

    Only runs that ``chrono demo`` itself wrote (``config.demo`` in the
    manifest) are removed; a user's run of the same name is an error.
    """
    from chrono.schema import TABLES
    from chrono.store import delete_run, run_manifest, run_meta_dir, table_dirs

    for run in runs:
        if run_meta_dir(root, run) is None \
                and not any(d.exists() for t in TABLES for d in table_dirs(root, t, run)):
            continue
        manifest = run_manifest(root, run)
        if not (manifest.get("config") or {}).get("demo"):
            raise UserError(f"run {run!r} already exists under {root} and was not written by "
                            f"'chrono demo'; pick another name with --run")
        delete_run(root, run)


def run_demo(args) -> int:
    from chrono.store import validate_run_id

    validate_run_id(args.run)
    if args.steps < SNAPSHOT_EVERY:
        raise UserError(f"--steps must be >= {SNAPSHOT_EVERY}")
    if args.model_steps and args.model_steps < SNAPSHOT_EVERY:
        raise UserError(f"--model-steps must be 0 or >= {SNAPSHOT_EVERY}")
    root = args.root
    progress = True  # tqdm: live on a terminal, a line every 5 s in a log
    model_run = f"{args.run}-mixtral"
    stages = Stages(1 + (2 if args.model_steps else 0) + (0 if args.no_serve else 1))
    _clear_previous(root, [args.run, model_run])
    stages.start(f"recording synthetic run '{args.run}': {args.steps} steps, {N_LAYERS} layers x "
                 f"{N_EXPERTS} experts, routing drifting into collapse")
    record(root, args.run, args.steps, args.seed, progress=progress)
    trained = None
    if args.model_steps:
        stages.start("loading torch and transformers (the first time takes a while)")
        import torch  # noqa: F401  (timed here, so the training stage measures training)
        import transformers  # noqa: F401

        stages.start(f"training a tiny HF Mixtral '{model_run}' for {args.model_steps} steps on "
                     "Python's docs, with probes and the governance controller")
        trained = record_mixtral(root, model_run, args.model_steps, args.seed, progress=progress)
    stages.end()
    summary(root, args.run, model_run if trained is not None else None, args.steps, args.model_steps, trained)
    hints(root, args.run)
    if args.no_serve:
        return 0
    stages.start("serving the dashboard and the Prometheus endpoint")
    return _serve(root)


def summary(root, run: str, model_run: str | None, steps: int, model_steps: int, trained: dict | None) -> None:
    """Print what the demo runs show: first alerts, final Neff / Top-2 / dead per layer."""
    import chrono

    con = chrono.connect(root)
    first = dict(con.execute(
        "SELECT alert, min(step) FROM alerts WHERE run_id = ? AND transition = 'raised' GROUP BY 1",
        [run]).fetchall())
    final = _final_layers(con, run)
    print(f"\nrecorded run '{run}' ({steps} steps, {N_LAYERS} layers x {N_EXPERTS} experts) under {root}")
    for name in ("PRE_COLLAPSE", "COLLAPSE_CONFIRMED"):
        print(f"  first {name:<19} at step {first.get(name, 'never')}")
    for layer, neff, top2, dead in final:
        print(f"  layer {layer}: final Neff {neff} of {N_EXPERTS}, Top2 {top2}, dead {dead}")
    if model_run is not None:
        rows = _final_layers(con, model_run)
        alerts = con.execute("SELECT count(*) FROM alerts WHERE run_id = ? AND transition = 'raised'",
                             [model_run]).fetchall()[0][0]
        print(f"\nrecorded run '{model_run}' (tiny HF Mixtral, {model_steps} steps on pydoc text, "
              f"{trained['routers']} routers found by probes, governed by the informed lens)")
        print(f"  final loss {trained['loss']:.3f} nats/byte, "
              f"{plural(trained['decisions'], 'controller decision')}, {plural(alerts, 'alert')} raised")
        for layer, neff, top2, dead in rows:
            print(f"  layer {layer}: final Neff {neff} of 8, Top2 {top2}, dead {dead}")
    print("\nNeff = exp(entropy of the expert shares): 8 of 8 is perfectly even routing, 1 means one expert "
          "takes everything.\nTop2 = share of the two busiest experts; dead = experts that got no token "
          "in the last window.")


def _final_layers(con, run: str) -> list[tuple]:
    """(layer, Neff, Top-2 share, dead) of the run's latest snapshot, per layer (no global row)."""
    from chrono.queries import LATEST_SNAPSHOTS_SQL

    return con.execute("SELECT layer, round(neff, 2), round(top2_share, 3), dead "
                       f"FROM ({LATEST_SNAPSHOTS_SQL}) WHERE layer >= 0 ORDER BY layer",
                       {"run": run, "windows": 1}).fetchall()


def hints(root, run: str) -> None:
    """Commands to look further, spelled so that they run in the user's shell."""
    from pathlib import Path


    exe = invocation()
    print("\nlook at it:")
    print(f"  {exe} --root {root} runs")
    print(f"  {exe} --root {root} show {run}")
    print(f"  {exe} --root {root} alerts {run}")
    print(f"  {exe} --root {root} query \"SELECT step, layer, neff, top2_share FROM snapshots "
          f"WHERE run_id = '{run}' ORDER BY step, layer\"")
    print(f"  {exe} --root {root} dashboard")
    activate = Path(exe).parent / "activate"  # next to the entry point in a venv's bin/
    if exe != "chrono" and activate.is_file():
        print(f"  (or 'source {activate}' once, then plain 'chrono ...')")


def register(sub) -> None:
    s = sub.add_parser("demo", help="record demo runs (synthetic collapse + a governed tiny HF Mixtral), "
                                    "then serve the dashboard and metrics",
                       description="Records RUN (synthetic routing drifting into collapse) and RUN-mixtral "
                                   "(a tiny Hugging Face Mixtral trained on Python's docs with probes and the "
                                   "governance controller), prints a summary, then serves the dashboard and "
                                   "the Prometheus endpoint on 127.0.0.1 (ports 8501 and 9108, any free ones when "
                                   "those are taken) until Ctrl-C.")
    s.add_argument("--run", default="demo", help="run id (default: demo)")
    s.add_argument("--steps", type=int, default=300, help="steps of the synthetic run (default 300)")
    s.add_argument("--model-steps", type=int, default=200,
                   help="training steps of the Mixtral run (default 200; 0 skips it)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-serve", action="store_true", help="do not start the dashboard afterwards")
    s.set_defaults(func=run_demo)
