"""Ground truth for the "exact in the field" tests, computed without probes.

Truth comes from the routers' own outputs, captured by a plain forward hook
that the test registers itself, on a forward that the situation under test
does not disturb (no checkpointing, no padding logic), counted with NumPy.
"""
from __future__ import annotations

import numpy as np
import torch

import chrono


def router_modules(model) -> list:
    """Router modules in module order: HF ``*TopKRouter`` / Switch routers and native routers."""
    out = []
    for _, m in model.named_modules():
        name = type(m).__name__
        if getattr(m, "chrono_router", False) or name.endswith("TopKRouter") \
                or name == "SwitchTransformersTop1Router":
            out.append(m)
    return out


def capture(model, fn):
    """Run ``fn()``; return, per router (module order), the list of outputs of each call.

    For top-k routers an output is ``indices [T, k]``; for Switch it is
    ``(expert index [T] or -1 where dropped)``.
    """
    got: dict[int, list] = {}

    def hook(i):
        def h(mod, args, out):
            if type(mod).__name__ == "SwitchTransformersTop1Router":
                onehot = out[0].reshape(-1, out[0].shape[-1])
                idx = torch.where(onehot.sum(-1) > 0, onehot.argmax(-1), torch.full_like(onehot[:, 0], -1))
                got.setdefault(i, []).append(idx.detach().clone()[:, None])
            else:
                got.setdefault(i, []).append(out[2].detach().reshape(out[2].shape[0] if out[2].dim() == 2
                                                                    else -1, out[2].shape[-1]).clone())
        return h

    hs = [m.register_forward_hook(hook(i)) for i, m in enumerate(router_modules(model))]
    try:
        fn()
    finally:
        for h in hs:
            h.remove()
    return got


def count(indices_list, n_experts, keep=None) -> np.ndarray:
    """Tokens per expert over captured calls; ``keep`` (optional, per call) ``[T]`` bool of tokens
    that count. Negative indices (dropped) are not counted."""
    total = np.zeros(n_experts, dtype=np.int64)
    for i, idx in enumerate(indices_list):
        x = idx.numpy()
        if keep is not None:
            x = x[np.asarray(keep[i], dtype=bool)]
        x = x[x >= 0]
        total += np.bincount(x.reshape(-1), minlength=n_experts)[:n_experts]
    return total


def stored(root, run) -> dict:
    """``{(step, mode, layer): np.array tokens per expert}`` from the store."""
    con = chrono.connect(root)
    rows = con.execute("SELECT step, mode, layer, expert, tokens FROM routing WHERE run_id = ? "
                       "ORDER BY ALL", [run]).fetchall()
    out: dict = {}
    for step, mode, layer, expert, tokens in rows:
        out.setdefault((step, mode, layer), {})[expert] = tokens
    return {k: np.array([v.get(e, 0) for e in range(max(v) + 1)]) for k, v in out.items()}


def duplicate_keys(root, run) -> int:
    con = chrono.connect(root)
    return con.execute("SELECT count(*) FROM (SELECT step, mode, layer, expert, rank, count(*) AS c "
                       "FROM routing WHERE run_id = ? GROUP BY ALL HAVING c > 1)", [run]).fetchone()[0]
