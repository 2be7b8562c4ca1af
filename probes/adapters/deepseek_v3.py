"""transformers `deepseek_v3`: `DeepseekV3TopkRouter` returns (logits, topk_weights, topk_indices).

The indices come from group-limited selection over sigmoid scores plus
``e_score_correction_bias``: a top-k over the logits would be wrong, so we
record the indices the router returns.
"""
from ..routing import topk_triple
from . import Adapter, register

ADAPTER = register(Adapter(name="hf.deepseek_v3", classes=("DeepseekV3TopkRouter",), parse=topk_triple))
