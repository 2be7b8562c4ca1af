"""Governance benchmark: does a controller keep a collapse-prone MoE LM's routing healthy?

Workload: a small byte-level MoE language model (2 MoE layers, 8 experts, top-2)
trained on the text of ``pydoc_data.topics`` (ships with Python), with settings
that make routing collapse without balancing (sharp router init, high learning
rate, no aux loss). Arms, same seeds:

  none         no balancing at all
  aux0.01      Switch aux loss, alpha = 0.01 (Fedus et al. 2021)
  aux0.1       Switch aux loss, alpha = 0.1 (DESIGN §6: the toughest baseline)
  lossfree     loss-free bias balancing, constant rate (Wang et al. 2024 / DeepSeek-V3)
  lens         chrono controller + faithful ChronoLens (DESIGN §4)
  chrono-*     chrono controller with one of the actuators of chrono.actuators

Routing is counted inside the training loop (bincount of the router's indices
per window), turned into snapshot rows with ``chrono.snapshots.layer_rows``, fed
to ``AlertTracker`` (PRE_COLLAPSE / COLLAPSE_CONFIRMED) and, for governed arms,
to ``chrono.governance.Governor.observe`` — the same path ``chrono.govern`` uses
with probes. Prints a table, writes benchmarks/results/governance[_quick].json
and a PNG plot (Altair + vl-convert).

    python benchmarks/governance.py --quick          # CI-size: a few minutes on 1 core
    python benchmarks/governance.py                  # full: 600 steps x 3 seeds
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chrono.controller import ControlConfig  # noqa: E402
from chrono.governance import Governor  # noqa: E402
from chrono.actuators import RouterBiasActuator  # noqa: E402
from chrono.snapshots import AlertTracker, layer_rows  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------- model
@dataclass
class MoEConfig:
    vocab: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    n_experts: int = 8
    top_k: int = 2
    d_expert: int = 128
    seq_len: int = 64
    router_init_std: float = 0.5   # sharp router at init: early winners take all
    renormalize: bool = False      # Switch-style gate weights = softmax probs (no top-k renorm)
    router_bias: bool = True       # learnable per-expert logit bias (fast-moving, collapse-prone)
    shared_offset: float = 1.5     # a fixed shared direction in the residual stream, |c| = this·sqrt(d)
    route_raw: bool = True         # router reads the un-normalised residual stream (shared drift -> collapse)


class Router(nn.Module):
    """Native chrono router: returns (logits, top-k weights, indices).

    ``selection_bias`` shifts only which experts are chosen (loss-free balancing);
    ``temperature`` divides the logits before the softmax.
    """

    chrono_router = True

    def __init__(self, d: int, n_experts: int, top_k: int, layer_id: int, init_std: float,
                 renormalize: bool = False, router_bias: bool = False):
        super().__init__()
        self.n_experts, self.top_k, self.layer_id = n_experts, top_k, layer_id
        self.renormalize = renormalize
        self.weight = nn.Parameter(torch.randn(n_experts, d) * init_std)
        self.logit_bias = nn.Parameter(torch.zeros(n_experts)) if router_bias else None
        self.register_buffer("selection_bias", torch.zeros(n_experts))
        self.temperature = 1.0

    def forward(self, x):                       # x [T, d]
        logits = x @ self.weight.t()            # [T, E]
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        probs = torch.softmax(logits / self.temperature, dim=-1)
        idx = torch.topk(logits + self.selection_bias, self.top_k, dim=-1).indices  # [T, k]
        w = probs.gather(-1, idx)
        if self.renormalize:
            w = w / w.sum(-1, keepdim=True)
        return logits, w, idx


class MoE(nn.Module):
    def __init__(self, cfg: MoEConfig, layer_id: int):
        super().__init__()
        self.router = Router(cfg.d_model, cfg.n_experts, cfg.top_k, layer_id, cfg.router_init_std,
                             cfg.renormalize, cfg.router_bias)
        self.w1 = nn.Parameter(torch.randn(cfg.n_experts, cfg.d_model, cfg.d_expert) / math.sqrt(cfg.d_model))
        self.w2 = nn.Parameter(torch.randn(cfg.n_experts, cfg.d_expert, cfg.d_model) / math.sqrt(cfg.d_expert))
        self.aux = torch.zeros(())
        self.last_idx = None

    def forward(self, x, route_x=None):         # x [B, S, d] expert input; route_x: router input
        B, S, d = x.shape
        flat = x.reshape(-1, d)
        logits, w, idx = self.router(flat if route_x is None else route_x.reshape(-1, d))
        probs = torch.softmax(logits, -1)
        E = probs.shape[-1]
        # Switch aux loss alpha-free part: E * sum_i f_i * P_i (f over all k assignments)
        f = torch.zeros(E, device=x.device).scatter_add_(0, idx.reshape(-1), torch.ones(idx.numel()))
        f = f / idx.numel()
        self.aux = E * (f.detach() * probs.mean(0)).sum()
        self.last_idx = idx.detach()
        out = torch.zeros_like(flat)
        for e in range(E):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            h = F.gelu(flat[tok] @ self.w1[e]) @ self.w2[e]
            out.index_add_(0, tok, h * w[tok, slot, None])
        return out.reshape(B, S, d)


class Block(nn.Module):
    def __init__(self, cfg: MoEConfig, layer_id: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = nn.MultiheadAttention(cfg.d_model, cfg.n_heads, batch_first=True)
        self.moe = MoE(cfg, layer_id)
        self.route_raw = cfg.route_raw
        self.register_buffer("mask", torch.triu(torch.ones(cfg.seq_len, cfg.seq_len, dtype=torch.bool), 1))

    def forward(self, x):
        S = x.shape[1]
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=self.mask[:S, :S], need_weights=False)[0]
        return x + self.moe(self.ln2(x), x if self.route_raw else None)


class ByteMoELM(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Parameter(torch.randn(cfg.seq_len, cfg.d_model) * 0.02)
        # shared offset (like the 'massive activation' directions of real LMs): every token's router
        # input shares it, so a few experts win every token early unless something balances them
        c = torch.randn(cfg.d_model, generator=torch.Generator().manual_seed(7))
        self.register_buffer("offset", c / c.norm() * cfg.shared_offset * math.sqrt(cfg.d_model))
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.ln = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)

    def forward(self, x):                       # x [B, S] bytes
        h = self.emb(x) + self.pos[: x.shape[1]] + self.offset
        for b in self.blocks:
            h = b(h)
        return self.head(self.ln(h))


# ----------------------------------------------------------------- data
def load_text() -> tuple[torch.Tensor, torch.Tensor]:
    from pydoc_data.topics import topics

    data = "\n".join(topics[k] for k in sorted(topics)).encode("utf-8", errors="replace")
    t = torch.tensor(list(data), dtype=torch.long)
    cut = int(len(t) * 0.9)
    return t[:cut], t[cut:]


def batch(data: torch.Tensor, bs: int, seq: int, gen: torch.Generator):
    ix = torch.randint(0, len(data) - seq - 1, (bs,), generator=gen)
    x = torch.stack([data[i:i + seq] for i in ix])
    y = torch.stack([data[i + 1:i + seq + 1] for i in ix])
    return x, y


# ----------------------------------------------------------------- arms
# Loss-free balancing rate: Wang et al. use u = 1e-3 on sigmoid scores in [0, 1]; this model's
# router logits span several units (shared offset), where 1e-3 per step measurably did nothing
# within 200 steps (Neff 3.0 of 8, like no control), so the baseline and the chrono bias
# actuator both use u = 0.02 per step (the chrono one scales it by pressure).
BIAS_RATE = 0.02
ARMS = {
    "none": {},
    "aux0.01": {"aux": 0.01},
    "aux0.1": {"aux": 0.1},
    "lossfree": {"lossfree": BIAS_RATE},
    "lens": {"govern": ("lens",)},
    "chrono-informed-lens": {"govern": ("informed-lens",)},
    "chrono-bias": {"govern": ("bias",), "kw": {"bias": {"rate": BIAS_RATE}}},
    "chrono-aux": {"govern": ("aux",), "kw": {"aux": {"alpha_min": 0.01, "alpha_max": 0.1}}},
    "chrono-aux-strong": {"govern": ("aux",),
                          "kw": {"aux": {"alpha_min": 0.01, "alpha_max": 0.3, "pressure_ref": 0.05}}},
    "chrono-bias+aux": {"govern": ("bias", "aux"),
                        "kw": {"bias": {"rate": BIAS_RATE}, "aux": {"alpha_min": 0.01, "alpha_max": 0.1}}},
}


def run_arm(arm: str, seed: int, steps: int, every: int, bs: int, cfg: MoEConfig, lr: float,
            train: torch.Tensor, val: torch.Tensor, eval_batches: int, log_curve: bool,
            router_lr_mult: float = 1.0) -> dict:
    spec = ARMS[arm]
    torch.manual_seed(seed)
    model = ByteMoELM(cfg)
    router_params = [q for b in model.blocks for q in b.moe.router.parameters()]
    rid = {id(q) for q in router_params}
    opt = torch.optim.AdamW([
        {"params": [q for q in model.parameters() if id(q) not in rid], "lr": lr},
        {"params": router_params, "lr": lr * router_lr_mult},   # fast router: rich get richer
    ], weight_decay=0.0)
    routers = {b.moe.router.layer_id: (b.moe.router, cfg.n_experts) for b in model.blocks}
    gov = None
    if "govern" in spec:
        gov = Governor(routers, spec["govern"], ControlConfig(actuator="+".join(spec["govern"])),
                       actuator_kwargs=spec.get("kw"))
    balancers = [RouterBiasActuator(r, l, n, rate=spec["lossfree"], pressure_scaled=False)
                 for l, (r, n) in routers.items()] if "lossfree" in spec else []
    tracker = AlertTracker()
    gen = torch.Generator().manual_seed(10_000 + seed)
    window = {l: np.zeros(cfg.n_experts, np.int64) for l in routers}
    first = {"PRE_COLLAPSE": None, "COLLAPSE_CONFIRMED": None}
    min_neff = {l: float(cfg.n_experts) for l in routers}
    curve, decisions, last_rows = [], 0, []
    t0 = time.perf_counter()
    for step in range(steps):
        model.train()
        x, y = batch(train, bs, cfg.seq_len, gen)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab), y.reshape(-1))
        total = loss
        for b in model.blocks:
            l = b.moe.router.layer_id
            alpha = spec.get("aux", 0.0) + (gov.aux_weight(l) if gov else 0.0)
            if alpha:
                total = total + alpha * b.moe.aux
            window[l] += np.bincount(b.moe.last_idx.reshape(-1).numpy(), minlength=cfg.n_experts)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        for a in balancers:
            a.on_step()
        if gov:
            gov.step()
        if (step + 1) % every == 0:
            start = step + 1 - every
            rows = layer_rows(f"{arm}-{seed}", start, step, window)
            for tr in tracker.update(rows):
                if tr["transition"] == "raised" and first[tr["alert"]] is None:
                    first[tr["alert"]] = tr["step"]
            for r in rows:
                if r["layer"] >= 0:
                    min_neff[r["layer"]] = min(min_neff[r["layer"]], r["neff"])
            if gov:
                decisions += len(gov.observe(step, rows))
            if log_curve:
                for r in rows:
                    if r["layer"] >= 0:
                        curve.append({"arm": arm, "seed": seed, "step": step, "layer": r["layer"],
                                      "neff": r["neff"], "top2": r["top2_share"], "loss": float(loss.detach())})
            last_rows = rows
            window = {l: np.zeros(cfg.n_experts, np.int64) for l in routers}
    wall = time.perf_counter() - t0
    model.eval()
    vgen = torch.Generator().manual_seed(999)
    with torch.no_grad():
        vl = [F.cross_entropy(model(xv).reshape(-1, cfg.vocab), yv.reshape(-1)).item()
              for xv, yv in (batch(val, bs, cfg.seq_len, vgen) for _ in range(eval_batches))]
    per_layer = [r for r in last_rows if r["layer"] >= 0]
    if gov:
        gov.remove()
    for a in balancers:
        a.remove()
    return {
        "arm": arm, "seed": seed,
        "final_neff": [r["neff"] for r in per_layer],
        "min_neff": [min_neff[r["layer"]] for r in per_layer],
        "final_top2": [r["top2_share"] for r in per_layer],
        "dead": [r["dead"] for r in per_layer],
        "first_pre_collapse": first["PRE_COLLAPSE"],
        "first_collapse_confirmed": first["COLLAPSE_CONFIRMED"],
        "val_loss": float(np.mean(vl)),
        "wall_s": wall, "decisions": decisions, "curve": curve,
    }


def summarise(results: list[dict], n_experts: int) -> list[dict]:
    out = []
    for arm in dict.fromkeys(r["arm"] for r in results):
        rs = [r for r in results if r["arm"] == arm]
        fin = np.array([r["final_neff"] for r in rs])
        mn = np.array([r["min_neff"] for r in rs])
        pre = [r["first_pre_collapse"] for r in rs]
        conf = [r["first_collapse_confirmed"] for r in rs]
        out.append({
            "arm": arm, "seeds": len(rs),
            "final_neff_mean": float(fin.mean()), "final_neff_min": float(fin.min()),
            "min_neff_min": float(mn.min()),
            "final_top2_mean": float(np.mean([r["final_top2"] for r in rs])),
            "dead_mean": float(np.mean([sum(r["dead"]) for r in rs])),
            "pre_collapse_runs": sum(p is not None for p in pre),
            "first_pre_collapse": min((p for p in pre if p is not None), default=None),
            "collapse_confirmed_runs": sum(c is not None for c in conf),
            "first_collapse_confirmed": min((c for c in conf if c is not None), default=None),
            "val_loss_mean": float(np.mean([r["val_loss"] for r in rs])),
            "val_loss_std": float(np.std([r["val_loss"] for r in rs])),
            "wall_s_mean": float(np.mean([r["wall_s"] for r in rs])),
            "goal_neff": bool(fin.min() >= 0.8 * n_experts),
        })
    return out


def print_summary(summary: list[dict], n: int) -> None:
    hdr = (f"{'arm':<22}{'Neff fin':>9}{'min fin':>8}{'min':>7}{'Top2':>7}{'dead':>6}"
           f"{'PRE(runs,1st)':>15}{'CONF(runs,1st)':>16}{'val loss':>15}{'wall s':>8}")
    print(hdr)
    for s in summary:
        pre = f"{s['pre_collapse_runs']},{s['first_pre_collapse']}"
        conf = f"{s['collapse_confirmed_runs']},{s['first_collapse_confirmed']}"
        print(f"{s['arm']:<22}{s['final_neff_mean']:>9.2f}{s['final_neff_min']:>8.2f}{s['min_neff_min']:>7.2f}"
              f"{s['final_top2_mean']:>7.3f}{s['dead_mean']:>6.1f}{pre:>15}{conf:>16}"
              f"{s['val_loss_mean']:>9.4f}±{s['val_loss_std']:.3f}{s['wall_s_mean']:>8.1f}")
    print(f"(Neff over {n} experts per layer; goal: >= {0.8 * n:.1f}; 'min fin' = worst layer/seed at the end, "
          f"'min' = lowest snapshot Neff seen)")


def plot(results: list[dict], path: Path, n_experts: int = 8) -> str | None:
    try:
        import altair as alt
        import polars as pl
        import vl_convert as vlc
    except ImportError as e:
        return f"plot skipped: {e}"
    rows = [c for r in results for c in r["curve"]]
    if not rows:
        return "plot skipped: no curve"
    df = pl.DataFrame(rows).group_by(["arm", "step"]).agg(pl.col("neff").mean()).sort(["arm", "step"])
    chart = alt.Chart(df.to_pandas() if hasattr(df, "to_pandas") else df).mark_line().encode(
        x=alt.X("step:Q", title="training step"),
        y=alt.Y("neff:Q", title="Neff (mean over layers and seeds)"),
        color=alt.Color("arm:N"),
    )
    goal = alt.Chart(pl.DataFrame({"goal": [0.8 * n_experts]}).to_pandas()).mark_rule(
        strokeDash=[4, 4], color="black").encode(y="goal:Q")
    chart = (chart + goal).properties(
        width=520, height=300,
        title=f"Neff per arm (byte-level MoE LM, {n_experts} experts, top-2; dashed: goal 0.8·n)")
    path.write_bytes(vlc.vegalite_to_png(chart.to_json(), scale=2))
    return str(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-size run (fewer steps, smaller batch)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma list from: {', '.join(ARMS)}")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--every", type=int, default=10, help="snapshot window in steps (default 10)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--router-lr-mult", type=float, default=10.0, help="router lr / model lr (default 10)")
    p.add_argument("--offset", type=float, default=None, help="shared offset override")
    p.add_argument("--init-std", type=float, default=None, help="router init std override")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: shared machine)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/governance[_quick].json)")
    p.add_argument("--plot-from", metavar="JSON", help="only redraw the PNG from a results JSON")
    args = p.parse_args(argv)
    if args.plot_from:
        d = json.loads(Path(args.plot_from).read_text())
        png = Path(args.plot_from).with_suffix(".png")
        print(plot([{"curve": d["curves"]}], png, d["model"]["n_experts"]))
        return 0
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad:
        p.error(f"unknown arms {bad}; choose from {', '.join(ARMS)}")
    torch.set_num_threads(args.threads)
    if args.quick:
        cfg, steps, bs, eval_batches = MoEConfig(d_model=48, d_expert=96, seq_len=48), 250, 12, 4
    else:
        cfg, steps, bs, eval_batches = MoEConfig(), 600, 16, 16
    steps = args.steps or steps
    if args.offset is not None:
        cfg.shared_offset = args.offset
    if args.init_std is not None:
        cfg.router_init_std = args.init_std
    train, val = load_text()
    from tqdm import tqdm

    results = []
    jobs = [(a, s) for a in arms for s in range(args.seeds)]
    for arm, seed in tqdm(jobs, desc="arms x seeds", file=sys.stderr):
        results.append(run_arm(arm, seed, steps, args.every, bs, cfg, args.lr, train, val,
                               eval_batches, log_curve=True, router_lr_mult=args.router_lr_mult))
    summary = summarise(results, cfg.n_experts)
    print_summary(summary, cfg.n_experts)
    load = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "governance_quick" if args.quick else "governance"
    out = Path(args.out) if args.out else RESULTS / f"{name}.json"
    png = plot(results, RESULTS / f"{name}.png", cfg.n_experts)
    out.write_text(json.dumps({
        "benchmark": "governance", "quick": args.quick, "steps": steps, "batch": bs, "every": args.every,
        "lr": args.lr, "model": cfg.__dict__, "seeds": args.seeds,
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                    "loadavg_at_end": load},
        "summary": summary,
        "runs": [{k: v for k, v in r.items() if k != "curve"} for r in results],
        "curves": [c for r in results for c in r["curve"]],
        "plot": png,
    }, indent=1))
    print(f"wrote {out}" + (f" and {png}" if png else ""))
    print(f"loadavg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
