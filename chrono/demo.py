"""``chrono demo``: record a run whose routing drifts into collapse, then summarise it.

The synthetic workload stands in for a model: 4 MoE layers x 8 experts, top-2,
2048 tokens per step. Router logits drift towards expert 0 (layer l drifts
faster the deeper it is) until one expert takes almost everything and others
go dead. Counts are sampled, written through the real store, snapshots and
alerts are computed by the same code the CLI uses.
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

    with chrono.open_run(root, run, model=model, config={"steps": steps, "seed": seed}) as w:
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


def run_demo(args) -> int:
    from chrono.store import validate_run_id

    validate_run_id(args.run)
    if args.steps < SNAPSHOT_EVERY:
        from chrono.cli import UserError

        raise UserError(f"--steps must be >= {SNAPSHOT_EVERY}")
    root = args.root
    record(root, args.run, args.steps, args.seed, progress=sys.stderr.isatty())
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
    print("\nlook at it:")
    print(f"  chrono --root {root} alerts {args.run}")
    print(f"  chrono --root {root} query \"SELECT step, layer, neff, top2_share FROM snapshots "
          f"WHERE run_id = '{args.run}' ORDER BY step, layer\"")
    return 0
