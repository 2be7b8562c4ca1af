"""transformers `granitemoe`: `GraniteMoeTopKRouter` returns (router_logits, top_k_weights, top_k_index)."""
from ..routing import topk_triple
from . import Adapter, register

ADAPTER = register(Adapter(name="hf.granitemoe", classes=("GraniteMoeTopKRouter",), parse=topk_triple))
