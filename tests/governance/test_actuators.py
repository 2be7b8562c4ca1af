import pytest
import torch

from chrono.actuators import (ActuatorError, AuxLossActuator, InformedLensActuator, LensActuator,
                              RouterBiasActuator, TemperatureActuator, router_weight)
from chrono.controller import ControlDecision


def _decision(layer=0, scale=0.5, pressure=0.3, abstain=False):
    return ControlDecision(step=200, layer=layer, actuator="x", debt=0.5, pressure=pressure,
                           heat=min(1.0, pressure), forgetting=0.02 + 0.1 * pressure, lens_scale=scale,
                           backoff=1.0, abstain=abstain, reason="t", neff=1.0, top2_share=1.0)


def _share_of_starved(router, x):
    idx = router(x)[2].reshape(-1)
    counts = torch.bincount(idx, minlength=router.n_experts).float()
    return counts, (counts == counts.min()).nonzero()[0].item()


@pytest.fixture
def skewed(tiny_model):
    torch.manual_seed(0)
    model = tiny_model(n_layers=1, d=16, n_experts=4, skew=2.0)
    x = torch.randn(512, 16) * 0.5 + torch.randn(16)
    return model.layers[0]["router"], x


def test_informed_lens_moves_routing_faithful_lens_does_not(skewed):
    router, x = skewed
    before = torch.bincount(router(x)[2].reshape(-1), minlength=4).float()
    faithful = LensActuator(router, 0)
    faithful.act(_decision(scale=0.5))
    after_faithful = torch.bincount(router(x)[2].reshape(-1), minlength=4).float()
    faithful.remove()
    informed = InformedLensActuator(router, 0, 4)
    router(x)                                   # one window of load for the counter
    informed.act(_decision(scale=0.5))
    after_informed = torch.bincount(router(x)[2].reshape(-1), minlength=4).float()
    informed.remove()
    moved = lambda a: (a - before).abs().sum().item() / 2  # noqa: E731  tokens that changed expert
    assert moved(after_faithful) <= 2               # a 1e-3 random warp: (almost) nothing moves
    assert moved(after_informed) > 50               # the informed direction moves many tokens
    assert after_informed.max() < before.max()      # ... away from the dominant expert
    restored = torch.bincount(router(x)[2].reshape(-1), minlength=4).float()
    assert torch.equal(restored, before)            # remove() takes the hooks away


def test_informed_lens_abstain_is_identity(skewed):
    router, x = skewed
    act = InformedLensActuator(router, 0, 4)
    router(x)
    act.act(_decision(scale=0.5, abstain=True))
    assert act.scale == 0.0
    assert torch.equal(router(x)[2], router(x)[2])
    act.remove()


def test_bias_actuator_raises_bias_of_underloaded_experts(skewed):
    router, x = skewed
    act = RouterBiasActuator(router, 0, 4, rate=0.01, pressure_scaled=True, pressure_ref=0.1)
    router(x)
    act.on_step()                                    # no decision yet: rate 0, bias unchanged
    assert torch.count_nonzero(router.selection_bias) == 0
    act.act(_decision(pressure=0.05))
    assert act.current_rate == pytest.approx(0.005)
    load = torch.bincount(router(x)[2].reshape(-1), minlength=4).float()
    act.on_step()
    expected = 0.005 * torch.sign(load.mean() - load)
    assert torch.allclose(router.selection_bias, expected)
    for _ in range(300):                             # repeated: routing balances
        act.act(_decision(pressure=0.5))
        router(x)
        act.on_step()
    final = torch.bincount(router(x)[2].reshape(-1), minlength=4).float()
    assert final.max() / final.sum() < load.max() / load.sum()
    act.remove()


def test_bias_actuator_needs_a_bias_tensor():
    with pytest.raises(ActuatorError, match="selection_bias"):
        RouterBiasActuator(torch.nn.Linear(4, 4), 0, 4)


def test_temperature_and_aux_follow_signals(skewed):
    router, _ = skewed
    t = TemperatureActuator(router, 0, t_max=3.0)
    t.act(_decision(pressure=0.5))
    assert router.temperature == pytest.approx(2.0)
    t.remove()
    assert router.temperature == 1.0
    a = AuxLossActuator(0, alpha_min=0.01, alpha_max=0.1, pressure_ref=0.1)
    a.act(_decision(pressure=0.05))
    assert a.alpha == pytest.approx(0.055)
    a.act(_decision(pressure=0.9))
    assert a.alpha == pytest.approx(0.1)


def test_router_weight_lookup(skewed):
    router, _ = skewed
    assert router_weight(router, 4) is router.weight
    assert router_weight(torch.nn.Sequential(torch.nn.Linear(8, 5)), 5).shape == (5, 8)
    with pytest.raises(ActuatorError):
        router_weight(torch.nn.Linear(8, 3), 5)
