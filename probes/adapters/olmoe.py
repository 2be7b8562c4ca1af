"""transformers `olmoe`: `OlmoeTopKRouter` returns (router_logits, top_k_weights, top_k_index)."""
from ..routing import topk_triple
from . import Adapter, register

ADAPTER = register(Adapter(name="hf.olmoe", classes=("OlmoeTopKRouter",), parse=topk_triple))
