"""Probe overhead next to the anchors: chrono vs SGLang-style, bincount floor, HF router logits, JSON.

All recorders are attached to one HF Mixtral model (random weights, from a config) in one
process; only one arm is active per timed step and the arm order rotates every round, so
load drift hits every arm alike. Shapes: ``small`` (hidden 128, FFN 256) and
``mixtral_like`` (hidden 512, FFN 1024), both 4 layers x 8 experts, top-2, batch 8 x 128
tokens (``mixtral_like``: 8 x 64 by default, to bound its CPU time); modes ``train``
(forward + backward + SGD) and ``infer`` (forward under ``torch.inference_mode``). Arms:

* ``none_a`` / ``none_b``  nothing active: two identical arms, the A/A control (the noise)
* ``chrono_aggregate``     ``probes.attach(tokens=0)``, the default
* ``chrono_tokens_1pct``   ``probes.attach(tokens=0.01)``
* ``sglang_style``         the idea of SGLang's expert-distribution recorder in stat mode
  (python/sglang/srt/eplb/expert_distribution.py, re-implemented here): mask ids == -1,
  ``scatter_add_`` into a fixed int32 ``[layers, experts]`` device buffer, one buffer row per
  step kept on the device
* ``bincount_floor``       ``buf[layer] += torch.bincount(ids, minlength=E)``: the least work
  (it syncs with the host on CUDA, so it is a floor, not a design)
* ``hf_router_logits``     ``model(..., output_router_logits=True)``, then top-k of the returned
  logits recomputed and counted (what a user without hooks does; the capture inside
  transformers is not in the bracket, only the recompute is; in training the router aux loss
  is part of the loss, as transformers computes it)
* ``naive_json``           indices to the host and one JSON line per (token, k) event

In-hook time is thread CPU time inside the router hooks *and* the forward pre-hooks and
forward hooks of the model and its decoder stack (where a recorder does its once-per-forward
work: chrono counts the router calls it staged when the top-level forward ends), measured
for every arm by the same ``HookBracket`` (``benchmarks/hook_cpu_time.py``); for
``hf_router_logits`` it is the thread CPU time of the recompute after the forward
(``router_hooks_net_ms``: the router hooks alone; ``model_hooks_net_us``: each model or stack
pre-hook / forward hook, by module class). ``net`` subtracts the median of ``none_a``
(the inactive hooks every step runs). Ratios are net in-hook time over the ``sglang_style``
arm and over the ``bincount_floor`` arm. Step time is wall time of the whole step (median).
With ``--base REF`` (e.g. ``main``) one more arm, ``chrono_base``, is ``probes.attach`` of the
``probes`` package as it is at git ref ``REF`` (extracted with ``git archive`` and imported as
``probes_base``, next to this tree's ``chrono``): old and new probes interleaved in one
process, measured by the same bracket. Before timing, one forward with *every* arm active
checks that every arm's counts equal the floor's. Each (shape, mode) cell is cached under ``--cache`` (resumable). Writes
``benchmarks/results/probe_overhead.json``.

usage: nice -n 10 python benchmarks/probe_overhead.py [--quick] [--rounds 14] [--shapes small mixtral_like]
       [--base main]
"""
from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import chrono  # noqa: E402
import probes  # noqa: E402
from benchmarks._common import cached, fmt, uptime, write_json  # noqa: E402
from benchmarks.hook_cpu_time import CLOCK, HookBracket  # noqa: E402

SHAPES = {"small": {"hidden": 128, "ffn": 256}, "mixtral_like": {"hidden": 512, "ffn": 1024}}
# default (seq, rounds) per shape: a Mixtral-like training step of 8 x 128 tokens costs ~3.5 s of
# CPU here, so that shape runs 8 x 64 tokens and 10 rounds unless --seq / --rounds say otherwise
DEFAULTS = {"small": (128, 14), "mixtral_like": (64, 10)}
LAYERS, EXPERTS, TOP_K, VOCAB = 4, 8, 2, 1024   # LAYERS: the default depth (--layers)
ARMS = ["none_a", "none_b", "chrono_aggregate", "chrono_tokens_1pct", "sglang_style",
        "bincount_floor", "hf_router_logits", "naive_json"]


def build(hidden: int, ffn: int, layers: int = LAYERS):
    from transformers import MixtralConfig, MixtralForCausalLM
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                        num_attention_heads=8, num_key_value_heads=2, num_local_experts=EXPERTS,
                        num_experts_per_tok=TOP_K, max_position_embeddings=512)
    torch.manual_seed(0)
    return MixtralForCausalLM(cfg)


def routers(model):
    return [m for m in model.modules() if type(m).__name__ == "MixtralTopKRouter"]


class Arm:
    """A recorder with an on/off switch. ``counts()``: its ``[layer, expert]`` totals so far."""

    forward_kwargs: dict = {}
    post_seconds = 0.0       # thread CPU time of work after the forward (hf_router_logits)

    def __init__(self):
        self.active = False

    def after_forward(self, out) -> None:
        pass

    def end_step(self) -> None:
        pass

    def counts(self):
        return None

    def close(self) -> None:
        pass


class HookArm(Arm):
    """Base for the arms that count in a router forward hook; ``_count(layer, idx)`` does the work."""

    def __init__(self, model):
        super().__init__()
        self.handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(routers(model))]

    def _hook(self, layer):
        def hook(module, args, out):
            if self.active:
                self._count(layer, out[2].detach())
            return None
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


class SGLangStyle(HookArm):
    """Masked ``scatter_add_`` into a fixed int32 [layers, experts] buffer; per step, the buffer
    is appended to a device ring of steps and zeroed (SGLang's stat-mode idea, our code)."""

    def __init__(self, model, ring=64, device="cpu"):
        super().__init__(model)
        layers = len(self.handles)
        self.buf = torch.zeros(layers, EXPERTS, dtype=torch.int32, device=device)
        self.ring = torch.zeros(ring, layers, EXPERTS, dtype=torch.int32, device=device)
        self.n = 0
        self.total = torch.zeros(layers, EXPERTS, dtype=torch.int64, device=device)

    def _count(self, layer, idx):
        ids = idx.reshape(-1)
        valid = ids != -1
        self.buf[layer].scatter_add_(0, ids.masked_fill(~valid, 0).long(), valid.int())

    def end_step(self):
        self.ring[self.n % len(self.ring)].copy_(self.buf)
        self.total += self.buf
        self.buf.zero_()
        self.n += 1

    def counts(self):
        return (self.total + self.buf).cpu().numpy()


class BincountFloor(HookArm):
    def __init__(self, model, device="cpu"):
        super().__init__(model)
        self.buf = torch.zeros(len(self.handles), EXPERTS, dtype=torch.int64, device=device)

    def _count(self, layer, idx):
        self.buf[layer] += torch.bincount(idx.reshape(-1), minlength=EXPERTS)

    def counts(self):
        return self.buf.cpu().numpy()


class NaiveJson(HookArm):
    """What people write first: indices and weights to the host, one JSON line per (token, k)."""

    def __init__(self, model, path):
        super().__init__(model)
        self.f = open(path, "w")
        self.step = 0
        self.buf = np.zeros((len(self.handles), EXPERTS), dtype=np.int64)
        self.handles = [r.register_forward_hook(self._json_hook(i)) for i, r in enumerate(routers(model))]
        # (replaces HookArm's handles: this arm needs the weights too)

    def _hook(self, layer):
        return lambda module, args, out: None

    def _json_hook(self, layer):
        def hook(module, args, out):
            if not self.active:
                return None
            idx = out[2].detach().cpu()
            w = out[1].detach().float().cpu()
            for t, (row, wrow) in enumerate(zip(idx.tolist(), w.tolist())):
                for k, (e, wt) in enumerate(zip(row, wrow)):
                    self.f.write(json.dumps({"step": self.step, "layer": layer, "token": t, "k": k,
                                             "expert": e, "weight": wt}) + "\n")
                    self.buf[layer, e] += 1
            return None
        return hook

    def end_step(self):
        self.step += 1

    def counts(self):
        return self.buf

    def close(self):
        super().close()
        self.f.close()


class HFRouterLogits(Arm):
    """``output_router_logits=True``; top-k of each returned ``[T, E]`` logits, counted."""

    forward_kwargs = {"output_router_logits": True}

    def __init__(self, layers, device="cpu"):
        super().__init__()
        self.buf = torch.zeros(layers, EXPERTS, dtype=torch.int64, device=device)

    def after_forward(self, out):
        t0 = CLOCK()
        for layer, logits in enumerate(out.router_logits):
            idx = torch.topk(logits.detach().float().softmax(-1), TOP_K, dim=-1).indices
            self.buf[layer] += torch.bincount(idx.reshape(-1), minlength=EXPERTS)
        self.post_seconds += CLOCK() - t0

    def counts(self):
        return self.buf.cpu().numpy()


def base_probes(ref: str):
    """The ``probes`` package at git ref ``ref``, imported as ``probes_base`` (a temp copy)."""
    tar = subprocess.run(["git", "-C", str(HERE.parent), "archive", ref, "probes"], check=True,
                         capture_output=True).stdout
    tmp = Path(tempfile.mkdtemp(prefix="probes_base_"))
    tarfile.open(fileobj=io.BytesIO(tar)).extractall(tmp)
    (tmp / "probes").rename(tmp / "probes_base")
    sys.path.insert(0, str(tmp))
    return importlib.import_module("probes_base")


class ChronoArm(Arm):
    """``probes.attach``; inactive steps switch the handle off (its hooks return at once).
    ``package``: the probes package (default this tree's; ``base_probes(ref)`` for ``--base``)."""

    def __init__(self, model, root, run, tokens, package=None):
        super().__init__()
        self.root, self.run = root, run
        self.layers = len(routers(model))
        self.h = (package or probes).attach(model, run=run, root=root, tokens=tokens, flush_every=50, steps="manual")
        self.h._active = False
        self.step_seconds = []

    @property
    def active(self):
        return getattr(self, "h", None) is not None and self.h._active

    @active.setter
    def active(self, on):
        if getattr(self, "h", None) is not None:
            self.h._active = on

    def end_step(self):
        t0 = time.perf_counter()
        self.h.step()
        self.step_seconds.append(time.perf_counter() - t0)

    def close(self):
        self.h._active = True
        self.h.detach()

    def stored_counts(self, step):
        con = chrono.connect(self.root)
        out = np.zeros((self.layers, EXPERTS), dtype=np.int64)
        for layer, e, n in con.execute("SELECT layer, expert, sum(tokens) FROM routing WHERE run_id = ? "
                                       "AND step = ? GROUP BY ALL", [self.run, step]).fetchall():
            out[layer, e] = n
        return out


def run_cell(shape: str, mode: str, rounds: int, warmup: int, batch: int, seq: int, device="cpu",
             base=None, layers: int = LAYERS) -> dict:
    """One (shape, mode): the correctness forward, then ``rounds`` interleaved rounds of all arms.

    On CUDA, step times include a ``torch.cuda.synchronize()`` at the end of each step; in-hook
    time is then the host time of the hooks (kernel launches), which is what blocks the
    training thread."""
    device = torch.device(device)
    model = build(**SHAPES[shape], layers=layers).to(device)
    model.train(mode == "train")
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tmp = tempfile.mkdtemp(prefix="probe_overhead_")
    bracket = HookBracket(routers(model), [model, model.model])
    arms = {"none_a": Arm(), "none_b": Arm(),
            "chrono_aggregate": ChronoArm(model, tmp, "aggregate", 0.0),
            "chrono_tokens_1pct": ChronoArm(model, tmp, "tokens", 0.01),
            "sglang_style": SGLangStyle(model, device=device), "bincount_floor": BincountFloor(model, device),
            "hf_router_logits": HFRouterLogits(layers, device), "naive_json": NaiveJson(model, os.path.join(tmp, "ev.jsonl"))}
    names = list(ARMS)
    if base is not None:
        arms["chrono_base"] = ChronoArm(model, tmp, "base", 0.0, package=base_probes(base))
        names.append("chrono_base")
    bracket.close()

    def forward(kwargs):
        if mode == "train":
            out = model(input_ids=ids, labels=ids, **kwargs)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return out
        with torch.inference_mode():
            return model(input_ids=ids, **kwargs)

    # correctness: one step with every arm active; each arm counts the same router outputs
    for a in arms.values():
        a.active = True
    out = forward({"output_router_logits": True})
    for a in arms.values():
        a.after_forward(out)
        a.end_step()
        a.active = False
    floor = arms["bincount_floor"].counts().copy()
    check = {}
    for n, a in arms.items():
        got = a.counts()
        if got is not None:
            check[n] = bool(np.array_equal(got, floor))
    check["floor_tokens"] = int(floor.sum())

    def one_step(name):
        a = arms[name]
        a.active = True
        sync()
        b0, r0, p0, c0 = bracket.seconds, bracket.router_seconds, a.post_seconds, CLOCK()
        h0 = dict(bracket.per_hook)
        t0 = time.perf_counter()
        out = forward(a.forward_kwargs)
        a.after_forward(out)
        a.end_step()
        sync()
        dt = time.perf_counter() - t0
        a.active = False
        return (dt, bracket.seconds - b0 + a.post_seconds - p0, CLOCK() - c0,
                bracket.router_seconds - r0 + a.post_seconds - p0,
                {k: v - h0.get(k, 0.0) for k, v in bracket.per_hook.items()})

    load_before = os.getloadavg()
    for _ in range(warmup):
        for n in names:
            one_step(n)
    steps = {n: [] for n in names}
    hook = {n: [] for n in names}
    cpu = {n: [] for n in names}
    router = {n: [] for n in names}
    per_hook = {n: {} for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            dt, hs, c, rs, ph = one_step(n)
            steps[n].append(dt)
            hook[n].append(hs)
            cpu[n].append(c)
            router[n].append(rs)
            for k, v in ph.items():
                per_hook[n].setdefault(k, []).append(v)
    load_after = os.getloadavg()
    h_step = {n: 1e3 * statistics.median(a.step_seconds[1 + warmup:]) for n, a in arms.items()
              if isinstance(a, ChronoArm) and len(a.step_seconds) > 1 + warmup}
    for a in arms.values():
        a.close()
    bracket.remove()
    for n, a in arms.items():   # chrono's rows of the check step (step 0) are on disk after detach
        if isinstance(a, ChronoArm):
            check[n] = bool(np.array_equal(a.stored_counts(0), floor))
    base_hook = statistics.median(hook["none_a"])
    base_router = statistics.median(router["none_a"])
    base_step = statistics.median(steps["none_a"])
    res = {}
    for n in names:
        med_hook = statistics.median(hook[n])
        res[n] = {"step_ms": 1e3 * statistics.median(steps[n]),
                  "step_ratio_vs_none_a": statistics.median(steps[n]) / base_step,
                  "step_cpu_ms": 1e3 * statistics.median(cpu[n]),
                  "in_hook_ms": 1e3 * med_hook,
                  "in_hook_net_ms": 1e3 * (med_hook - base_hook),
                  "in_hook_net_pct_of_step": 100 * (med_hook - base_hook) / base_step,
                  "router_hooks_net_ms": 1e3 * (statistics.median(router[n]) - base_router),
                  "model_hooks_net_us": {k: 1e6 * (statistics.median(v) - statistics.median(per_hook["none_a"][k]))
                                         for k, v in per_hook[n].items() if per_hook["none_a"].get(k)},
                  "h_step_ms": h_step.get(n),
                  "steps_s": steps[n], "in_hook_s": hook[n]}
    for n in names:
        for ref in ("sglang_style", "bincount_floor"):
            d = res[ref]["in_hook_net_ms"]
            res[n][f"in_hook_ratio_vs_{ref}"] = res[n]["in_hook_net_ms"] / d if d > 0 else None
    return {"shape": shape, "mode": mode, "device": str(device), **SHAPES[shape], "layers": layers, "experts": EXPERTS,
            "top_k": TOP_K, "batch": batch, "seq": seq, "rounds": rounds, "warmup": warmup,
            "base_ref": base, "counts_equal_floor": check, "arms": res, "loadavg_before": load_before,
            "loadavg_after": load_after, "uptime_after": uptime()}


def table(cell: dict) -> str:
    lines = [f"\n{cell['shape']} (hidden {cell['hidden']}, {cell['layers']} layers), {cell['mode']}, batch {cell['batch']}x{cell['seq']}, "
             f"{cell['rounds']} interleaved rounds; load {cell['loadavg_before'][0]:.1f} -> "
             f"{cell['loadavg_after'][0]:.1f}; counts equal floor: "
             f"{all(v for k, v in cell['counts_equal_floor'].items() if k != 'floor_tokens')}",
             f"{'arm':<20} {'step ms':>8} {'vs none_a':>9} {'in-hook ms':>10} {'net ms':>8} {'% step':>7} "
             f"{'/sglang':>8} {'/floor':>7} {'h.step ms':>9}"]
    f = fmt
    for n, a in cell["arms"].items():
        lines.append(f"{n:<20} {a['step_ms']:8.1f} {a['step_ratio_vs_none_a']:9.3f} {a['in_hook_ms']:10.3f} "
                     f"{a['in_hook_net_ms']:8.3f} {a['in_hook_net_pct_of_step']:6.2f}% "
                     f"{f(a['in_hook_ratio_vs_sglang_style'], 8)} {f(a['in_hook_ratio_vs_bincount_floor'], 7)} "
                     f"{f(a['h_step_ms'], 9, 3)}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    p.add_argument("--rounds", type=int, default=None,
                   help="timed rounds of all arms (default 14 small, 10 mixtral_like)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--layers", nargs="+", type=int, default=[LAYERS],
                   help=f"MoE layers of the model (default {LAYERS}; e.g. --layers 4 32: 32 is Mixtral-8x7B's "
                        "depth, where the fixed cost per forward is shared by 8x the router calls)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=None, help="tokens per row (default 128 small, 64 mixtral_like)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda (benchmarks/gpu_check.py runs it)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: in-hook CPU time "
                   "is then all in the training thread)")
    p.add_argument("--quick", action="store_true",
                   help="2 rounds, 1 warm-up, batch 2x32, small shape only: checks the script and the "
                        "counts, not the target setup")
    p.add_argument("--cache", default=str(HERE / "results" / "probe_overhead_cache"),
                   help="per-(shape, mode) results; a cell found here is not rerun (delete to rerun)")
    p.add_argument("--out", default=str(HERE / "results" / "probe_overhead.json"))
    p.add_argument("--base", default=None, metavar="REF",
                   help="also time the probes package of git ref REF (arm chrono_base), interleaved")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.warmup, a.batch, a.seq, a.shapes = 2, 1, 2, 32, ["small"]
    torch.set_num_threads(a.threads)
    cells = []
    dev = "" if a.device == "cpu" else "_" + a.device
    tag = "" if a.base is None else f"_base-{a.base}"
    for layers in a.layers:
        depth = "" if layers == LAYERS else f"_L{layers}"
        for shape in a.shapes:
            seq, rounds = a.seq or DEFAULTS[shape][0], a.rounds or DEFAULTS[shape][1]
            for mode in a.modes:
                path = Path(a.cache) / f"{shape}_{mode}_{a.batch}x{seq}_r{rounds}{dev}{tag}{depth}.json"
                cell = cached(path, lambda: run_cell(shape, mode, rounds, a.warmup, a.batch, seq, a.device,
                                                     a.base, layers), use_cache=not a.quick)
                print(table(cell), flush=True)
                cells.append(cell)
    return write_json(a.out, "probe_overhead", {"cells": cells}, quick=a.quick,
                      in_hook_clock="time.thread_time (thread CPU time), HookBracket")


if __name__ == "__main__":
    main()
