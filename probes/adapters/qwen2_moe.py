"""transformers `qwen2_moe`: `Qwen2MoeTopKRouter` returns (router_logits, top_k_weights, top_k_index)."""
from ..routing import topk_triple
from . import Adapter, register

ADAPTER = register(Adapter(name="hf.qwen2_moe", classes=("Qwen2MoeTopKRouter",), parse=topk_triple))
