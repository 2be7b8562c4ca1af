"""Astarte: ABPE equations by hand, restore bit-exactness, token order, generation, store output."""
from __future__ import annotations

import io
import math
from contextlib import redirect_stdout

import pytest
import torch

from reference_models.astarte.model import (Astarte, AstarteConfig, RollingChunks, generate,
                                            load_checkpoint, save_checkpoint)
from reference_models.corpus import pydoc_bytes
from reference_models.astarte.workload import train_chunks

TINY = dict(d_state=8, n_cycles=2, d_model=16, n_layers=2, n_heads=2, seq_len=16)


def _one_dim_model(**kw):
    cfg = AstarteConfig(d_state=1, n_cycles=1, lam=0.1, eta=0.05, zeta=0.2, null_mix_alpha=0.1,
                        omega=1.0, phi=0.5, t_start=0.3, dt=0.1, d_model=4, n_heads=1, **kw)
    m = Astarte(cfg)
    # registers: x_A=1, x_B=0.5, p_A=0.2, p_B=-0.1, x_0=0.3
    m.abpe.registers.copy_(torch.tensor([[1.0], [0.5], [0.2], [-0.1], [0.3]]))
    return m


# Hand computation (f_uA = 0.4, f_uB = 0.7, t = t_start = 0.3, sin(ωt+φ) = sin(0.8) = 0.7173561):
#   x_A' = 1 + 0.4·0.7173561 + 0.1·(0.2 − 0.5)          = 1.2569424
#   x_B' = 0.5 − 0.7·0.7173561 + 0.1·(−0.1 − (0.5 − 1)) = 0.0378507
#   p_A' = 0.2 + 0.05·(0.0378507 − 1.2569424)           = 0.1390454
#   p_B' = −0.1 + 0.05·(1.2569424 − 0.0378507)          = −0.0390454
#   x_0' = 0.3 + 0.2·(|1.2569424 − 0.0378507| − 0.3)    = 0.4838183
HAND = dict(x_a=1.2569424, x_b=0.0378507, p_a=0.1390454, p_b=-0.0390454, x0p=0.4838183)


def test_abpe_one_cycle_matches_hand_computation_without_history():
    m = _one_dim_model()
    ends, outs = m.abpe.encode(torch.tensor([[0.4, 0.7]]))
    x_a, x_b, p_a, p_b, x_0 = ends[0, :, 0].tolist()
    assert x_a == pytest.approx(HAND["x_a"], abs=1e-6)
    assert x_b == pytest.approx(HAND["x_b"], abs=1e-6)
    assert p_a == pytest.approx(HAND["p_a"], abs=1e-6)
    assert p_b == pytest.approx(HAND["p_b"], abs=1e-6)
    assert float(outs[0, 0, 0]) == pytest.approx(HAND["x0p"], abs=1e-6)
    # one null output only: max == min, its normalised mean is 0, so x_0'' = x_0' + 0.1·(0 − x_0')
    assert x_0 == pytest.approx(0.9 * HAND["x0p"], abs=1e-6)


def test_null_injection_uses_min_max_normalised_history():
    m = _one_dim_model()
    m.abpe.null_history = torch.tensor([[0.1], [0.5]])
    ends, _ = m.abpe.encode(torch.tensor([[0.4, 0.7]]))
    # rows 0.1, 0.5, 0.4838183 → normalised 0, 1, 0.9595458 → mean x̄_0 = 0.6531819
    # x_0'' = 0.4838183 + 0.1·(0.6531819 − 0.4838183) = 0.5007547
    assert float(ends[0, 4, 0]) == pytest.approx(0.5007547, abs=1e-6)


def test_time_advances_with_cycle_counter():
    m = _one_dim_model()
    m.abpe.cycle.fill_(3)
    assert m.abpe.time(0) == pytest.approx(0.3 + 3 * 0.1)
    ends, outs = m.abpe.encode(torch.tensor([[0.4, 0.7]]))
    drive = math.sin(0.6 + 0.5)
    assert float(ends[0, 0, 0]) == pytest.approx(1 + 0.4 * drive - 0.03, abs=1e-6)
    m.abpe.advance(ends, outs)
    assert int(m.abpe.cycle) == 4 and m.abpe.null_history.shape == (1, 1)


def _setup(mode="intended", seed=0):
    torch.manual_seed(seed)
    cfg = AstarteConfig(mode=mode, **TINY)
    model = Astarte(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = RollingChunks(pydoc_bytes()[:20000], cfg.seq_len, 4)
    return model, opt, data


@pytest.mark.parametrize("mode", ["intended", "faithful"])
def test_restore_then_continue_is_bit_identical(tmp_path, mode):
    probe = RollingChunks(pydoc_bytes()[20000:24000], TINY["seq_len"], 3).batch(0)[:, :-1]
    # A: never stops (pause every 4th chunk, so a pause lies on both sides of the cut)
    a, opt_a, data = _setup(mode)
    train_chunks(a, opt_a, data, 0, 3, pause_every=4)
    save_checkpoint(tmp_path / "c.pt", a, opt_a, chunk=3)
    train_chunks(a, opt_a, data, 3, 5, pause_every=4)
    # B: restored from the checkpoint in a fresh model, continues the same chunks
    b, ckpt = load_checkpoint(tmp_path / "c.pt")
    opt_b = torch.optim.AdamW(b.parameters(), lr=3e-3)
    opt_b.load_state_dict(ckpt["optimizer"])
    assert b.abpe.null_history.shape[0] == 3 * TINY["n_cycles"] + 0  # 3 chunks, no pause yet
    train_chunks(b, opt_b, data, ckpt["chunk"], 5, pause_every=4)
    a.eval(), b.eval()
    with torch.no_grad():
        la, lb = a.next_logits(probe), b.next_logits(probe)
    assert torch.equal(la, lb)
    assert torch.equal(a.abpe.null_history, b.abpe.null_history)
    assert torch.equal(a.abpe.registers, b.abpe.registers)
    # the history matters: a model with the history dropped gives different logits
    b.abpe.null_history = b.abpe.null_history[:0]
    with torch.no_grad():
        assert not torch.equal(b.next_logits(probe), la)


def test_token_order_matters_in_intended_mode_only():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, TINY["seq_len"]))
    perm = torch.randperm(TINY["seq_len"] - 1)
    xp = torch.cat([x[:, :-1][:, perm], x[:, -1:]], 1)  # same multiset, same last token
    for mode, should_differ in (("intended", True), ("faithful", False)):
        torch.manual_seed(1)
        m = Astarte(AstarteConfig(mode=mode, **TINY)).eval()
        with torch.no_grad():
            a, b = m.next_logits(x), m.next_logits(xp)
        differ = not torch.allclose(a, b, atol=1e-5)
        assert differ == should_differ, mode


def test_dreaming_and_prompted_generation_leave_state_alone():
    m, _, _ = _setup()
    reg, hist = m.abpe.registers.clone(), m.abpe.null_history.clone()
    d1 = generate(m, b"", length=20, noise_std=0.5, seed=3)
    d2 = generate(m, b"", length=20, noise_std=0.5, seed=3)
    d3 = generate(m, b"", length=20, noise_std=0.5, seed=4)
    p = generate(m, b"def f(x):", length=10, temperature=0.0)
    assert len(d1) == 20 and d1 == d2 and d1 != d3 and len(p) == 10
    assert torch.equal(m.abpe.registers, reg) and torch.equal(m.abpe.null_history, hist)


def test_quick_workload_lands_in_store_and_cli_generates(store_root):
    import chrono
    from chrono_cli.main import main
    from reference_models import registry

    run = registry.resolve("astarte")                 # what `chrono workload astarte` calls
    summary = run(mode="intended", steps=12, run="ast", seed=0, root=store_root, progress=False)
    assert "val_loss" in summary.summary() and "null_norm" in summary.summary()
    assert summary["train_chunks"] == 12 - 12 // 25 and math.isfinite(summary["val_loss"])
    con = chrono.connect(store_root)
    names = {r[0] for r in con.sql("SELECT DISTINCT name FROM signals WHERE run_id='ast'").fetchall()}
    assert {"loss", "val_loss", "astarte.null_norm", "astarte.register_norm", "astarte.drift"} <= names
    layers, tokens = con.sql("SELECT count(DISTINCT layer), sum(tokens) FROM routing "
                             "WHERE run_id='ast' AND mode='TRAIN'").fetchall()[0]
    assert layers == 2 and tokens == 12 * 8 * 32 * 2  # every token counted once per layer
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["astarte", "dream", "--run", "ast", "--root", str(store_root), "--length", "16",
                   "--noise-std", "0.3"])
    assert rc == 0 and len(buf.getvalue()) > 0
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["astarte", "generate", "--run", "ast", "--root", str(store_root), "--prompt", "class ",
                   "--length", "8"])
    assert rc == 0 and buf.getvalue().startswith("class ")
    assert main(["astarte", "dream", "--run", "nope", "--root", str(store_root)]) == 2
    assert main(["astarte", "generate", "--run", "ast", "--root", str(store_root)]) == 2  # no prompt

