"""Overhead of probes on a Mixtral-like training step (CPU), arms interleaved in one process.

Model: transformers Mixtral, 4 layers, hidden 512, 8 experts, top-2, random
weights; batch 8 x 256 tokens; step = forward + backward + SGD update.
Arms (all attached once to the same model, only one active per timed step,
order rotated every repetition so drift hits every arm alike):

* none_a / none_b  no instrumentation active (two copies: the A/A control shows the noise)
* aggregate        probes.attach(tokens=0)        (the default)
* tokens_1pct      probes.attach(tokens=0.01)
* naive_dict       forward hook: indices .cpu() + Python dict update per call
* naive_json       naive_dict + one JSON line per (token, k) event written to a file

Inactive arms' hooks still run but return at once (about a microsecond per
router call). Besides the median step time we measure the time spent inside
the hooks directly (DESIGN §5: step-level noise here is larger than the
effect), and the flush cost per window. Writes benchmarks/results/probe_overhead.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import probes  # noqa: E402


def build(args):
    from transformers import MixtralConfig, MixtralForCausalLM
    cfg = MixtralConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=args.ffn,
                        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2,
                        num_local_experts=args.experts, num_experts_per_tok=2, max_position_embeddings=512)
    torch.manual_seed(0)
    return MixtralForCausalLM(cfg)


class NaiveHook:
    """What people write first: copy indices to the host and count in a Python dict."""

    def __init__(self, model, json_path=None):
        self.active = False
        self.counts = Counter()
        self.seconds = 0.0
        self.f = open(json_path, "w") if json_path else None
        self.handles = []
        self.step = 0
        for name, mod in model.named_modules():
            if type(mod).__name__ == "MixtralTopKRouter":
                layer = int(name.split(".")[2])
                self.handles.append(mod.register_forward_hook(self._hook(layer)))

    def _hook(self, layer):
        def hook(module, args, out):
            if not self.active:
                return None
            t0 = time.perf_counter()
            idx = out[2].detach().cpu()
            w = out[1].detach().float().cpu()
            for e, c in zip(*torch.unique(idx, return_counts=True)):
                self.counts[(self.step, layer, int(e))] += int(c)
            if self.f is not None:
                for t, (row, wrow) in enumerate(zip(idx.tolist(), w.tolist())):
                    for k, (e, wt) in enumerate(zip(row, wrow)):
                        self.f.write(json.dumps({"step": self.step, "layer": layer, "token": t, "k": k,
                                                 "expert": e, "weight": wt}) + "\n")
            self.seconds += time.perf_counter() - t0
            return None
        return hook

    def set_active(self, on):
        self.active = on

    def end_step(self):
        self.step += 1

    def close(self):
        for h in self.handles:
            h.remove()
        if self.f:
            self.f.close()


class ProbeArm:
    def __init__(self, model, root, run, tokens):
        self.h = probes.attach(model, run=run, root=root, tokens=tokens, flush_every=50, auto_step=False)
        self.h._active = False
        self.flush_seconds = []

    @property
    def seconds(self):
        return self.h.stats()["hook_seconds"]

    def set_active(self, on):
        self.h._active = on

    def end_step(self):
        before = self.h.stats()["windows"]
        t0 = time.perf_counter()
        self.h.step()
        if self.h.stats()["windows"] != before:
            self.flush_seconds.append(time.perf_counter() - t0)

    def close(self):
        self.h._active = True
        self.h.detach()


class NoArm:
    seconds = 0.0

    def set_active(self, on):
        pass

    def end_step(self):
        pass

    def close(self):
        pass


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=30, help="timed steps per arm (default 30)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds of all arms first")
    p.add_argument("--quick", action="store_true",
                   help="3 reps, 1 warmup, batch 8x64: only checks the script works (not the target setup)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "probe_overhead.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.warmup, args.seq = 3, 1, 64
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 1024, (args.batch, args.seq), generator=g)
    tmp = tempfile.mkdtemp(prefix="probe_overhead_")
    arms = {
        "none_a": NoArm(), "none_b": NoArm(),
        "aggregate": ProbeArm(model, tmp, "aggregate", 0.0),
        "tokens_1pct": ProbeArm(model, tmp, "tokens", 0.01),
        "naive_dict": NaiveHook(model),
        "naive_json": NaiveHook(model, os.path.join(tmp, "events.jsonl")),
    }
    names = list(arms)
    times = {n: [] for n in names}

    def one_step(name):
        arm = arms[name]
        arm.set_active(True)
        t0 = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        arm.end_step()
        dt = time.perf_counter() - t0
        arm.set_active(False)
        return dt

    load_before = os.getloadavg()
    for r in range(args.warmup):
        for n in names:
            one_step(n)
    hook_s0 = {n: arms[n].seconds for n in names}
    for r in range(args.reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            times[n].append(one_step(n))
        print(f"rep {r + 1}/{args.reps}: " + " ".join(f"{n}={times[n][-1]:.3f}s" for n in names),
              flush=True)
    load_after = os.getloadavg()
    hook_per_step = {n: (arms[n].seconds - hook_s0[n]) / args.reps for n in names}
    flush = {n: statistics.median(arms[n].flush_seconds) for n in names
             if isinstance(arms[n], ProbeArm) and arms[n].flush_seconds}
    for a in arms.values():
        a.close()
    base = statistics.median(times["none_a"])
    res = {"arms": {}}
    for n in names:
        med = statistics.median(times[n])
        res["arms"][n] = {
            "median_step_s": med, "ratio_vs_none_a": med / base,
            "hook_s_per_step": hook_per_step[n],
            "hook_fraction_of_step": hook_per_step[n] / base,
            "flush_s_per_window": flush.get(n),
            "steps": times[n],
        }
    try:
        up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        up = None
    res["setup"] = {k: v for k, v in vars(args).items() if k != "out"}
    res["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                      "torch_threads": torch.get_num_threads(), "loadavg_before": load_before,
                      "loadavg_after": load_after, "uptime": up,
                      "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"\nMixtral-like {args.layers}L h{args.hidden} E{args.experts} top-2, batch {args.batch}x{args.seq}, "
          f"train step, {args.reps} interleaved reps; load {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print(f"{'arm':<12} {'median s':>9} {'ratio':>7} {'in-hook ms/step':>16} {'in-hook %':>10} {'flush ms':>9}")
    for n in names:
        a = res["arms"][n]
        fl = "" if a["flush_s_per_window"] is None else f"{a['flush_s_per_window'] * 1e3:9.1f}"
        print(f"{n:<12} {a['median_step_s']:9.3f} {a['ratio_vs_none_a']:7.3f} "
              f"{a['hook_s_per_step'] * 1e3:16.3f} {100 * a['hook_fraction_of_step']:9.3f}% {fl}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
