"""What both trainer callbacks share: run ids, unwrapping, and one recording session.

A ``Session`` is probes attached to a model for one ``fit``/``train`` call, in
``steps="manual"`` mode, with chrono steps equal to the trainer's optimizer
step count (global step): the forwards that lead to the update making the
global step N are step N; forwards after update N and before the next update's
first micro-batch (evaluation) are also step N, in mode EVAL. Resuming at
global step G starts at G + 1 and replaces rows of steps > G stored before
(they were logged after the checkpoint and are about to be redone).

The core never imports ``probes`` (it sits a layer above): the attacher is
found through the ``chrono.attach`` entry-point group, which the ``probes``
package declares (``probes = "probes:attach"`` in pyproject.toml), or passed
explicitly as ``attach=`` to either callback; its ``AttachError`` (``chrono.attach``) is the
soft failure. See docs/architecture.md.
"""
from __future__ import annotations

import atexit
import logging
import re
import weakref

from chrono.attach import ATTACH_GROUP, AttachError, find_attacher  # noqa: F401  (re-exported)

log = logging.getLogger("chrono.integrations")

DEFAULT_FLUSH_EVERY = 50


def run_id_from(name: str) -> str:
    """A valid chrono run id from a run name or a directory.

    Keeps ``[A-Za-z0-9._-]``, maps every other character run to ``-``, uses the
    last path component of a directory, cuts to 128 characters; ``trainer`` if
    nothing is left.
    """
    base = str(name).rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    rid = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.")[:128]
    return rid or "trainer"


def fresh_run_id(root, base: str) -> str:
    """``base``, or ``base-2``, ``base-3``, ... : the first id no run in the store has."""
    from chrono.store import run_meta_dir

    rid, n = base, 1
    while run_meta_dir(root, rid) is not None:   # a fresh training never continues an old run
        n += 1
        rid = f"{base[:120]}-{n}"
    return rid


def agree_run_id(rid: str) -> str:
    """Rank 0's run id on every rank of an initialised ``torch.distributed`` job (else ``rid``).

    Ranks resolve the default id at slightly different times; one that saw the
    run rank 0 had just created would pick ``<id>-2``. Today probes' own
    collective at attach keeps rank 0 from creating the run before every rank
    has resolved; this broadcast does not rely on that.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return rid
    box = [rid]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def unwrap(model):
    """The module whose routers run: DDP / DataParallel / DeepSpeed / torch.compile wrappers removed."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_torch_compile=False, recursive=True)


class Session:
    """Probes on one model for one training call; see the module docstring.

    ``start`` returns False (and logs one error line) when probes cannot attach
    and ``strict`` is false; every other method is then a no-op.
    """

    def __init__(self):
        self.handle = None
        self.governor = None
        self._atexit = None
        self._step_zero = False   # the open step 0 holds an evaluation before the first update

    def start(self, model, run: str, root, global_step: int, tokens: float, flush_every: int,
              govern=None, strict: bool = False, config: dict | None = None, attach=None,
              eval_first: bool = False, retry: bool = False, **attach_options) -> bool:
        """Attach to ``model``; ``attach``: a callable like ``probes.attach`` (default: the
        ``chrono.attach`` entry point, see ``find_attacher``). ``eval_first``: the trainer
        evaluates before the first update (transformers' ``eval_on_start``); on a fresh run
        that evaluation is step 0, where the trainer logs it, in a window of its own.
        ``retry``: the trainer starts this training again after the previous attempt raised
        (``auto_find_batch_size`` after an out-of-memory error): the steps it redoes replace the
        failed attempt's in the same run."""
        attach = attach or find_attacher()
        self.close()
        model = unwrap(model)
        resumed = global_step > 0
        self._step_zero = eval_first and not resumed
        try:
            self.handle = attach(model, run=run, root=root, tokens=tokens,
                                 flush_every=flush_every, start_step=0 if self._step_zero else global_step + 1,
                                 overwrite=resumed or retry, steps="manual", config=config, **attach_options)
        except AttachError as e:
            if strict:
                raise
            log.error("chrono: not recording routing for this training (%s)", " ".join(str(e).split()))
            return False
        self._atexit = _close_at_exit(self)
        if govern is not None:
            import chrono

            self.governor = chrono.govern(model, self.handle, actuators=govern)
        return True

    @property
    def run_id(self) -> str | None:
        return None if self.handle is None else self.handle.run_id

    def begin_update(self, global_step: int) -> None:
        """The first micro-batch of the update that will make the global step ``global_step + 1``."""
        h = self.handle
        if h is not None and h.current_step <= global_step:
            h.step(next_step=global_step + 1)
            if self._step_zero:   # step 0 (the evaluation before training) is a window of its
                self._step_zero = False   # own: the next windows end at the logging steps
                h.flush()

    def after_update(self) -> None:
        if self.governor is not None:
            self.governor.step()

    def health(self) -> dict:
        """Routing health for the trainer's logs (``{}`` when not attached or on a telemetry fault)."""
        from chrono.integrations.health import handle_health

        if self.handle is None:
            return {}
        try:
            return handle_health(self.handle)
        except Exception as e:   # telemetry never breaks the training loop
            log.error("chrono: routing health unavailable (%s: %s)", type(e).__name__, e)
            return {}

    def close(self) -> None:
        """Flush and detach (idempotent)."""
        h, self.handle = self.handle, None
        if h is not None:
            h.detach()      # first: the last window's decision is taken while the governor is on
        if self.governor is not None:
            self.governor.remove()   # (detach removed it already when it adopted it)
            self.governor = None
        if self._atexit is not None:
            atexit.unregister(self._atexit)
            self._atexit = None


class CallbackOptions:
    """Arguments and session both trainer callbacks share (see either callback's docstring)."""

    def __init__(self, run: str | None = None, root=None, tokens: float = 0.0,
                 flush_every: int | None = None, govern=None, log_health: bool = True,
                 strict: bool = False, **attach_options):
        self.run = run
        self.root = root
        self.tokens = tokens
        self.flush_every = flush_every
        self.govern = govern
        self.log_health = log_health
        self.strict = strict
        self.attach_options = attach_options
        self.run_id: str | None = run
        self.last_health: dict = {}
        self._session = Session()

    @property
    def handle(self):
        """The probes ``Handle`` while training runs, else None."""
        return self._session.handle

    @property
    def governor(self):
        """The ``chrono.govern`` Governor while training runs with ``govern=``, else None."""
        return self._session.governor

    def close(self) -> None:
        """Flush and detach (idempotent). Also done at train end and at interpreter exit."""
        self._session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _close_at_exit(session: Session):
    ref = weakref.ref(session)

    def close_at_exit():
        s = ref()
        if s is not None:
            s.close()

    atexit.register(close_at_exit)
    return close_at_exit
