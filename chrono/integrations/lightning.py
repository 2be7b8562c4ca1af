"""chrono for ``lightning.Trainer``: one callback records routing and logs its health.

    from chrono.integrations.lightning import ChronoCallback
    trainer = lightning.Trainer(..., callbacks=[ChronoCallback()])

Same behaviour as the transformers callback (``chrono.integrations.common``):

* ``on_train_start``: ``probes.attach`` to the LightningModule (wrappers
  removed), ``steps="manual"``; the sanity-check validation before it is not
  recorded.
* one chrono step per optimizer step (``trainer.global_step``), whatever
  ``accumulate_grad_batches`` is: the micro-batches of the update that makes
  ``global_step == N`` are step N; validation loops run after update N are
  stored as mode ``EVAL`` at step N (one that runs between two micro-batches of
  update N + 1: at step N + 1, the open step).
* ``ckpt_path=`` resume: the run id is saved in the checkpoint (``state_dict``)
  and read back; steps continue at ``global_step + 1``, rows of later steps
  stored before (logged after the checkpoint) are replaced.
* ``pl_module.log_dict`` of the routing health (names in
  ``chrono.integrations.health``) after every optimizer step that is a logging
  step (``global_step % log_every_n_steps == 0``), so every Lightning logger
  shows it.
* ``on_train_end`` and ``on_exception``: flush and detach.
"""
from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from chrono.integrations.common import (DEFAULT_FLUSH_EVERY, CallbackOptions, agree_run_id,
                                        fresh_run_id, run_id_from)

__all__ = ["ChronoCallback"]


class ChronoCallback(CallbackOptions, Callback):
    """Record MoE routing of a ``lightning.Trainer`` fit with chrono's probes.

    Args:
        run: run id (``[A-Za-z0-9._-]{1,128}``). Default: the logger's
            ``<name>-version_<v>`` (else the trainer's ``default_root_dir`` name); a
            fresh fit whose default id is taken gets ``-2``, ``-3``, ... appended.
        root: store root (default ``$CHRONO_ROOT``, else ``./chrono_runs``).
        tokens: per-token sampling rate for the ``tokens`` table (0 = counts only).
        flush_every: optimizer steps per snapshot window (default: ``log_every_n_steps``).
        govern: actuator name(s) for ``chrono.govern``; ``None`` = observe only.
        log_health: ``pl_module.log`` the routing health (default True).
        strict: raise ``probes.ProbeError`` when probes cannot attach; default
            False logs one error line and trains without telemetry.
        **attach_options: passed to ``probes.attach``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._saved_run: str | None = None
        self._step_before = 0

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return {"run_id": self.run_id}

    def load_state_dict(self, state_dict: dict) -> None:
        self._saved_run = state_dict.get("run_id")

    # ---------------------------------------------------------------- events
    def on_train_start(self, trainer, pl_module) -> None:
        from chrono.store import default_root

        root = default_root() if self.root is None else self.root
        step = int(trainer.global_step)
        every = trainer.log_every_n_steps
        flush_every = self.flush_every or (int(every) if every and every >= 1 else DEFAULT_FLUSH_EVERY)
        config = {"trainer": {"framework": "lightning",
                              "accumulate_grad_batches": trainer.accumulate_grad_batches,
                              "resumed_at": step}}
        run = agree_run_id(self._resolve_run(trainer, root, step))
        if self._session.start(pl_module, run, root, step,
                               self.tokens, flush_every, govern=self.govern, strict=self.strict,
                               config=config, **self.attach_options):
            self.run_id = self._session.run_id

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_before = trainer.global_step
        self._session.begin_update(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._step_before:   # accumulating: no optimizer step in this batch
            return
        self._session.after_update()
        every = trainer.log_every_n_steps
        if self.log_health and self.handle is not None and every and step % every == 0:
            self.last_health = self._session.health()
            if self.last_health:
                pl_module.log_dict({k: float(v) for k, v in self.last_health.items()},
                                   on_step=True, on_epoch=False)

    def on_train_end(self, trainer, pl_module) -> None:
        self._session.close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._session.close()

    # --------------------------------------------------------------- helpers
    def _resolve_run(self, trainer, root, step: int) -> str:
        from chrono.store import validate_run_id

        if self.run is not None:
            return validate_run_id(self.run)
        if step > 0 and self._saved_run:
            return validate_run_id(self._saved_run)
        logger = trainer.logger
        if logger is not None and getattr(logger, "name", None):
            v = logger.version
            base = run_id_from(f"{logger.name}-{v if isinstance(v, str) else f'version_{v}'}")
        else:
            base = run_id_from(trainer.default_root_dir)
        return base if step > 0 else fresh_run_id(root, base)
