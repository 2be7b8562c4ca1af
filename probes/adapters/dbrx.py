"""transformers `dbrx`: `DbrxRouter` returns logits only; the parent `DbrxFFN`
chooses experts in its method ``route_tokens_to_experts(router_logits) ->
(top_k_weights, top_k_index)``. We wrap that method on the instance (removed
on detach) and record exactly what it returns.
"""
from ..routing import Routed
from . import Adapter, register


def parse(module, args, output) -> Routed:
    logits, weights, indices = output
    return Routed(indices, weights, None, logits)


class _MethodWrap:
    def __init__(self, owner, attr):
        self.owner, self.attr = owner, attr

    def remove(self):
        self.owner.__dict__.pop(self.attr, None)


def install(model, name, module, on_output):
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    original = type(parent).route_tokens_to_experts

    def route_tokens_to_experts(router_logits):
        weights, indices = original(parent, router_logits)
        on_output(module, (router_logits,), (router_logits, weights, indices))
        return weights, indices

    parent.route_tokens_to_experts = route_tokens_to_experts
    return _MethodWrap(parent, "route_tokens_to_experts")


ADAPTER = register(Adapter(
    name="hf.dbrx", classes=("DbrxRouter",), parse=parse, install=install,
    n_experts=lambda module, parent=None: module.layer.out_features,
    top_k=lambda module, parent=None: parent.top_k))
