"""transformers `gpt_oss`: `GptOssTopKRouter` returns (router_logits, top_k_weights, top_k_index)."""
from ..routing import topk_triple
from . import Adapter, register

ADAPTER = register(Adapter(name="hf.gpt_oss", classes=("GptOssTopKRouter",), parse=topk_triple))
