"""docs/workloads.md's Python snippet: train(...) then print(metrics.summary())."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch


def _by_hand(indices: list[torch.Tensor], n: int) -> tuple[float, float]:
    """Neff and Top2 of the experts in ``indices`` (DESIGN §4), independent of chrono.metrics."""
    counts = np.bincount(torch.cat([i.reshape(-1) for i in indices]).numpy(), minlength=n).astype(float)
    shares = counts / counts.sum()
    entropy = -sum(s * math.log(s) for s in shares if s > 1e-10)
    return math.exp(entropy), float(np.sort(shares)[-2:].sum())


def test_the_summary_reports_the_last_window_not_an_emptied_one(tmp_path):
    # Without val_batches (as in the docs' snippet) the summary's routing line read the routers'
    # window counts right after the last snapshot had zeroed them: "Neff 1.00, Top2 0.000" for
    # every layer (a zero-traffic window) while the run's last window had Neff 6.2 and 5.0 of 8.
    # It now reports the last window the routers counted, equal to counts from own hooks.
    from reference_models.corpus import byte_batches, split_bytes, text_bytes
    from reference_models.semantic_moe import TrainingConfig, train
    from reference_models.semantic_moe.model import SemanticMoELM

    seen: dict[int, list] = {}
    real_init = SemanticMoELM.__init__

    def init(self, *a, **k):   # hook the routers the moment the model exists
        real_init(self, *a, **k)
        for r in self.routers():
            r.register_forward_hook(lambda mod, args, out, layer=r.layer_id:
                                    seen.setdefault(layer, []).append(out[2].detach().clone())
                                    if torch.is_grad_enabled() else None)

    torch.set_num_threads(1)
    SemanticMoELM.__init__ = init
    try:
        data, _ = split_bytes(text_bytes())
        every, steps = 5, 10
        m = train(byte_batches(data, 32, 4, seed=0, steps=steps + 2), vocab_size=256, n_experts=4,
                  config=TrainingConfig(preset="quick", run="r", root=str(tmp_path), snapshot_every=every,
                                        calib_batches=2, lifecycle=False), steps=steps)
    finally:
        SemanticMoELM.__init__ = real_init
    f = m.final
    assert f["layers"] == sorted(seen)
    for layer, neff, top2 in zip(f["layers"], f["neff"], f["top2"]):
        assert len(seen[layer]) == steps   # one training forward per step
        want_neff, want_top2 = _by_hand(seen[layer][-every:], 4)
        assert neff == pytest.approx(want_neff, rel=1e-9) and top2 == pytest.approx(want_top2, rel=1e-9)
    assert "Neff 1.00, Top2 0.000" not in m.summary()


