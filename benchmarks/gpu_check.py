"""One-shot device check of probes on a GPU (run it whenever a GPU machine is lent; issue 19 item 6).

Checks, on a Mixtral-like HF model (random weights, from a config) on ``--device``:

1. **Host syncs**: a training step with probes attached (aggregate, and with 1 % token
   sampling) makes no host synchronisation outside window close.
   ``sync_error``: ``torch.cuda.set_sync_debug_mode("error")`` is switched on around every
   piece of probes code (the router hooks, the model's and stack's forward hooks, ``h.step()``
   that closes no window; HF's own code outside them may sync and is not ours): a sync there
   raises, which the probes count as a fault, so the check passes when faults stay 0 and the
   counts equal truth. ``host_syncs_per_step`` (``"warn"`` mode) counts a step's syncs without
   and with probes; the difference is ours.
2. **Exact counts on the device**: stored counts equal truth counted from the routers' own
   outputs, eager; with ``torch.compile`` (counts equal eager); under activation checkpointing
   with CPU offload (``offload=True`` needs pinned memory, i.e. CUDA); with a padded batch.
3. **Graph breaks**: ``torch.compile`` of each decoder layer (inductor) with probes attached,
   aggregate and 1 % tokens: ``torch._dynamo.utils.counters["graph_break"]`` must stay 0 and
   the counts (and sampled token rows) equal eager.
4. **Overhead table**: ``benchmarks/probe_overhead.py``'s cells (all anchors, in-hook host time
   and step time, train and infer) on the device, at 4 and 32 MoE layers.

Writes ``benchmarks/results/gpu_check.json``. ``--device cpu --quick`` runs every check that
does not need CUDA (the suite does this so the script cannot rot); sync checks and offload are
CUDA-only and reported as ``"skipped: cpu"``.

usage: python benchmarks/gpu_check.py [--device cuda] [--quick] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import chrono  # noqa: E402
import probes  # noqa: E402


def build(hidden: int, layers: int, device):
    from transformers import MixtralConfig, MixtralForCausalLM
    cfg = MixtralConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=2 * hidden,
                        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                        num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512)
    torch.manual_seed(0)
    return MixtralForCausalLM(cfg).to(device)


def routers(model):
    return [m for m in model.modules() if type(m).__name__ == "MixtralTopKRouter"]


def truth_counts(model, fn, keep=None) -> np.ndarray:
    """[layer, expert] counts from the routers' own outputs (a test-side hook) while ``fn`` runs."""
    got = {}

    def hook(i):
        def h(module, args, out):          # returns None: a returned value would replace the output
            got.setdefault(i, []).append(out[2].detach().clone())
        return h

    hs = [r.register_forward_hook(hook(i)) for i, r in enumerate(routers(model))]
    try:
        fn()
    finally:
        for h in hs:
            h.remove()
    out = np.zeros((len(got), 8), dtype=np.int64)
    for i, idx in got.items():
        x = torch.cat(idx).cpu().numpy()
        if keep is not None:
            x = x[keep]
        out[i] = np.bincount(x.reshape(-1), minlength=8)
    return out


def stored_counts(root, run, mode=None) -> np.ndarray:
    con = chrono.connect(root)
    q = "SELECT layer, expert, sum(tokens) FROM routing WHERE run_id = ?" + (" AND mode = ?" if mode else "")
    rows = con.execute(q + " GROUP BY ALL", [run] + ([mode] if mode else [])).fetchall()
    out = np.zeros((max((r[0] for r in rows), default=-1) + 1, 8), dtype=np.int64)
    for layer, e, n in rows:
        out[layer, e] = n
    return out


def count_syncs(fn, device) -> int | str:
    if device.type != "cuda":
        return "skipped: cpu"
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(x.message).lower() for x in w)


class SyncErrorBracket:
    """``set_sync_debug_mode("error")`` exactly while probes code runs in a forward or an optimizer step.

    Openers are registered on ``modules`` (forward pre- and post-hooks) and as global optimizer
    post-step hooks *before* ``probes.attach``, closers *after* it; hooks run in registration
    order, so only the probes' hooks run between them. ``step(h)`` runs ``h.step()`` the same way.
    """

    def __init__(self, modules, on: bool):
        from torch.optim.optimizer import register_optimizer_step_post_hook
        self.modules, self.on, self.handles = list(modules), on, []
        self._reg = register_optimizer_step_post_hook
        self._add(self._open)

    def _add(self, fn):
        for m in self.modules:
            self.handles.append(m.register_forward_pre_hook(lambda *a: fn()))
            self.handles.append(m.register_forward_hook(lambda *a: fn()))
        self.handles.append(self._reg(lambda *a: fn()))

    def _open(self):
        if self.on:
            torch.cuda.set_sync_debug_mode("error")

    def _close(self):
        if self.on:
            torch.cuda.set_sync_debug_mode("default")

    def close(self):
        """Register the closers: call right after ``probes.attach``."""
        self._add(self._close)

    def step(self, h):
        self._open()
        try:
            h.step()
        finally:
            self._close()

    def remove(self):
        self._close()
        for x in self.handles:
            x.remove()


def sync_error_check(build_model, ids, root, dev, steps=3) -> dict:
    """Training steps with probes under sync error mode around probes code (see SyncErrorBracket)."""
    if dev.type != "cuda":
        return {"aggregate": "skipped: cpu", "tokens_1pct": "skipped: cpu"}
    out = {}
    for name, tokens in (("aggregate", 0.0), ("tokens_1pct", 0.01)):
        model = build_model()
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        bracket = SyncErrorBracket([model, model.model, *routers(model)], on=True)
        faults = None
        try:
            h = probes.attach(model, run=f"sync-error-{name}", root=root, flush_every=10_000, tokens=tokens)
            bracket.close()
            try:
                want = truth_counts(model, lambda: [_train(model, opt, ids) for _ in range(steps)])
            finally:
                bracket.remove()          # window close (detach) is allowed to sync
                faults = h.stats()["faults"]
                h.detach()
            got = stored_counts(root, f"sync-error-{name}", "TRAIN")
            out[name] = {"faults": faults, "counts_equal_truth": bool((got == want).all()),
                         "passed": faults == 0 and bool((got == want).all())}
        except Exception as e:        # a sync that escaped into the step
            out[name] = {"error": f"{type(e).__name__}: {e}", "faults": faults, "passed": False}
    return out


def _train(model, opt, ids):
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def graph_break_check(build_model, ids, root, dev) -> dict:
    """Each decoder layer compiled (inductor on CUDA, the eager backend on CPU: graph breaks are
    decided by dynamo, before the backend); counts and token rows against an eager run."""
    from torch._dynamo.utils import counters
    backend = "inductor" if dev.type == "cuda" else "eager"
    out = {"backend": backend}
    for name, tokens in (("aggregate", 0.0), ("tokens_1pct", 0.01)):
        res = {}
        for variant in ("eager", "compiled"):
            model = build_model().eval()
            if variant == "compiled":
                for layer in model.model.layers:
                    layer.compile(backend=backend)
            torch._dynamo.reset()
            counters.clear()
            run = f"gb-{name}-{variant}"
            try:
                with torch.no_grad(), probes.attach(model, run=run, root=root, tokens=tokens, flush_every=2) as h:
                    for _ in range(3):
                        model(input_ids=ids)
                        h.step()
            except Exception as e:   # report, do not hide
                res["error"] = f"{type(e).__name__}: {e}"
                break
            res[f"{variant}_graph_breaks"] = sum(counters["graph_break"].values())
            res[f"{variant}_counts"] = stored_counts(root, run)
            res[f"{variant}_tokens"] = chrono.connect(root).execute(
                "SELECT step, layer, batch_idx, position, k, expert FROM tokens WHERE run_id = ? ORDER BY ALL",
                [run]).fetchall()
        if "error" not in res:
            res = {"graph_breaks": res["compiled_graph_breaks"],
                   "counts_equal_eager": bool((res["compiled_counts"] == res["eager_counts"]).all()),
                   "token_rows_equal_eager": res["compiled_tokens"] == res["eager_tokens"],
                   "token_rows": len(res["eager_tokens"])}
        out[name] = res
    return out


def overhead_table(dev, quick: bool) -> list:
    """benchmarks/probe_overhead.py's cells on this device: 4 MoE layers and, unless ``quick``, 32
    (Mixtral-8x7B's depth, where the flush's fixed cost per forward is shared by 32 calls)."""
    from benchmarks.probe_overhead import run_cell, table
    cells = []
    for layers in ([4] if quick else [4, 32]):
        for shape in (["small"] if quick else ["small", "mixtral_like"]):
            for mode in ("train", "infer"):
                cell = run_cell(shape, mode, rounds=1 if quick else 10, warmup=0 if quick else 2,
                                batch=2 if quick else 8, seq=16 if quick else 128, device=dev, layers=layers)
                print(table(cell), flush=True)
                cells.append(cell)
    return cells


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny model and few steps (the CPU dry run)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_check.json"))
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    hidden, layers, B, S, steps = (64, 2, 2, 16, 3) if a.quick else (512, 4, 8, 256, 20)
    root = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    res = {"device": str(dev), "quick": a.quick, "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
           "machine": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "shape": {"hidden": hidden, "layers": layers, "batch": B, "seq": S}, "checks": {}}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 1024, (B, S), generator=g).to(dev)

    # 1. host syncs added by probes (window close excluded: flush_every > steps)
    model = build(hidden, layers, dev)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def train_step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()

    train_step()    # warm-up (allocations, lazy init)
    base = count_syncs(train_step, dev)
    syncs = {"without_probes": base}
    for name, tokens in (("aggregate", 0.0), ("tokens_1pct", 0.01)):
        with probes.attach(model, run=f"sync-{name}", root=root, flush_every=10_000, tokens=tokens):
            train_step()
            syncs[name] = count_syncs(train_step, dev)
    if isinstance(base, int):
        syncs["added_by_probes"] = {k: syncs[k] - base for k in ("aggregate", "tokens_1pct")}
    res["checks"]["host_syncs_per_step"] = syncs
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():   # after every check: a run cut short (device time is scarce) keeps what it measured
        out.write_text(json.dumps(res, indent=2))

    res["checks"]["sync_error"] = sync_error_check(lambda: build(hidden, layers, dev), ids, root, dev)
    save()

    # 2a. eager counts == truth
    model.eval()
    with torch.no_grad(), probes.attach(model, run="eager", root=root) as h:
        want = truth_counts(model, lambda: model(input_ids=ids))
    res["checks"]["eager_counts_equal_truth"] = bool((stored_counts(root, "eager") == want).all())
    res["checks"]["eager_tokens"] = int(want.sum())

    # 2b. torch.compile counts == eager
    try:
        cm = torch.compile(model)
        with torch.no_grad(), probes.attach(model, run="compiled", root=root):
            cm(input_ids=ids)
        res["checks"]["compiled_counts_equal_eager"] = bool(
            (stored_counts(root, "compiled") == stored_counts(root, "eager")).all())
    except Exception as e:  # report, do not hide
        res["checks"]["compiled_counts_equal_eager"] = f"error: {type(e).__name__}: {e}"

    # 2c. activation checkpointing (offload needs pinned memory: CUDA only)
    for variant, kw in (("checkpoint", {}), ("checkpoint_offload", {"offload": True})):
        if kw and dev.type != "cuda":
            res["checks"][variant] = "skipped: cpu"
            continue
        m2 = build(hidden, layers, dev)
        m2.train()
        want = truth_counts(m2, lambda: m2(input_ids=ids, labels=ids))
        m2.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False}, **kw)
        with probes.attach(m2, run=variant, root=root):
            m2(input_ids=ids, labels=ids).loss.backward()
        got = stored_counts(root, variant, "TRAIN")
        res["checks"][variant] = {"counts_equal_truth": bool((got == want).all()),
                                  "tokens": int(got.sum()), "expected_tokens": int(want.sum())}

    # 2d. padding excluded on the device
    mask = torch.ones(B, S, dtype=torch.long)
    for b in range(B):
        mask[b, S - (b * S) // (2 * B):] = 0
    mask = mask.to(dev)
    keep = mask.reshape(-1).bool().cpu().numpy()
    with torch.no_grad(), probes.attach(model, run="padded", root=root):
        want = truth_counts(model, lambda: model(input_ids=ids, attention_mask=mask), keep=keep)
    got = stored_counts(root, "padded")
    res["checks"]["padding_excluded"] = {"counts_equal_truth": bool((got == want).all()),
                                         "tokens": int(got.sum()), "expected_tokens": int(want.sum())}
    save()

    # 2e. per-layer compile: zero graph breaks, counts and token rows equal eager
    res["checks"]["compiled_per_layer"] = graph_break_check(lambda: build(hidden, layers, dev), ids, root, dev)
    save()

    # 3. in-hook time per training step
    model.train()
    with probes.attach(model, run="timing", root=root, flush_every=10_000) as h:
        t0 = time.perf_counter()
        for _ in range(steps):
            train_step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps
        res["checks"]["in_hook_ms_per_step"] = 1e3 * h.stats()["hook_seconds"] / steps
        res["checks"]["step_ms"] = 1e3 * wall
    save()

    # 4. the overhead table of benchmarks/probe_overhead.py on this device
    res["overhead"] = overhead_table(dev, a.quick)
    save()
    print(json.dumps(res["checks"], indent=2))
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
