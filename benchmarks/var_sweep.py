"""VAR sweep: what does a lower expensive fraction cost in loss?

One trained MoE LM (the ``var`` workload's default preset, pydoc text), one process. For each
setting of VAR's knobs (fast-path eligibility: frequency and entropy thresholds; context-cache:
context length and LRU size) the model is evaluated routed by VAR (intended, vectorised path) on
the **selection split** (validation batches 0..15) and we record:

- expensive fraction (share of (token, layer) decisions that needed the learned router),
- validation loss routed by VAR, and its ratio to the loss with the model's own router,
- agreement (share of decisions where VAR picked the own router's expert),
- router time: VAR's routing vs the own router, interleaved in the same process per setting
  as own (A) -> VAR (B) -> own (A'); A'/A is the A/A control of that setting.

The selection rule is fixed here, before any held-out number exists: among settings whose
selection-split expensive fraction is < 15 %, take the one with the lowest selection-split
validation loss (ties: lower expensive fraction); also kept: the Pareto front's cheapest end
(lowest expensive fraction). Only then are the own router, VAR's default setting and these
two evaluated on the **held-out split** (validation batches 16..,
never used for selection); those are the reported loss costs.

The cache's TTL (60 s) runs on a virtual clock that advances 1 s per batch, so results do not
depend on machine speed (with 16 batches the TTL never expires an entry; documented).

Each setting's result is cached on disk (``benchmarks/.cache/var_sweep/``), so a killed run
resumes where it stopped; the trained model and its statistics are cached too.

    nice -n 10 python benchmarks/var_sweep.py            # full grid (see GRID)
    python benchmarks/var_sweep.py --quick               # a smoke run (seconds)

Writes ``benchmarks/results/var_sweep.json`` and ``var_sweep.png`` (Pareto plot).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks._common import RESULTS, machine, uptime  # noqa: E402
from reference_models.var.var import VAR, VARConfig  # noqa: E402
from reference_models.var.workload import _Timed, evaluate, prepare  # noqa: E402

GRID = {
    "freq_threshold": (10, 50, 200, 1000),
    "entropy_threshold": (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5),  # ln 8 = 2.08: 2.5 admits every frequent byte
    "context": (1, 2, 3, 4, 6),
    "cache_size": (250, 1000, 4000, 16000, 64000),
}
QUICK_GRID = {"freq_threshold": (50,), "entropy_threshold": (0.5, 2.5), "context": (1, 4),
              "cache_size": (1000,)}
GOAL = 0.15
CACHE = Path(__file__).resolve().parent / ".cache" / "var_sweep"


class VirtualClock:
    """Seconds that advance by ``dt`` per evaluated batch (set by ``_Routed`` at layer 0)."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class _Routed:
    """Route by VAR; untimed, also ask the own router and count agreement."""

    def __init__(self, model, var: VAR, clock: VirtualClock):
        self.model, self.var, self.clock = model, var, clock
        self.same = self.total = 0

    def __call__(self, layer, h, idx):
        if layer == 0:
            self.clock.t += 1.0
        w, e = self.var.route(layer, h, idx)           # timed inside VAR (router_seconds)
        _, _, own = self.model.routers()[layer](h)
        self.same += int((own[:, 0] == e[:, 0]).sum())
        self.total += e.shape[0]
        return w, e


class _Split:
    """A contiguous range of validation batches, re-indexed from 0 (``evaluate`` wants .batch(i))."""

    def __init__(self, val, start: int, n: int):
        self.val, self.start, self.n = val, start, n

    def batch(self, i: int):
        return self.val.batch(self.start + i)


def measure(model, stats, split: _Split, cfg: VARConfig) -> dict:
    """One setting on one split: own (A) -> VAR (B) -> own (A'), one process, same batches."""
    own_a = _Timed(model)
    own_loss, _ = evaluate(model, split, split.n, route=own_a)
    clock = VirtualClock()
    var = VAR(model, stats, cfg, clock=clock)
    routed = _Routed(model, var, clock)
    loss, _ = evaluate(model, split, split.n, route=routed)
    own_b = _Timed(model)
    evaluate(model, split, split.n, route=own_b)
    fr = var.fractions()
    own_s = (own_a.seconds + own_b.seconds) / 2
    return {
        "expensive_fraction": fr["expensive_fraction"], "fast_fraction": fr["fast_fraction"],
        "cached_fraction": fr["cached_fraction"], "cache_hit_rate": fr["cache_hit_rate"],
        "decisions": fr["tokens"], "val_loss": loss, "own_val_loss": own_loss,
        "val_loss_ratio": loss / own_loss, "agreement": routed.same / max(1, routed.total),
        "eligible_tokens_per_layer": var.eligible.sum(1).tolist(),
        "router_s_var": fr["router_seconds"], "router_s_own_a": own_a.seconds, "router_s_own_b": own_b.seconds,
        "router_time_ratio": fr["router_seconds"] / own_s if own_s > 0 else float("nan"),
        "aa_ratio": own_b.seconds / own_a.seconds if own_a.seconds > 0 else float("nan"),
        "loadavg_1m": os.getloadavg()[0],
    }


def setting_key(s: dict) -> str:
    return "f{freq_threshold}_e{entropy_threshold}_c{context}_s{cache_size}".format(**s)


def pareto(points: list[dict]) -> list[dict]:
    """Settings not dominated in (expensive fraction, val loss), sorted by expensive fraction."""
    pts = sorted(points, key=lambda p: (p["expensive_fraction"], p["val_loss"]))
    front, best = [], math.inf
    for p in pts:
        if p["val_loss"] < best:
            front.append(p)
            best = p["val_loss"]
    return front


def choose(points: list[dict], goal: float = GOAL) -> dict | None:
    """The selection rule (fixed in advance): lowest selection-split loss with expensive < goal."""
    ok = [p for p in points if p["expensive_fraction"] < goal]
    return min(ok, key=lambda p: (p["val_loss"], p["expensive_fraction"])) if ok else None


def load_model(steps: int, seed: int, progress: bool):
    """Train (or load the cached) MoE LM and its VAR statistics."""
    path = CACHE / f"model_steps{steps}_seed{seed}.pt"
    p = prepare(steps, seed, progress=progress) if not path.exists() else None
    if p is not None:
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save({"state": p["model"].state_dict(), "stats": p["stats"], "preset": p["preset"],
                    "batch_size": p["batch_size"], "stat_batches": p["stat_batches"]}, path)
        return p
    from reference_models.var.moe_lm import MoEConfig, MoELM
    from reference_models.var.workload import PRESETS, _text

    ck = torch.load(path, weights_only=False)
    cfg = MoEConfig(**PRESETS[ck["preset"]])
    model = MoELM(cfg)
    model.load_state_dict(ck["state"])
    model.eval()
    Chunks, _, val_text = _text()
    val = Chunks(val_text, cfg.seq_len, ck["batch_size"], stride=cfg.seq_len)
    return dict(model=model, cfg=cfg, val=val, stats=ck["stats"], preset=ck["preset"],
                batch_size=ck["batch_size"], stat_batches=ck["stat_batches"])


def plot(points: list[dict], front: list[dict], chosen: dict | None, default: dict | None,
         fewest: dict | None, path: Path) -> str | None:
    try:
        import altair as alt
        import pandas as pd
        import vl_convert as vlc
    except ImportError as e:
        return f"plot skipped: {e}"
    df = pd.DataFrame(points)
    df["context"] = df["context"].astype(str)
    base = alt.Chart(df).mark_circle(size=28, opacity=0.55).encode(
        x=alt.X("expensive_fraction:Q", title="expensive (learned-router) fraction of decisions",
                axis=alt.Axis(format=".0%")),
        y=alt.Y("val_loss_ratio:Q", title="validation loss, VAR / own router (selection split)",
                scale=alt.Scale(zero=False)),
        color=alt.Color("context:N", title="context length"),
        tooltip=["freq_threshold", "entropy_threshold", "context", "cache_size", "expensive_fraction",
                 "val_loss_ratio"])
    layers = [base]
    layers.append(alt.Chart(pd.DataFrame(front)).mark_line(color="black").encode(
        x="expensive_fraction:Q", y="val_loss_ratio:Q"))
    layers.append(alt.Chart(pd.DataFrame({"x": [GOAL]})).mark_rule(strokeDash=[4, 4], color="red")
                  .encode(x="x:Q"))
    marks = [dict(p, label=name) for name, p in (("chosen", chosen), ("default", default),
                                                 ("fewest expensive", fewest)) if p]
    if marks:
        m = pd.DataFrame(marks)
        layers.append(alt.Chart(m).mark_point(shape="diamond", size=160, filled=True, color="black")
                      .encode(x="expensive_fraction:Q", y="val_loss_ratio:Q"))
        layers.append(alt.Chart(m).mark_text(dx=10, dy=-10, align="left").encode(
            x="expensive_fraction:Q", y="val_loss_ratio:Q", text="label:N"))
    chart = alt.layer(*layers).properties(
        width=560, height=340,
        title="VAR settings: expensive fraction vs loss (black line: Pareto front; red: 15 % goal)")
    path.write_bytes(vlc.vegalite_to_png(chart.to_json(), scale=2))
    return str(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny grid on the quick model (smoke run)")
    ap.add_argument("--steps", type=int, help="MoE training steps (default 600, quick 30)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--select-batches", type=int, help="selection split: validation batches 0..N-1 (16)")
    ap.add_argument("--confirm-seeds", type=int, nargs="*", default=None,
                    help="also train these model seeds and evaluate default + chosen on their held-out split "
                         "(default 1 2; quick: none)")
    ap.add_argument("--limit", type=int, help="measure at most this many new settings, then stop")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = args.steps or (30 if args.quick else 600)
    grid = QUICK_GRID if args.quick else GRID
    n_sel = args.select_batches or (2 if args.quick else 16)
    load_before = uptime()
    p = load_model(steps, args.seed, progress=True)
    model, stats, val = p["model"], p["stats"], p["val"]
    n_val = 0                                    # batches whose chunks do not wrap around the text
    while ((n_val + 1) * val.batch_size - 1) * val.stride < val.span:
        n_val += 1
    held = _Split(val, n_sel, max(1, n_val - n_sel))
    sel = _Split(val, 0, n_sel)
    tag = f"steps{steps}_seed{args.seed}_sel{n_sel}"
    out_dir = CACHE / tag
    out_dir.mkdir(parents=True, exist_ok=True)

    from tqdm import tqdm

    settings = [dict(zip(grid, v)) for v in itertools.product(*grid.values())]
    points, new = [], 0
    for s in tqdm(settings, desc="var sweep", unit="setting"):
        f = out_dir / f"{setting_key(s)}.json"
        if f.exists():
            points.append(json.loads(f.read_text()))
            continue
        if args.limit is not None and new >= args.limit:
            continue
        r = dict(s, **measure(model, stats, sel, VARConfig(mode="intended", **s)))
        f.write_text(json.dumps(r))
        points.append(r)
        new += 1
    if len(points) < len(settings):
        print(f"{len(points)} of {len(settings)} settings measured; rerun to continue")
        return 0
    front = pareto(points)
    chosen = choose(points)
    dflt = VARConfig()
    default = next((p_ for p_ in points if all(p_[k] == getattr(dflt, k) for k in grid)), None)
    # ---- held-out: only now, with the choice fixed
    held_out = {}
    arms = (("default", {k: getattr(dflt, k) for k in grid}),
            ("chosen", {k: chosen[k] for k in grid} if chosen else None),
            ("fewest_expensive", {k: front[0][k] for k in grid}))     # the front's cheapest end
    for name, s in arms:
        if s is not None:
            held_out[name] = dict(s, **measure(model, stats, held, VARConfig(mode="intended", **s)))
    confirm = {}
    for seed in (args.confirm_seeds if args.confirm_seeds is not None else ([] if args.quick else [1, 2])):
        q = load_model(steps, seed, progress=True)
        hq = _Split(q["val"], n_sel, held.n)
        confirm[str(seed)] = {name: dict(s, **measure(q["model"], q["stats"], hq, VARConfig(mode="intended", **s)))
                              for name, s in arms if s is not None}
    png = plot(points, front, chosen, default, front[0], RESULTS / ("var_sweep_quick.png" if args.quick else "var_sweep.png"))
    payload = {
        "benchmark": "var_sweep", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(), "uptime_before": load_before, "uptime_after": uptime(),
        "config": {"steps": steps, "seed": args.seed, "preset": p["preset"], "moe": p["cfg"].to_dict(),
                   "batch_size": p["batch_size"], "stat_batches": p["stat_batches"], "grid": grid,
                   "selection_batches": [0, n_sel - 1], "held_out_batches": [n_sel, n_sel + held.n - 1],
                   "selection_rule": f"lowest selection-split val loss with expensive fraction < {GOAL}",
                   "clock": "virtual, +1 s per batch; TTL 60 s", "threads": torch.get_num_threads()},
        "settings": points, "pareto": [setting_key(q) for q in front],
        "chosen": setting_key(chosen) if chosen else None, "default": setting_key(default) if default else None,
        "held_out": held_out, "held_out_other_model_seeds": confirm, "plot": png,
    }
    path = RESULTS / ("var_sweep_quick.json" if args.quick else "var_sweep.json")
    path.write_text(json.dumps(payload, indent=2))
    print(f"{'setting':<28}{'expens.':>8}{'loss x':>8}{'agree':>7}{'router x':>9}{'A/A':>6}")
    for q in front:
        print(f"{setting_key(q):<28}{q['expensive_fraction']:>8.3f}{q['val_loss_ratio']:>8.4f}"
              f"{q['agreement']:>7.3f}{q['router_time_ratio']:>9.2f}{q['aa_ratio']:>6.2f}")
    for name, r in held_out.items():
        print(f"held-out {name:<8} {setting_key(r):<26} expensive {r['expensive_fraction']:.3f} "
              f"loss x{r['val_loss_ratio']:.4f} agreement {r['agreement']:.3f} router x{r['router_time_ratio']:.2f}")
    for seed, arms in confirm.items():
        for name, r in arms.items():
            print(f"model seed {seed} held-out {name:<8} expensive {r['expensive_fraction']:.3f} "
                  f"loss x{r['val_loss_ratio']:.4f} agreement {r['agreement']:.3f}")
    print(f"load: {load_before} -> {payload['uptime_after']}\nwrote {path}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
