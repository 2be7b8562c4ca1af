"""transformers `phimoe`: `PhimoeTopKRouter` returns (router_logits, top_k_weights, top_k_index)."""
from ..routing import topk_triple
from . import Adapter, register

ADAPTER = register(Adapter(name="hf.phimoe", classes=("PhimoeTopKRouter",), parse=topk_triple))
