"""transformers `switch_transformers`: top-1 routing with expert capacity.

`SwitchTransformersTop1Router` returns ``(expert_index, router_probs,
router_logits)``: ``expert_index`` is a one-hot dispatch mask ``[B, S, E]``
in which tokens beyond an expert's capacity are zeroed (dropped). Dispatched
tokens are read from that mask. A dropped token's row is all zero, so the
expert it was routed to is re-derived with the router's own ops (softmax in
``router.dtype``, cast back to ``router.input_dtype``, argmax) only to
attribute it in the ``dropped`` column; it is never counted in ``tokens``.
"""
import torch

from ..routing import Routed
from . import Adapter, register


def parse(module, args, output) -> Routed:
    onehot, probs, logits = output[0], output[1], output[2]
    n = onehot.shape[-1]
    onehot = onehot.reshape(-1, n)
    dispatched = onehot.sum(dim=-1) > 0
    flat_logits = logits.reshape(-1, n)
    routed_to = torch.softmax(flat_logits, dim=-1, dtype=module.dtype).to(
        getattr(module, "input_dtype", flat_logits.dtype)).argmax(dim=-1)
    idx = torch.where(dispatched, onehot.argmax(dim=-1), routed_to)
    return Routed(idx[:, None], probs.reshape(-1, 1), (~dispatched)[:, None], flat_logits)


ADAPTER = register(Adapter(
    name="hf.switch_transformers", classes=("SwitchTransformersTop1Router",), parse=parse,
    top_k=lambda module, parent=None: 1))
