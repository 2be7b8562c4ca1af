"""Tiny random-weight Qwen3-MoE, fixed-length token data and an independent routing truth recorder."""
from __future__ import annotations

from collections import Counter

import numpy as np
import torch

VOCAB, SEQ, LAYERS, EXPERTS, TOP_K = 61, 12, 2, 6, 2


def qwen3_moe(seed: int = 0):
    import transformers

    cfg = transformers.Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                                      max_position_embeddings=64, num_experts=EXPERTS,
                                      num_experts_per_tok=TOP_K, moe_intermediate_size=24, head_dim=8)
    torch.manual_seed(seed)
    return transformers.Qwen3MoeForCausalLM(cfg)


class TokenData(torch.utils.data.Dataset):
    """``n`` random sequences (no padding): dicts of input_ids and labels, as the Trainer wants."""

    def __init__(self, n: int, seed: int = 0):
        g = np.random.default_rng(seed)
        self.ids = torch.tensor(g.integers(0, VOCAB, size=(n, SEQ)), dtype=torch.long)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class RouterTruth:
    """Counts experts chosen by every router call, keyed by a step the caller supplies.

    Hooks the routers directly (``Qwen3MoeTopKRouter`` returns logits, weights,
    indices) and reads the indices they return; nothing of chrono is used.
    ``key()`` is called at each router call and returns ``(step, mode)``.
    """

    def __init__(self, model, key):
        self.counts: Counter = Counter()   # (step, mode, layer, expert) -> assignments
        self.calls: Counter = Counter()    # (step, mode) -> router calls of layer 0
        self._hooks = []
        layer = 0
        for name, mod in model.named_modules():
            if type(mod).__name__ == "Qwen3MoeTopKRouter":
                self._hooks.append(mod.register_forward_hook(self._hook(layer, key)))
                layer += 1
        assert layer == LAYERS

    def _hook(self, layer, key):
        def hook(module, args, output):
            step, mode = key(module)
            idx = output[2].reshape(-1).tolist()
            for e, n in Counter(idx).items():
                self.counts[(step, mode, layer, e)] += n
            if layer == 0:
                self.calls[(step, mode)] += 1
        return hook

    def remove(self):
        for h in self._hooks:
            h.remove()


def stored_counts(root, run, rank=None) -> Counter:
    """``(step, mode, layer, expert) -> tokens`` stored for the run (one rank, or all ranks summed)."""
    import chrono

    con = chrono.connect(root)
    where = "run_id = ?" + ("" if rank is None else " AND rank = ?")
    rows = con.execute(f"SELECT step, mode, layer, expert, sum(tokens), count(*) FROM routing "
                       f"WHERE {where} GROUP BY ALL", [run] + ([] if rank is None else [rank])).fetchall()
    assert all(r[5] == 1 for r in rows), "a (step, mode, layer, expert) key stored twice"
    return Counter({(s, m, l, e): int(t) for s, m, l, e, t, _ in rows if t})


def tensorboard_scalars(logdir):
    """EventAccumulator over the one event file under ``logdir`` (any depth), loaded."""
    import glob

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(str(logdir / "**" / "events.out.tfevents.*"), recursive=True)
    assert len(files) == 1, files
    ea = EventAccumulator(files[0])
    ea.Reload()
    return ea


def assert_health_tags(ea, prefix=""):
    """The documented health names (chrono.integrations.health) are all in the event file."""
    tags = set(ea.Tags()["scalars"])
    expected = {f"{prefix}chrono/{m}/layer_{layer}" for layer in range(LAYERS)
                for m in ("neff", "top2_share", "dead")}
    expected |= {f"{prefix}chrono/{n}" for n in ("neff/min", "dead/total", "alerts/active",
                                                 "alerts/PRE_COLLAPSE", "alerts/COLLAPSE_CONFIRMED")}
    assert expected <= tags, expected - tags
