"""Bias and temperature actuators on real HF transformers routers (random weights, offline).

Ground truth is computed here from the router's input and weight matrix (x @ W.T), not
from the router's or the actuator's code."""
import pytest
import torch

from chrono.actuators import ActuatorError, RouterBiasActuator, TemperatureActuator
from chrono.controller import ControlDecision

transformers = pytest.importorskip("transformers")

H, E, K = 32, 8, 2
COMMON = dict(vocab_size=64, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=48, max_position_embeddings=32)
FAMILIES = {
    # name: (config class, model class, extra config)
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=E, num_experts_per_tok=K)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=E, num_experts_per_tok=K, moe_intermediate_size=16,
                       shared_expert_intermediate_size=16, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=E, num_experts_per_tok=K, moe_intermediate_size=16, head_dim=8,
                       norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=E, num_experts_per_tok=K,
                                                       norm_topk_prob=False)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(n_routed_experts=E, num_experts_per_tok=K, n_group=1, topk_group=1,
                         first_k_dense_replace=0, moe_intermediate_size=16, n_shared_experts=1,
                         q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                         v_head_dim=8, routed_scaling_factor=2.5, norm_topk_prob=True,
                         num_key_value_heads=4)),
}


def build(family):
    cfg_name, model_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(**{**COMMON, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(cfg)
    routers = [m for n, m in model.named_modules() if n.endswith("mlp.gate")]
    assert len(routers) == 2
    with torch.no_grad():
        for r in routers:
            r.weight.normal_(0, 0.5)
            if family == "deepseek_v3":   # its own correction bias, non-zero like a trained one
                r.e_score_correction_bias.normal_(0, 0.1)
    return model, routers, cfg


def expected(family, cfg, router, x, bias, temperature=1.0):
    """(sorted expert ids [T, k], their gate weights [T, k]) computed from x @ W.T.

    ``bias``: the whole selection bias (DeepSeek-V3: its correction bias included)."""
    logits = (x.float() @ router.weight.detach().float().T) / temperature
    if family == "deepseek_v3":
        scores = torch.sigmoid(logits)
        idx = torch.topk(scores + bias, K, dim=-1).indices
        w = scores.gather(-1, idx)
        w = w / w.sum(-1, keepdim=True) * cfg.routed_scaling_factor
    else:
        scores = torch.softmax(logits, -1)
        idx = torch.topk(logits + bias, K, dim=-1).indices
        w = scores.gather(-1, idx)
        if family == "mixtral" or cfg.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
    return _sorted(idx, w)


def _sorted(idx, w):
    order = idx.argsort(-1)
    return idx.gather(-1, order), w.gather(-1, order)


def _hooks(m):
    return len(m._forward_hooks) + len(m._forward_pre_hooks)


def _decision(heat):
    return ControlDecision(step=1, layer=0, actuator="temperature", debt=0.0, pressure=heat, heat=heat,
                           forgetting=0.0, lens_scale=0.0, backoff=1.0, abstain=False, reason="t",
                           neff=1.0, top2_share=1.0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bias_chooses_the_biased_top_k_with_unbiased_gate_weights(family):
    model, routers, cfg = build(family)
    router = routers[0]
    x = torch.randn(256, H, generator=torch.Generator().manual_seed(1))
    before = [t.clone() for t in router(x)]
    native0 = getattr(router, "e_score_correction_bias", torch.zeros(E)).clone()
    seen = []      # a hook registered *before* the actuator (like probes): must see the biased choice
    early = router.register_forward_hook(lambda m, a, out: seen.append(out[2].clone()))
    act = RouterBiasActuator(router, 0, E, pressure_scaled=False)
    bias = torch.linspace(-0.8, 0.8, E)          # favours the last experts
    act.set_bias(bias + native0)                  # DeepSeek: the router's own tensor, absolute value
    logits, w, idx = router(x)
    ref_idx, ref_w = expected(family, cfg, router, x, bias + native0)
    got_idx, got_w = _sorted(idx, w)
    assert torch.equal(got_idx, ref_idx)
    assert torch.allclose(got_w.float(), ref_w, atol=1e-6)
    assert torch.equal(seen[-1], idx)
    changed = (_sorted(before[2], before[1])[0] != got_idx).any(-1).float().mean()
    assert changed > 0.1                          # the bias really moved tokens (test not vacuous)
    assert torch.equal(logits, before[0])         # logits are untouched
    early.remove()
    act.remove()
    after = router(x)
    assert all(torch.equal(a, b) for a, b in zip(after, before))   # removed: exactly as found
    assert _hooks(router) == 0
    if family == "deepseek_v3":
        assert torch.equal(router.e_score_correction_bias, native0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bias_gate_weights_are_not_the_biased_scores(family):
    """The weights equal the unbiased scores, which differ from the scores of biased logits."""
    model, routers, cfg = build(family)
    router = routers[1]
    x = torch.randn(128, H, generator=torch.Generator().manual_seed(2))
    act = RouterBiasActuator(router, 1, E, pressure_scaled=False)
    bias = torch.linspace(1.0, -1.0, E)
    act.set_bias(bias + getattr(router, "e_score_correction_bias", torch.zeros(E)))
    _, w, idx = router(x)
    logits = x @ router.weight.detach().T
    biased = (torch.sigmoid(logits) + bias) if family == "deepseek_v3" else torch.softmax(logits + bias, -1)
    # (renormalised like the family does, so only the bias can make them differ)
    assert not torch.allclose(w.float(), biased.gather(-1, idx) * (w.sum(-1, keepdim=True) /
                                                                  biased.gather(-1, idx).sum(-1, keepdim=True)))
    act.remove()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_temperature_hook_divides_the_logits(family):
    model, routers, cfg = build(family)
    router = routers[0]
    x = torch.randn(64, H, generator=torch.Generator().manual_seed(3))
    before = [t.clone() for t in router(x)]
    act = TemperatureActuator(router, 0, t_max=3.0)
    act.act(_decision(0.5))                       # T = 1 + 2·0.5 = 2
    assert act.last_value == 2.0
    logits, w, idx = router(x)
    own = getattr(router, "e_score_correction_bias", torch.zeros(E))
    ref_idx, ref_w = expected(family, cfg, router, x, own.detach().clone(), temperature=2.0)
    got_idx, got_w = _sorted(idx, w)
    assert torch.equal(got_idx, ref_idx)
    assert torch.allclose(got_w.float(), ref_w, atol=1e-6)
    assert torch.allclose(logits.float(), before[0].float() / 2, atol=1e-6)
    if family != "deepseek_v3":                   # a softmax top-k keeps its order under temperature
        assert torch.equal(_sorted(idx, w)[0], _sorted(before[2], before[1])[0])
    act.remove()
    assert all(torch.equal(a, b) for a, b in zip(router(x), before)) and _hooks(router) == 0


def test_bias_and_temperature_inside_a_whole_model_forward_and_backward():
    """Both actuators on every router of a Qwen3-MoE: forward/backward run, gradients reach the routers."""
    model, routers, cfg = build("qwen3_moe")
    acts = [a for i, r in enumerate(routers) for a in (RouterBiasActuator(r, i, E, pressure_scaled=False),
                                                       TemperatureActuator(r, i))]
    for a in acts:
        if isinstance(a, RouterBiasActuator):
            a.set_bias(torch.linspace(-1, 1, E))
        else:
            a.act(_decision(1.0))
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(4))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in routers)
    for a in acts:
        a.remove()
    assert all(_hooks(r) == 0 for r in routers)


def test_unsupported_routers_raise_a_clear_error():
    lin = torch.nn.Linear(H, E)
    with pytest.raises(ActuatorError, match="Linear.*selection_bias"):
        RouterBiasActuator(lin, 0, E)
    with pytest.raises(ActuatorError, match="temperature"):
        TemperatureActuator(lin, 0)
    assert _hooks(lin) == 0
