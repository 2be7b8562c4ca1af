"""transformers `llama4`: `Llama4Router` returns ``(router_scores [T, E], router_logits [T, E])``.

The router selects ``topk(router_logits, top_k, dim=1)`` with no bias or
grouping, then puts sigmoid(top values) into an otherwise zero score matrix.
Reading "scores > 0" would miss a selected expert whose sigmoid underflows to
0 in bf16, so we repeat the router's own selection on the very logits it
returned (identical op on identical input, hence identical indices) and
gather the weights from the scores.
"""
import torch

from ..routing import Routed
from . import Adapter, register


def parse(module, args, output) -> Routed:
    scores, logits = output[0], output[1]
    idx = torch.topk(logits, module.top_k, dim=1).indices
    return Routed(idx, scores.gather(1, idx), None, logits)


ADAPTER = register(Adapter(name="hf.llama4", classes=("Llama4Router",), parse=parse))
