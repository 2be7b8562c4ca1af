"""transformers `dbrx`: `DbrxRouter` returns logits only; the parent `DbrxFFN`
chooses experts in its method ``route_tokens_to_experts(router_logits) ->
(top_k_weights, top_k_index)``. We wrap that method on the instance with a
stackable ``probes.wrap.MethodHook`` (unwound on detach) and record exactly what it returns.
"""
from ..routing import Routed
from ..wrap import MethodHook
from . import Adapter, register


def parse(module, args, output) -> Routed:
    logits, weights, indices = output
    return Routed(indices, weights, None, logits)


def install(model, name, module, on_output):
    """Wrap the parent's ``route_tokens_to_experts`` on the instance (stackable, see probes.wrap)."""
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model

    def recorded(out, args, kwargs):
        logits = args[0] if args else kwargs["router_logits"]
        weights, indices = out
        on_output(module, (logits,), (logits, weights, indices))

    return MethodHook(parent, "route_tokens_to_experts", recorded)


ADAPTER = register(Adapter(
    name="hf.dbrx", classes=("DbrxRouter",), parse=parse, install=install,
    n_experts=lambda module, parent=None: module.layer.out_features,
    top_k=lambda module, parent=None: parent.top_k))
