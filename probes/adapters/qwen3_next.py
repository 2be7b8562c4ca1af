"""transformers `qwen3_next`: `Qwen3NextTopKRouter` returns (router_logits, top_k_weights, top_k_index)."""
from ..routing import topk_triple
from . import Adapter, register

ADAPTER = register(Adapter(name="hf.qwen3_next", classes=("Qwen3NextTopKRouter",), parse=topk_triple))
