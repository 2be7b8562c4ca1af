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

import numpy as np

N_LAYERS, N_EXPERTS, TOP_K, TOKENS_PER_STEP = 4, 8, 2, 2048
SNAPSHOT_EVERY = 10


def synthetic_counts(rng: np.random.Generator, step: int, steps: int) -> np.ndarray:
    """Counts ``[layers, experts]`` of (token, k) assignments at ``step``."""
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


def record(root, run: str, steps: int, seed: int, progress: bool = True) -> None:
    import chrono
    from chrono.snapshots import AlertTracker, layer_rows

    rng = np.random.default_rng(seed)
    model = {"name": "synthetic-drift", "layers": list(range(N_LAYERS)),
             "experts_per_layer": {str(l): N_EXPERTS for l in range(N_LAYERS)},
             "top_k": TOP_K, "adapter": "synthetic"}
    tracker = AlertTracker()
    window: dict[int, np.ndarray] = {}
    from tqdm import tqdm

    with chrono.open_run(root, run, model=model, config={"steps": steps, "seed": seed, "demo": True}) as w:
        for step in tqdm(range(steps), desc=f"recording {run}", disable=not progress, unit="step"):
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
    from tqdm import tqdm
    from transformers import MixtralConfig, MixtralForCausalLM

    import chrono
    import probes
    from reference_models.common import byte_batches, split_bytes, text_bytes

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
        for step, (x, _) in enumerate(tqdm(batches, total=steps, desc=f"training {run}",
                                           disable=not progress, unit="step")):
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


def _serve(root) -> int:
    """Serve the dashboard and the metrics endpoint until Ctrl-C."""
    import signal
    import threading

    from chrono.exporters.prometheus import ExporterError
    from chrono.exporters.prometheus import serve as serve_metrics
    from dashboard.server import ServeError, port_free
    from dashboard.server import serve as serve_dashboard
    from dashboard.server import stop, url

    dash_port = next(p for p in range(8501, 8600) if port_free("127.0.0.1", p))
    try:
        proc = serve_dashboard(root, port=dash_port)
    except ServeError as e:
        print(f"chrono: dashboard not started: {e}", file=sys.stderr)
        return 1
    metrics = None
    for port in range(9108, 9200):
        try:
            metrics = serve_metrics(root, port=port)
            break
        except ExporterError:
            continue
    print(f"\ndashboard:  {url('127.0.0.1', dash_port)}")
    if metrics is not None:
        print(f"prometheus: {metrics.url}")
    print("press Ctrl-C to stop")
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: done.set())
    try:
        while not done.wait(1.0) and proc.poll() is None:
            pass
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
    from chrono.cli import UserError
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
        from chrono.cli import UserError

        raise UserError(f"--steps must be >= {SNAPSHOT_EVERY}")
    if args.model_steps and args.model_steps < SNAPSHOT_EVERY:
        from chrono.cli import UserError

        raise UserError(f"--model-steps must be 0 or >= {SNAPSHOT_EVERY}")
    root = args.root
    progress = sys.stderr.isatty()
    model_run = f"{args.run}-mixtral"
    _clear_previous(root, [args.run, model_run])
    record(root, args.run, args.steps, args.seed, progress=progress)
    trained = None
    if args.model_steps:
        trained = record_mixtral(root, model_run, args.model_steps, args.seed, progress=progress)
    import chrono

    con = chrono.connect(root)
    first = dict(con.execute(
        "SELECT alert, min(step) FROM alerts WHERE run_id = ? AND transition = 'raised' GROUP BY 1",
        [args.run]).fetchall())
    final = con.execute(
        "SELECT layer, round(neff, 2), round(top2_share, 3), dead FROM snapshots "
        "WHERE run_id = ? AND layer >= 0 AND step = (SELECT max(step) FROM snapshots WHERE run_id = ?) "
        "ORDER BY layer", [args.run, args.run]).fetchall()
    print(f"\nrecorded run '{args.run}' ({args.steps} steps, {N_LAYERS} layers x {N_EXPERTS} experts) "
          f"under {root}")
    for name in ("PRE_COLLAPSE", "COLLAPSE_CONFIRMED"):
        print(f"  first {name:<19} at step {first.get(name, 'never')}")
    for layer, neff, top2, dead in final:
        print(f"  layer {layer}: final Neff {neff} of {N_EXPERTS}, Top2 {top2}, dead {dead}")
    if trained is not None:
        rows = con.execute(
            "SELECT layer, round(neff, 2), round(top2_share, 3), dead FROM snapshots WHERE run_id = ? "
            "AND layer >= 0 AND step = (SELECT max(step) FROM snapshots WHERE run_id = ?) ORDER BY layer",
            [model_run, model_run]).fetchall()
        alerts = con.execute("SELECT count(*) FROM alerts WHERE run_id = ? AND transition = 'raised'",
                             [model_run]).fetchall()[0][0]
        print(f"\nrecorded run '{model_run}' (tiny HF Mixtral, {args.model_steps} steps on pydoc text, "
              f"{trained['routers']} routers found by probes, governed by the informed lens)")
        print(f"  final loss {trained['loss']:.3f} nats/byte, {trained['decisions']} controller decisions, "
              f"{alerts} alerts raised")
        for layer, neff, top2, dead in rows:
            print(f"  layer {layer}: final Neff {neff} of 8, Top2 {top2}, dead {dead}")
    print("\nlook at it:")
    print(f"  chrono --root {root} runs")
    print(f"  chrono --root {root} alerts {args.run}")
    print(f"  chrono --root {root} query \"SELECT step, layer, neff, top2_share FROM snapshots "
          f"WHERE run_id = '{args.run}' ORDER BY step, layer\"")
    print(f"  chrono --root {root} dashboard")
    if args.no_serve:
        return 0
    return _serve(root)
