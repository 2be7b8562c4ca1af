"""transformers `ernie4_5_moe`: `Ernie4_5_MoeTopKRouter` returns (router_logits, top_k_weights, top_k_index)."""
from ..routing import topk_triple
from . import Adapter, register

ADAPTER = register(Adapter(name="hf.ernie4_5_moe", classes=("Ernie4_5_MoeTopKRouter",), parse=topk_triple))
