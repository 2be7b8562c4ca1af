import pytest
import torch

from chrono.lens import ChronoLens, IdentityLens


def test_scale_zero_is_exact_identity():
    lens = ChronoLens(16, rank=8, layer_id=0)
    x = torch.randn(5, 7, 16)
    assert lens(x) is x
    lens.set_scale(0.3)
    lens.set_scale(0.0)
    assert torch.equal(lens(x), x)


def test_formula_and_shapes():
    lens = ChronoLens(16, rank=8, layer_id=1)
    assert lens.V.shape == (16, 8) and lens.U.shape == (8, 16)
    assert 1e-4 < lens.V.std().item() < 1e-2   # N(0,1)·1e-3
    lens.set_scale(0.5)
    x = torch.randn(4, 16)
    expected = x + 0.5 * (x @ lens.V) @ lens.U
    assert torch.allclose(lens(x), expected)
    assert not torch.equal(lens(x), x)


def test_gradient_flows_to_input_and_lens():
    lens = ChronoLens(8, rank=2)
    lens.set_scale(0.5)
    x = torch.randn(3, 8, requires_grad=True)
    lens(x).pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert lens.U.grad is not None and lens.U.grad.abs().sum() > 0
    assert lens.V.grad is not None and lens.V.grad.abs().sum() > 0


def test_nan_scale_rejected_and_identity_lens():
    with pytest.raises(ValueError):
        ChronoLens(4).set_scale(float("nan"))
    idl = IdentityLens(layer_id=3)
    x = torch.randn(2, 4)
    idl.set_scale(0.4)
    assert idl(x) is x and idl.last_scale == 0.4


def test_deterministic_init_per_layer():
    a, b, c = ChronoLens(8, layer_id=0), ChronoLens(8, layer_id=0), ChronoLens(8, layer_id=1)
    assert torch.equal(a.U, b.U) and not torch.equal(a.U, c.U)
