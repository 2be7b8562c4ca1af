"""transformers `qwen3_moe`: `Qwen3MoeTopKRouter` returns (router_logits, top_k_weights, top_k_index)."""
from ..routing import topk_triple
from . import Adapter, register

ADAPTER = register(Adapter(name="hf.qwen3_moe", classes=("Qwen3MoeTopKRouter",), parse=topk_triple))
