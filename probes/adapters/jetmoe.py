"""transformers `jetmoe`: `JetMoeTopKGating` returns tokens grouped by expert.

Output: ``(index_sorted_experts, batch_index, batch_gates, expert_size,
logits)`` where ``index_sorted_experts`` are positions in the flattened
``[T * k]`` top-k choices sorted by expert and ``expert_size`` (a Python list)
is how many entries each expert got. We scatter them back into ``[T, k]``
indices / weights. Only the MoE feed-forward router (``...mlp.router``) is
recorded; the mixture-of-attention router (``self_attention.experts.router``)
shares the class and is skipped so layer numbers stay one site per layer.
"""
import torch

from ..routing import Routed
from . import Adapter, register


def parse(module, args, output) -> Routed:
    sorted_pos, _batch_index, gates, expert_size, logits = output
    k = module.top_k
    total = sorted_pos.shape[0]
    sizes = torch.as_tensor(expert_size, device=sorted_pos.device)
    experts_sorted = torch.repeat_interleave(
        torch.arange(len(expert_size), device=sorted_pos.device), sizes, output_size=total)
    idx = torch.empty(total, dtype=torch.long, device=sorted_pos.device)
    idx[sorted_pos] = experts_sorted
    w = torch.empty(total, dtype=gates.dtype, device=gates.device)
    w[sorted_pos] = gates
    return Routed(idx.reshape(-1, k), w.reshape(-1, k), None, logits)


ADAPTER = register(Adapter(
    name="hf.jetmoe", classes=("JetMoeTopKGating",), parse=parse,
    accept=lambda name: not name.endswith("experts.router")))
