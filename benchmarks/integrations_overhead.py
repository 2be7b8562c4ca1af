"""Overhead of chrono's transformers.Trainer callback per optimizer step (CPU), arms interleaved.

Model: transformers Mixtral, 2 layers, hidden 128, 8 experts, top-2, random
weights; batch 4 x 64 tokens, gradient_accumulation_steps=2, logging every 5
steps, AdamW. Each run is a fresh ``Trainer(...).train()`` of ``--steps``
optimizer steps; arms rotate every repetition so drift hits every arm alike:

* ``none_a`` / ``none_b``  no chrono (two copies: the A/A control shows the noise)
* ``probes_only``          the probes' own cost inside a Trainer: a 6-line callback that
                           attaches (steps="manual"), calls ``h.step(next_step=...)`` per update
                           and detaches; no health in the logs
* ``chrono_callback``      ``ChronoCallback()`` (health added to the logs at logging steps)

Measured per optimizer step: the median wall time between consecutive
``on_step_end`` events (steps after the first 3), and, directly, the time spent
inside ChronoCallback's own event methods (``callback_s``: on_step_begin,
on_step_end, on_log; the probes' router hooks are counted separately as
``hook_s`` from ``Handle.stats()``). The goal (issue 16): callback cost <= probes
cost + one dict update. Results: benchmarks/results/integrations_overhead.json;
finished runs are cached in integrations_overhead.partial.json (resumable).

    nice -n 10 python benchmarks/integrations_overhead.py [--steps 40 --reps 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import RESULTS, write_result  # noqa: E402

ARMS = ("none_a", "probes_only", "chrono_callback", "none_b")
PARTIAL = RESULTS / "integrations_overhead.partial.json"


def build():
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                        num_experts_per_tok=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return MixtralForCausalLM(cfg)


class Data(torch.utils.data.Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 512, (n, 64), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _timed(cls, names):
    """Subclass of ``cls`` whose event methods add their wall time to ``self.seconds[name]``."""
    def wrap(name):
        base = getattr(cls, name)

        def f(self, *a, **k):
            t0 = time.perf_counter()
            try:
                return base(self, *a, **k)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        return f

    def on_train_end(self, args, state, control, **kw):
        self.stats = self.handle.stats()
        cls.on_train_end(self, args, state, control, **kw)

    ns = {n: wrap(n) for n in names}
    ns["on_train_end"] = on_train_end
    return type(f"Timed{cls.__name__}", (cls,), ns)


def make_callbacks(arm, root):
    from transformers import TrainerCallback

    import probes
    from chrono.integrations.transformers import ChronoCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter())

    class ProbesOnly(TrainerCallback):
        """The least a user could write by hand: attach, end steps at the Trainer's global step."""

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.handle = probes.attach(model, run="p", root=root, flush_every=5, start_step=1,
                                        steps="manual")

        def on_step_begin(self, args, state, control, **kw):
            if self.handle.current_step <= state.global_step:
                self.handle.step(next_step=state.global_step + 1)

        def on_train_end(self, args, state, control, **kw):
            self.handle.detach()

    events = ("on_step_begin", "on_step_end", "on_log")
    clock = StepClock()
    if arm == "probes_only":
        extra = _timed(ProbesOnly, events)()
    elif arm == "chrono_callback":
        extra = _timed(ChronoCallback, events)(root=root, flush_every=5)
    else:
        extra = None
    if extra is not None:
        extra.seconds = {}
    return clock, extra


def one_run(arm, steps):
    from transformers import Trainer, TrainingArguments

    with tempfile.TemporaryDirectory() as tmp:
        clock, extra = make_callbacks(arm, os.path.join(tmp, "store"))
        args = TrainingArguments(output_dir=os.path.join(tmp, "out"), max_steps=steps,
                                 per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                 logging_steps=5, save_strategy="no", eval_strategy="no",
                                 report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
        cbs = [clock] + ([extra] if extra is not None else [])
        Trainer(model=build(), args=args, train_dataset=Data(steps * 8), callbacks=cbs).train()
        dts = [b - a for a, b in zip(clock.times[3:], clock.times[4:])]
        out = {"step_s": statistics.median(dts), "steps_timed": len(dts)}
        if extra is not None:
            out["hook_s"] = extra.stats["hook_seconds"] / steps
            out["events_s"] = {k: v / steps for k, v in extra.seconds.items()}
        return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    done = json.loads(PARTIAL.read_text()) if PARTIAL.exists() else {}
    load_before = os.getloadavg()[0]
    for rep in range(a.reps):
        order = ARMS[rep % len(ARMS):] + ARMS[:rep % len(ARMS)]
        for arm in order:
            key = f"{arm}/{rep}/{a.steps}"
            if key in done:
                continue
            done[key] = one_run(arm, a.steps)
            print(key, done[key], flush=True)
            PARTIAL.parent.mkdir(parents=True, exist_ok=True)
            PARTIAL.write_text(json.dumps(done, indent=1))
    runs = {arm: [done[f"{arm}/{r}/{a.steps}"] for r in range(a.reps)] for arm in ARMS}
    med = {arm: statistics.median(r["step_s"] for r in rs) for arm, rs in runs.items()}
    base = (med["none_a"] + med["none_b"]) / 2
    def per_step_ms(arm, f):
        return round(statistics.median(f(r) for r in runs[arm]) * 1e3, 4)

    summary = {
        "step_ms": {arm: round(v * 1e3, 3) for arm, v in med.items()},
        "ratio_vs_none": {arm: round(v / base, 4) for arm, v in med.items()},
        "aa_control_ratio": round(med["none_b"] / med["none_a"], 4),
        # inside the router hooks (probes), per optimizer step
        "router_hooks_ms": {arm: per_step_ms(arm, lambda r: r["hook_s"])
                            for arm in ("probes_only", "chrono_callback")},
        # inside the callbacks' event methods (h.step() with its flushes included), per optimizer step
        "callback_events_ms": {arm: per_step_ms(arm, lambda r: sum(r["events_s"].values()))
                               for arm in ("probes_only", "chrono_callback")},
        "chrono_on_log_ms": per_step_ms("chrono_callback", lambda r: r["events_s"].get("on_log", 0.0)),
    }
    summary["chrono_minus_probes_only_ms"] = round(
        summary["callback_events_ms"]["chrono_callback"] - summary["callback_events_ms"]["probes_only"], 4)
    path = write_result("integrations_overhead", {
        "config": {"model": "Mixtral 2 layers, hidden 128, 8 experts, top-2", "batch": "4 x 64",
                   "gradient_accumulation_steps": 2, "logging_steps": 5, "flush_every": 5,
                   "steps_per_run": a.steps, "reps": a.reps, "torch_threads": 1},
        "load_avg_1m_before": load_before, "load_avg_1m_after": os.getloadavg()[0],
        "summary": summary, "runs": runs})
    PARTIAL.unlink(missing_ok=True)
    print(json.dumps(summary, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
