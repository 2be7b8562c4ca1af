"""chrono for ``transformers.Trainer``: one callback records routing and logs its health.

    from chrono.integrations.transformers import ChronoCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[ChronoCallback()])

What the callback does (docs/integrations.md has the long form):

* ``on_train_begin``: ``probes.attach`` to the model the Trainer runs (wrappers
  such as DDP or ``torch.compile`` removed with accelerate's
  ``extract_model_from_parallel``), in ``steps="manual"`` mode.
* one chrono step per **optimizer step**: the micro-batches that lead to the
  update that makes ``state.global_step == N`` are step N, whatever
  ``gradient_accumulation_steps`` is; the step is ended when the next update's
  first micro-batch begins (``on_step_begin``), so an evaluation run after
  update N is stored as mode ``EVAL`` at step N, where the Trainer logs it.
* a retry (``auto_find_batch_size`` after an out-of-memory error: ``train`` starts again
  with no ``on_train_end``): the same run, the failed attempt's steps replaced by the redone ones.
* resume (``trainer.train(resume_from_checkpoint=...)``): the run id is read back
  from the checkpoint (``trainer_state.json``, ``stateful_callbacks``), steps
  continue at ``global_step + 1`` and rows of steps after the checkpoint (logged
  before the crash, about to be redone) are replaced, so no
  (run, rank, step, mode, layer, expert) key is stored twice.
* ``on_log`` at ``logging_steps``: routing health (names in
  ``chrono.integrations.health``) is added to the log dict before the reporters
  (TensorBoard, W&B, MLflow, ...) see it; the callback moves itself ahead of them
  (but after the console progress bar) in the Trainer's callback list the first
  time it is called.
* ``on_train_end``: flush and detach. The Trainer calls no callback when
  training raises: the attachment is then closed at the next ``train()``, by
  ``close()`` / ``with callback:``, or at interpreter exit (``atexit``), whichever
  comes first; rows of completed windows are on disk already.
"""
from __future__ import annotations

import sys

from transformers import TrainerCallback
from transformers.trainer_callback import (CallbackHandler, DefaultFlowCallback, ExportableState,
                                          PrinterCallback, ProgressCallback)

from chrono.integrations.common import (DEFAULT_FLUSH_EVERY, CallbackOptions, agree_run_id,
                                        fresh_run_id, log, run_id_from, unwrap)

__all__ = ["ChronoCallback", "run_id_from", "unwrap", "flush_every_for"]

CONSOLE_CALLBACKS = (DefaultFlowCallback, PrinterCallback, ProgressCallback)


def flush_every_for(logging_steps, logging_strategy) -> int:
    """Default window: the Trainer's logging interval in steps (50 when it is not a step count)."""
    strategy = getattr(logging_strategy, "value", logging_strategy)
    if strategy == "steps" and float(logging_steps) >= 1 and float(logging_steps).is_integer():
        return int(logging_steps)
    return DEFAULT_FLUSH_EVERY


class ChronoCallback(CallbackOptions, TrainerCallback, ExportableState):
    """Record MoE routing of a ``transformers.Trainer`` run with chrono's probes.

    Args:
        run: run id (``[A-Za-z0-9._-]{1,128}``). Default: from ``args.run_name``,
            else the output directory's name; a fresh (not resumed) training whose
            default id is taken in the store gets ``-2``, ``-3``, ... appended.
        root: store root (default ``$CHRONO_ROOT``, else ``./chrono_runs``).
        tokens: per-token sampling rate for the ``tokens`` table (0 = counts only).
        flush_every: optimizer steps per snapshot window (default: ``logging_steps``).
        govern: actuator name(s) for ``chrono.govern`` (e.g. ``"bias"``,
            ``("bias", "temperature")``); ``None`` = observe only.
        log_health: add routing health to the Trainer's logs (default True).
        strict: raise ``probes.ProbeError`` at train begin when probes cannot
            attach (no router found, ...). Default False: one error line is logged
            and training runs without telemetry.
        **attach_options: passed to ``probes.attach`` (``specs``, ``padding``, ...).

    After ``train()``: ``run_id``, ``handle`` (None once detached) and
    ``last_health`` (the last dict added to the logs).
    """

    _order_warned = False

    # --------------------------------------------------------- checkpoint state
    def state(self) -> dict:
        """Saved into each checkpoint (``stateful_callbacks``): resuming continues the same run."""
        return {"args": {"run": self.run_id or self.run,
                         "root": None if self.root is None else str(self.root),
                         "tokens": self.tokens, "flush_every": self.flush_every,
                         "log_health": self.log_health, "strict": self.strict},
                "attributes": {}}

    # ------------------------------------------------------------------ events
    def on_init_end(self, args, state, control, **kwargs):
        self._run_first()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from chrono.store import default_root

        self._run_first()
        # a previous train() that raised left its attachment open: this one is a retry of the
        # same training (auto_find_batch_size after an out-of-memory error restarts train()
        # without on_train_end): same run, the redone steps replace the failed attempt's
        retry = self._session.handle is not None and self.run_id is not None
        self._session.close()
        root = default_root() if self.root is None else self.root
        run = agree_run_id(self.run_id if retry else self._resolve_run(args, state, root))
        flush_every = self.flush_every or flush_every_for(args.logging_steps, args.logging_strategy)
        config = {"trainer": {"framework": "transformers",
                              "gradient_accumulation_steps": args.gradient_accumulation_steps,
                              "resumed_at": state.global_step}}
        if self._session.start(model, run, root, state.global_step, self.tokens, flush_every,
                               govern=self.govern, strict=self.strict, config=config,
                               eval_first=bool(getattr(args, "eval_on_start", False)), retry=retry,
                               **self.attach_options):
            self.run_id = self._session.run_id

    def on_step_begin(self, args, state, control, **kwargs):
        self._session.begin_update(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self._session.after_update()

    def on_log(self, args, state, control, logs=None, **kwargs):
        # training logs only (they carry "loss"); eval and final summaries are left as they are
        if self.log_health and logs is not None and "loss" in logs and self.handle is not None:
            self.last_health = self._session.health()
            logs.update(self.last_health)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    # ----------------------------------------------------------------- helpers
    def _resolve_run(self, args, state, root) -> str:
        from chrono.store import validate_run_id

        if self.run is not None:
            return validate_run_id(self.run)
        base = run_id_from(args.run_name or args.output_dir or "trainer")
        if state.global_step == 0:
            return fresh_run_id(root, base)
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        saved = saved[0] if isinstance(saved, list) and saved else saved
        if isinstance(saved, dict) and (saved.get("args") or {}).get("run"):
            return validate_run_id(saved["args"]["run"])
        return base

    def _run_first(self) -> None:
        """Move this callback ahead of the reporters, so the health it adds in on_log reaches them.

        The Trainer calls callbacks in list order and appends user callbacks after
        its reporting integrations; ``CallbackHandler.call_event`` is our caller.
        The list is replaced, not mutated, so the loop now running is unaffected.
        """
        try:
            handler = sys._getframe(2).f_locals.get("self")
        except ValueError:   # called directly, not from a Trainer
            handler = None
        if not isinstance(handler, CallbackHandler):
            if not self._order_warned:   # e.g. a transformers release that dispatches differently
                self._order_warned = True
                log.warning("chrono: could not move ChronoCallback ahead of the Trainer's reporters; "
                            "routing health reaches only callbacks listed after it")
            return
        others = [cb for cb in handler.callbacks if cb is not self]
        # after the flow and console-progress callbacks (the console stays readable), before the rest
        i = 0
        while i < len(others) and isinstance(others[i], CONSOLE_CALLBACKS):
            i += 1
        order = others[:i] + [self] + others[i:]
        if order != handler.callbacks:
            handler.callbacks = order
