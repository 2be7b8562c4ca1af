"""When a chrono step ends: the step rules of ``probes.attach(steps=...)``.

* ``"optimizer"``: a training step is an optimizer step. Any
  ``torch.optim.Optimizer`` holding a parameter of the model marks the open
  step *updated* when it steps (``torch.optim.optimizer.
  register_optimizer_step_post_hook``, global to the process); the open step
  ends when the next TRAIN-mode top-level forward starts (or at ``h.flush()``
  / detach). So every forward of one optimizer step (gradient accumulation,
  chosen + rejected + frozen-reference forwards of a DPO step) is one step, and
  evaluation forwards that run after an optimizer step are recorded at it.
* ``"forward"``: every top-level forward is a step (inference, serving).
* ``"manual"``: only ``h.step()`` ends steps.
* ``"auto"`` (default): ``"forward"`` until the first optimizer step of this
  model, then ``"optimizer"``. At that first optimizer step the forwards since
  attach (provisionally one step each) are merged into one step, which is what
  ``"optimizer"`` would have recorded: gradient accumulation, evaluation or
  rollouts before the first update all land in the first training step, and
  step numbers equal optimizer steps from then on, as long as those forwards fit
  in one window (``flush_every`` steps); otherwise the handle warns once.
* ``steps=<another Handle>``: follow that handle's steps (a frozen reference
  model attached to its own run ends its steps when the policy's handle does).

Calling ``h.step()`` switches any rule to ``"manual"``.
"""
from __future__ import annotations

import weakref

from torch.optim.optimizer import register_optimizer_step_post_hook

from .recorder import TRAIN

RULES = ("auto", "optimizer", "forward", "manual")


class StepClock:
    def __init__(self, model, rule: str, on_first_update=None):
        if rule not in RULES:
            raise ValueError(f"steps must be one of {RULES}, got {rule!r}")
        self.rule = rule
        self.updated = False            # an optimizer step of this model ran in the open step
        self.training = rule == "optimizer"
        self.forward_pending = False    # a top-level forward ran in the open step
        self.first_step = None          # auto, before training is known: first provisional step
        self.optimizer_steps = 0
        self.split = False              # provisional steps of the first optimizer step were written
        self.on_first_update = on_first_update
        # called after each optimizer step of the model: the training step's work is done, so
        # the previous window's write is awaited here (Window.settle; durability), not only
        # when the step ends at the next forward
        self.after_update = None
        self._param_ids = frozenset(id(p) for p in model.parameters())
        self._owned: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self._hook = None
        if rule in ("auto", "optimizer"):
            self._hook = register_optimizer_step_post_hook(self._on_optimizer_step)

    def _owns(self, opt) -> bool:
        n = len(opt.param_groups)
        hit = self._owned.get(opt)
        if hit is None or hit[0] != n:
            own = any(id(p) in self._param_ids for g in opt.param_groups for p in g["params"])
            hit = self._owned[opt] = (n, own)
        return hit[1]

    def _on_optimizer_step(self, opt, args, kwargs) -> None:
        if self.rule not in ("auto", "optimizer"):
            return
        try:
            if not self._owns(opt):
                return
        except (TypeError, KeyError):
            return
        self.optimizer_steps += 1
        self.updated = True
        if self.after_update is not None:
            self.after_update()
        if not self.training:
            self.training = True
            if self.on_first_update is not None:
                self.on_first_update(self.first_step, self.split)
            self.first_step = None

    def forward_starts(self, mode: int, open_step: int, loose: bool = False) -> bool:
        """A top-level forward in ``mode`` starts; True if the open step must end first.
        ``loose``: the open step holds routing counted outside any top-level forward (a router
        called by hand, the rest of a forward that was running when the handle attached): under
        the forward rule that is not this forward's step either."""
        if self.rule == "manual":
            return False
        if self.training:
            return self.updated and mode == TRAIN
        end = self.forward_pending or loose
        if self.first_step is None:
            self.first_step = open_step
        return end

    def step_ended(self) -> None:
        self.updated = False
        self.forward_pending = False

    def manual(self) -> None:
        self.rule = "manual"
        self.remove()

    def window_closed(self, open_step: int) -> None:
        """Provisional steps written to disk can no longer be merged: merge from ``open_step``."""
        if self.first_step is not None and not self.training:
            self.split = True
            self.first_step = open_step

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
