"""Families whose router needs no parsing of its own: the transformers 5.x ``*TopKRouter``
convention, a router module returning ``(router_logits [T, E], top_k_weights [T, k],
top_k_index [T, k])``, read by ``probes.routing.topk_triple``. One row per family:
adding a family of this convention is one line here (families with their own parsing have
their own module in this package).

DeepSeek-V3's indices come from group-limited selection over sigmoid scores plus
``e_score_correction_bias``: a top-k over the logits would be wrong, so, as for every row,
the indices the router returns are recorded.
"""
from ..routing import topk_triple
from . import Adapter, register

TOPK_TRIPLE_ROUTERS = {   # family (transformers model type) -> router class name
    "mixtral": "MixtralTopKRouter",
    "qwen2_moe": "Qwen2MoeTopKRouter",
    "qwen3_moe": "Qwen3MoeTopKRouter",
    "olmoe": "OlmoeTopKRouter",
    "deepseek_v3": "DeepseekV3TopkRouter",
    "gpt_oss": "GptOssTopKRouter",
    "phimoe": "PhimoeTopKRouter",
    "granitemoe": "GraniteMoeTopKRouter",
    "ernie4_5_moe": "Ernie4_5_MoeTopKRouter",
    "qwen3_next": "Qwen3NextTopKRouter",
}

ADAPTERS = {family: register(Adapter(name=f"hf.{family}", classes=(cls,), parse=topk_triple))
            for family, cls in TOPK_TRIPLE_ROUTERS.items()}
