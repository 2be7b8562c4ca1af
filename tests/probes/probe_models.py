"""Tiny random-weight HF MoE models built from configs (offline) for the probes tests."""
from __future__ import annotations

import torch

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)


def _build(config_cls_name, model_cls_name, **kw):
    import transformers
    cfg = getattr(transformers, config_cls_name)(**kw)
    torch.manual_seed(0)
    return getattr(transformers, model_cls_name)(cfg)


def mixtral():
    return _build("MixtralConfig", "MixtralForCausalLM", **COMMON, num_local_experts=6,
                  num_experts_per_tok=2)


def qwen2_moe():
    return _build("Qwen2MoeConfig", "Qwen2MoeForCausalLM", **COMMON, num_experts=6,
                  num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=24,
                  decoder_sparse_step=1)


def qwen3_moe():
    return _build("Qwen3MoeConfig", "Qwen3MoeForCausalLM", **COMMON, num_experts=6,
                  num_experts_per_tok=2, moe_intermediate_size=24, head_dim=8)


def olmoe():
    return _build("OlmoeConfig", "OlmoeForCausalLM", **COMMON, num_experts=6, num_experts_per_tok=2)


def deepseek_v3():
    m = _build("DeepseekV3Config", "DeepseekV3ForCausalLM", **{**COMMON, "num_hidden_layers": 3, "num_key_value_heads": 4},
               n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
               first_k_dense_replace=1, moe_intermediate_size=16, n_shared_experts=1,
               q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
               routed_scaling_factor=2.5, norm_topk_prob=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, mod in m.named_modules():
            if type(mod).__name__ == "DeepseekV3TopkRouter":
                mod.weight.normal_(0, 0.5, generator=g)
                # a large correction bias: selection then differs from a top-k over the logits
                mod.e_score_correction_bias.copy_(torch.randn(8, generator=g))
    return m


def gpt_oss():
    return _build("GptOssConfig", "GptOssForCausalLM", **COMMON, num_local_experts=6,
                  num_experts_per_tok=2, head_dim=8, layer_types=["full_attention"] * 2)


def switch_transformers():
    m = _build("SwitchTransformersConfig", "SwitchTransformersForConditionalGeneration",
               vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2,
               num_decoder_layers=2, num_experts=4, expert_capacity=3, num_sparse_encoder_layers=2,
               num_sparse_decoder_layers=2, decoder_start_token_id=0, pad_token_id=0)
    return m


def phimoe():
    return _build("PhimoeConfig", "PhimoeForCausalLM", **COMMON, num_local_experts=6,
                  num_experts_per_tok=2)


def granitemoe():
    return _build("GraniteMoeConfig", "GraniteMoeForCausalLM", **COMMON, num_local_experts=6,
                  num_experts_per_tok=2)


def jetmoe():
    c = {k: v for k, v in COMMON.items() if k not in ("num_attention_heads", "intermediate_size")}
    return _build("JetMoeConfig", "JetMoeForCausalLM", **c, num_local_experts=6,
                  num_experts_per_tok=2, kv_channels=8, intermediate_size=48)


def dbrx():
    import transformers
    cfg = transformers.DbrxConfig(vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2, max_seq_len=64,
                                  attn_config={"kv_n_heads": 2, "clip_qkv": 8.0},
                                  ffn_config={"ffn_hidden_size": 48, "moe_num_experts": 6, "moe_top_k": 2})
    # transformers 5.23 DbrxAttention reads attn_config.rope_theta, which DbrxAttentionConfig lacks
    object.__setattr__(cfg.attn_config, "rope_theta", cfg.rope_parameters["rope_theta"])
    torch.manual_seed(0)
    return transformers.DbrxForCausalLM(cfg)


def llama4():
    return _build("Llama4TextConfig", "Llama4ForCausalLM", **COMMON, num_local_experts=6,
                  num_experts_per_tok=1, intermediate_size_mlp=48, head_dim=8,
                  interleave_moe_layer_step=1, moe_layers=[0, 1], no_rope_layers=[1, 1])


def ernie4_5_moe():
    return _build("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM", **COMMON, moe_num_experts=6,
                  moe_k=2, moe_intermediate_size=24, moe_layer_start_index=0, moe_layer_interval=1,
                  moe_num_shared_experts=0)


def qwen3_next():
    return _build("Qwen3NextConfig", "Qwen3NextForCausalLM", **COMMON, num_experts=6,
                  num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=24,
                  head_dim=8, layer_types=["full_attention", "full_attention"], decoder_sparse_step=1)


FAMILIES = {f.__name__: f for f in (mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, gpt_oss,
                                    switch_transformers, phimoe, granitemoe, jetmoe, dbrx, llama4,
                                    ernie4_5_moe, qwen3_next)}


def batch(model, b=3, s=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, s), generator=g)
    if type(model).__name__.startswith("SwitchTransformers"):
        dec = torch.randint(1, VOCAB, (b, s - 3), generator=g)
        return {"input_ids": ids, "decoder_input_ids": dec}
    return {"input_ids": ids}


# ---------------------------------------------------------------- native protocol model
class NativeRouter(torch.nn.Module):
    """A router speaking the chrono native protocol (chrono_router = True)."""

    chrono_router = True

    def __init__(self, d, n_experts, top_k, layer_id=None, drop_every=0):
        super().__init__()
        self.proj = torch.nn.Linear(d, 64)  # room to grow n_experts up to 64
        self.n_experts, self.top_k, self.drop_every = n_experts, top_k, drop_every
        if layer_id is not None:
            self.layer_id = layer_id
        self.poison = False

    def forward(self, x):
        logits = self.proj(x.reshape(-1, x.shape[-1]))[:, : self.n_experts]
        if self.poison:
            logits = logits + float("nan")
        w, idx = torch.topk(logits.softmax(-1), self.top_k, dim=-1)
        if self.drop_every:
            pos = torch.arange(idx.shape[0], device=idx.device)[:, None].expand_as(idx)
            return logits, w, idx, (pos % self.drop_every) == 0
        return logits, w, idx


class NativeMoE(torch.nn.Module):
    """Embedding -> L x (router + per-expert bias "experts") -> head. Cheap enough for 10k steps."""

    def __init__(self, layers=2, d=16, n_experts=4, top_k=2, vocab=VOCAB, drop_every=0):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, d)
        self.routers = torch.nn.ModuleList(NativeRouter(d, n_experts, top_k, drop_every=drop_every)
                                           for _ in range(layers))
        self.expert_out = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(64, d) * 0.1)
                                                 for _ in range(layers))
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, input_ids):
        x = self.emb(input_ids)
        B, S, D = x.shape
        for router, table in zip(self.routers, self.expert_out):
            _, w, idx = router(x)[:3]
            x = x + (w[..., None] * table[idx]).sum(1).reshape(B, S, D)
        return self.head(x)


def tiny_workload(mode="intended", run="tiny", root="chrono_runs", seed=0, steps=None, progress=False):
    """A reference-workload-shaped entry point (``reference_models.registry``) for CLI tests."""
    steps = 3 if steps is None else steps   # None: the workload's own default, as the CLI passes it
    from reference_models.common import instrument

    m = NativeMoE()
    g = torch.Generator().manual_seed(seed)
    with instrument(m, run, root, flush_every=2) as h:
        for _ in range(steps):
            m(torch.randint(1, VOCAB, (2, 4), generator=g))
            h.step()
    return {"run": run, "steps": steps}
