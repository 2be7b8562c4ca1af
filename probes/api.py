"""``probes.attach``: the one call a user makes (the ``Handle`` it returns: ``probes.handle``)."""
from __future__ import annotations

from torch import nn

from .handle import Handle


def attach(model: nn.Module, run: str, root=None, tokens: float = 0.0, flush_every: int = 50,
           lenses=None, distributed=None, metrics_port=None, generic: bool = True, specs=None,
           **options) -> Handle:
    """Hook every MoE router of ``model`` and record routing into run ``run`` under ``root``.

    ``root``: the store (default ``$CHRONO_ROOT``, else ``./chrono_runs``: the same as the
    CLI, dashboard and exporter). ``tokens``: 0 = aggregate counts only; a fraction in (0, 1]
    samples that share of tokens into the ``tokens`` table (``max_tokens_per_step`` bounds it
    per layer). ``flush_every``: steps per window (snapshot + write). ``lenses``: ``{layer:
    nn.Module}`` applied to that router's input. ``generic``: allow guessing routers when no
    adapter matches. ``specs``: ``[probes.RouterSpec(...)]`` for routers no adapter knows.

    Other options:

    * ``steps``: when a step ends (``probes.clock``): ``"auto"`` (default: one step per
      optimizer step once the model trains, one per top-level forward before that / in
      inference), ``"optimizer"``, ``"forward"``, ``"manual"`` (only ``h.step()``).
    * ``steps=<Handle>``: follow another handle's steps (attach a frozen reference model to its
      own run; its steps end when the policy's do, and take the same numbers).
    * ``start_step``: first step of this session. None (default) continues after the steps
      this rank already stored in the run (0 for a new run); a smaller value raises
      ``chrono.store.StoreError`` unless ``overwrite=True``, which first removes this rank's
      stored rows of steps ``>= start_step`` (a resume from an earlier checkpoint).
    * ``padding``: ``"exclude"`` (default: tokens masked out by a 2-D ``attention_mask`` of the
      forward are not counted; their number is kept as the ``probes.padding_excluded`` signal)
      or ``"count"``. ``h.set_mask(mask)`` supplies a mask for models without that argument.
    * ``metrics_expert_labels``: with ``metrics_port``, also serve per-expert shares.
    * ``staging``: True (default) counts a router's calls when the forward ends, from
      references to its outputs, checked by autograd's version counters (``probes.staging``);
      False counts every call when the router returns. Use False for a model that changes a
      router's outputs after it returned through a write that bypasses version counters
      (``tensor.data``, a NumPy view, DLPack, a custom kernel): staged counting cannot see such
      a write and would count the changed values.
    * ``max_tokens_per_step`` (4096), ``seed`` (0), ``config`` (dict for the manifest),
      ``auto_step=False`` (old spelling of ``steps="manual"``).

    Raises ``probes.ProbeError`` (no router, bad option) and ``chrono.store.StoreError`` (bad
    run id, run locked by another writer, step overlap).
    """
    return Handle(model, run, root=root, tokens=tokens, flush_every=flush_every, lenses=lenses,
                  distributed=distributed, metrics_port=metrics_port, generic=generic, specs=specs,
                  **options)

