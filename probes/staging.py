"""Router calls of a forward, counted together when it ends: one batch of device ops per forward.

Counting each router call on its own costs ~7 device ops per call (``Recorder.record``);
on small shapes the per-op dispatch (or, on CUDA, kernel launch) overhead is the whole
cost, and a DeepSeek-V3-sized model makes 61 calls per forward. ``Stage.add`` instead keeps
a *reference* to the call's ``Routed`` (no device op) and reads its version counters; once
a router is staged, its hook reads the router's expert count and does nothing else
(``Stage.push``: the hook's hot path). ``flush`` (when the top-level
forward ends, and before anything reads the step's counts) counts every staged call at
once, with the bookkeeping of all calls in one tight loop:

    col  = cat(indices, -1 per logits) clamped to [-1, capacity] + base    3 ops
    src  = [1 per assignment, 0 per logits; cat(weights, logit sums)]      1-2 ops (the
           (weights of one dtype: cat in that dtype, then one copy_)         cat, the copy_),
           logit sums: cat(logits), summed per call in one op, copied        3 ops, or one
           (>= 8 calls, logits of one shape and dtype, <= 2^20 elements)    sum per call
                                                                             + a stack (+ a
                                                                             copy_, as above)
    acc[tokens, weight] .index_add_(col, src)                              1 op

(those ops, on buffers cached per batch layout: ``probes.batch_count``; on CPU one C call for all
the calls instead, ``probes.native``, into the same cells), writing the cells ``Recorder.record`` writes: tokens and weight sums per (mode, router,
expert). A call's logit sum (in the logits' dtype, float32 at least, either way: the same
value as the eager path's ``logit_sum``) lands in the weight cell of column 0 (the column of
negative indices, whose weight sum nothing reads) and adds 0 tokens: it only flags non-finite
logits. Finite logits whose float32 sum leaves float32's range (|sum| > 3.4e38: ~1e32 per
logit at 4096 tokens x 256 experts) are flagged too, on every path alike: an exact check
costs more per call on CPU (measured at [4096, 256] float32, 1 thread: float64 sum 12x,
``aminmax`` 2.4x, an L2 norm overflows earlier, the max-|logit| norm ~10x more). The eager
path, still used under ``torch.compile``, for padding masks and capacity drops, mixes with
this one in any order (float64 sums of integers are exact). SGLang's expert-distribution recorder has the same shape
(python/sglang/srt/eplb/expert_distribution.py: each layer writes its top-k ids into a
preallocated buffer, counted once per forward pass); here the per-layer write is gone too.

A reference is only safe while nobody changes the tensor in place before the flush.
* Under ``torch.inference_mode`` (serving, generation) outputs are inference tensors, which
  have no version counter: a call there stages private *copies* of its indices and weights
  (2 copies) and its logit sum (1 op), 3 ops per call instead of 7, safe by construction;
  not on CPU with ``probes.native`` built (one C call at once costs less than the copies), and
  only in models with at least ``COPIES_MIN_ROUTERS`` routers, since the flush's fixed cost
  is paid back only over many calls (measured on CPU, ``benchmarks/probe_overhead.py`` and
  ``probe_scale.py --inference``: 4 routers 25-35 % slower than counting at once, 61 routers
  ~10 % faster; on CUDA, where the saving is kernel launches, unmeasured). A call whose weights
  or logits are inference tensors but whose indices are not (a router that computes its logits
  under ``inference_mode`` in a normal forward) is counted at once.
* Elsewhere (training, ``no_grad``) a call stages references and the version counters of its
  indices, weights and logits. Each router starts *on probation*: its calls are counted at
  once and watched; when the top-level forward of the watching thread ends (not at another
  thread's, nor at a flush in mid-forward), a router any of whose watched outputs the model
  changed in place (e.g. ``weights /= weights.sum(-1, keepdim=True)`` after the router) is
  counted at once for good, the others are staged, in that forward's mode: the first call in
  another mode (TRAIN after EVAL: a model may change the gate weights in place in training
  only, an in-place dropout) is on probation again (review 11). At every flush each staged call's versions
  are checked again: a call whose indices or weights changed anyway is not counted (its values
  are no longer the router's), one whose logits changed is counted without its non-finite
  check; either is a telemetry fault, and the router is counted at once from then on. Nothing
  is counted from values other than the router returned, as far as version counters tell.
* Calls whose indices or weights start at the same address as another call's (one buffer
  rewritten by each call, perhaps by a writer that bypasses version counters: ``.data``, a raw
  kernel, DLPack) are not trusted: in a probation forward the router stays eager, at a flush
  those calls are dropped with a fault.
* A call outside any top-level forward (a router called by hand) is counted at once: nothing
  would flush it before the caller's own code runs. Tensors without storage of their own
  (``torch.func`` transforms, fake tensors) are counted at once too, and so is a staged call
  whose weights do not match its indices in number (``Recorder.record`` refuses it: a fault,
  and the flush goes on with the other calls).
* Not detected: a write that bypasses version counters (``.data``, a NumPy view, DLPack, a raw
  kernel) to a router's own output after it returned: the flush counts the changed values
  (``tests/probes/test_staging_break3_handles.py``, strict xfail; telling it would take a device
  compare per call and a host read). ``probes.attach(..., staging=False)`` counts every call
  when its router returns.

With token sampling on, each staged call also carries ``(layer, forward context)``: the flush
samples it (``TokenSampler.sample``) in call order, from the values it counts, right where it
decides to count it; a call it drops is not sampled.

Nothing here reads a value on the host.

Memory: staged references (and copies) keep tensors alive until the forward ends, bounded by
``MAX_LOGITS`` elements (a fuller stage is flushed first: 64 MiB of float32 logits); calls of
more than ``MAX_CALL`` assignments are counted at once; a flush counts at most
``MAX_ASSIGNMENTS`` per batch. Per forward layout (the last ``_LAYOUTS``): three int64 vectors,
a float64 ``[2, N]`` source and the weights in their own dtype: 40 bytes per assignment plus one
weight (44 with float32 weights: 22 MiB at the bound), plus the concatenated logits when summed
in one op (at most 2^20 elements: ``probes.batch_count``).
"""
from __future__ import annotations

import threading

from chrono.schema import MODES

from . import native
from .batch_count import Layouts
from .ops import grad_off_eager, logit_sum
from .routing import Routed

MAX_ASSIGNMENTS = 1 << 19   # (token, k) assignments counted by one index_add_
# A call with more assignments than this is counted at once: there the data, not the per-op
# dispatch, is the cost, and counting each call while its outputs are in cache measured faster
# (DeepSeek-V3 shape, 4096 tokens x top-8 = 32768 per call: 18-19 ms a step at once, 21.5-22
# staged; benchmarks/probe_scale.py, CPU). Decode and small training shapes stay below it.
MAX_CALL = 1 << 13
MAX_LOGITS = 1 << 24        # logits (elements) kept alive by the stage before an early flush
COPIES_MIN_ROUTERS = 8      # inference tensors are staged as copies only from this many routers
PROBATION, STAGED, EAGER = 0, 1, 2
INFER = MODES.index("INFER")


def _addresses(routed: Routed) -> tuple | None:
    """Data pointers of a call's indices and weights (0 for none); None for tensors without
    storage of their own (``torch.func`` transforms, fake or subclass tensors: not staged)."""
    w = routed.weights
    try:
        return routed.indices.data_ptr(), 0 if w is None else w.data_ptr()
    except RuntimeError:
        return None


def _reused(addresses: list) -> set:
    """Positions in ``addresses`` (``_addresses`` of each call; None entries are skipped) of the
    calls whose indices or weights start at an address another call's also starts at: one
    buffer rewritten by each call (with no version bump if the writer bypassed autograd), so a
    reference to it no longer holds that call's values."""
    seen: dict = {}
    for i, pair in enumerate(addresses):
        for a in pair or ():
            if a:
                seen.setdefault(a, []).append(i)
    return {i for group in seen.values() if len(group) > 1 for i in group}


def _versions(routed: Routed) -> tuple | None:
    """Version counters of a call's indices, weights and logits (-1 for None); None when its
    weights or logits are inference tensors (no version counter) while its indices are not (a
    router that computes its logits under ``inference_mode`` in a normal forward): such a call
    is counted at once."""
    indices, weights, _, logits = routed
    try:
        return (indices._version, -1 if weights is None else weights._version,
                -1 if logits is None else logits._version)
    except RuntimeError:
        return None


class Stage:
    """The staged router calls of one recorder (see the module docstring).

    ``rec``: the ``probes.recorder.Recorder`` whose ``acc`` a flush adds to (its ``record``
    counts what cannot be staged); ``faults``: a ``probes.faults.Faults`` (or None) told
    about staged calls changed in place.
    """

    def __init__(self, rec, faults=None):
        self.rec, self.faults = rec, faults
        self.state = [PROBATION] * rec.n_slots
        self.clean = [0] * rec.n_slots   # per slot, a bit per mode the router was judged clean in
        self.calls: list = []   # (mode, slot, Routed, versions or None, logit sum or None, sample)
        self.nl = 0             # staged logits (elements) kept alive
        self.watch: list = []   # probation calls: (thread, slot, (indices, weights, logits), versions, mode)
        self.enabled = True     # False: attach(staging=False), every call counted at once
        self.sampler = None     # the window's TokenSampler: staged calls are sampled at the flush
        self.deferred: set = set()   # layers of the staged calls that the flush samples
        self._layouts = Layouts(rec)   # the flush's buffers, per batch layout

    def reset(self) -> None:
        """The recorder's buffers were reallocated (grown, moved): column bases change."""
        self._layouts.clear()

    def disable(self) -> None:
        """Count every call at once from now on (``probes.attach(staging=False)``)."""
        self.enabled = False
        self.state[:] = [EAGER] * len(self.state)

    def push(self, mode: int, slot: int, routed: Routed) -> bool:
        """The hook's hot path, for a call of a running top-level forward whose router is
        ``STAGED`` (the hook checked) and that has no padding mask and no sampled tokens: stage
        a reference and its version counters. False when the call needs ``add`` (capacity
        drops, inference tensors, the ``MAX_LOGITS`` bound, a router no longer ``STAGED``:
        another thread's flush found a call changed in place). Caller holds the lock."""
        indices, _, dropped, logits = routed
        if dropped is not None or indices.is_inference() or self.state[slot] != STAGED \
                or not self.clean[slot] >> mode & 1:   # (a mode it was not judged in: probation)
            return False
        versions = _versions(routed)
        if versions is None:
            return False
        if logits is not None:
            nl = self.nl + logits.numel()
            if nl > MAX_LOGITS:
                return False
            self.nl = nl
        self.calls.append((mode, slot, routed, versions, None, None))
        return True

    def _copy(self, mode: int, slot: int, routed: Routed, sample=None) -> bool:
        """Stage private copies of a call whose indices are inference tensors (no version
        counter): its indices and weights (2 copies) and its logit sum (1 op). False (count it at
        once) for a call of more than ``MAX_CALL`` assignments. ``add`` calls it, having checked
        that staging is on and the model has at least ``COPIES_MIN_ROUTERS`` routers."""
        m = routed.indices.numel()
        if m > MAX_CALL:
            return False
        held = 2 * m   # the copies count against the memory bound
        if self.nl + held > MAX_LOGITS:
            self.flush()
        self.nl += held
        logits, weights = routed.logits, routed.weights
        self.calls.append((mode, slot, Routed(routed.indices.clone(), None if weights is None else weights.clone()),
                           None, None if logits is None else logit_sum(logits), sample))
        if sample is not None:
            self.deferred.add(sample[0])
        return True

    def add(self, mode: int, slot: int, routed: Routed, in_forward: bool, sample=None) -> bool:
        """Stage one router call of a top-level forward (``in_forward``); False if it must be
        counted at once (``Recorder.record``): a call outside any forward (nothing would flush
        it before the caller's own code runs), a router on probation (its call is then watched)
        or found to change its outputs in place, a call of more than ``MAX_CALL`` assignments."""
        if not in_forward or not self.enabled:
            return False
        few = len(self.state) < COPIES_MIN_ROUTERS   # too few calls to pay copies back
        if few and mode == INFER:
            return False
        if routed.indices.is_inference():   # no version counter: private copies (also for a
            # forward entering inference mode); on CPU one C call at once costs less than copies
            return not few and self.rec.native is None and self._copy(mode, slot, routed, sample)
        logits = routed.logits
        state = self.state[slot]
        versions = _versions(routed)
        if versions is None:
            return False
        if state == STAGED and not self.clean[slot] >> mode & 1:
            state = PROBATION   # judged clean in other modes only: a model may change its outputs
            # in place in training and not in evaluation (an in-place dropout of the gate weights)
        if state != STAGED:
            if state == PROBATION and len(self.watch) < 8 * len(self.state):
                self.watch.append((threading.get_ident(), slot, (routed.indices, routed.weights, logits),
                                   versions, mode))
            return False
        if logits is not None:
            nl = logits.numel()
            if self.nl + nl > MAX_LOGITS:
                self.flush()
                if nl > MAX_LOGITS:
                    return False
            self.nl += nl
        self.calls.append((mode, slot, routed, versions, None, sample))
        if sample is not None:
            self.deferred.add(sample[0])
        return True

    def before_sampling(self, layer: int) -> None:
        """A call of ``layer`` is about to be sampled at once (in its hook): flush first if a
        staged call of that layer waits to be sampled, so that the layer's calls are sampled in
        call order (the sampler gives the i-th call of a layer in a step the i-th offset word,
        and the per-layer budget first come, first served). Caller holds the lock."""
        if layer in self.deferred:
            self.flush()

    def flush(self, forward_ended: int | None = None) -> None:
        """Count every staged call into ``rec.acc``. ``forward_ended``: the ident of the thread
        whose top-level forward just ended; its probation calls are judged. Caller holds the lock."""
        if forward_ended is not None and self.watch:
            self._judge(forward_ended)
        if not self.calls:
            return
        calls, self.calls, self.nl = self.calls, [], 0
        self.deferred.clear()
        # addresses of the referenced outputs (a tensor's never changes), read here in one loop
        addresses = [None if c[3] is None else _addresses(c[2]) for c in calls]
        flat = [a for pair in addresses if pair is not None for a in pair if a]
        shared = _reused(addresses) if len(set(flat)) < len(flat) else ()
        with grad_off_eager():
            batch, n = [], 0
            for j, ((mode, slot, routed, versions, norm, sample), address) in enumerate(zip(calls, addresses)):
                indices, weights, _, logits = routed
                if indices.is_meta:   # a dry run on meta (shapes, FLOPs): no data, not counted
                    continue
                # no storage of its own (a torch.func transform's tensor): counted at once, unchecked
                storeless = versions is not None and address is None
                if versions is not None and not storeless:
                    if j in shared:
                        self._fault(slot, "counts", "shares its memory with another call's (a buffer "
                                    "rewritten without a version bump)")
                        continue
                    iv, wv, lv = versions
                    if indices._version != iv or (wv >= 0 and weights._version != wv) or \
                            (lv >= 0 and logits._version != lv):
                        if self._changed(slot, routed, versions) == "counts":
                            continue
                        routed = Routed(indices, weights)   # counted without its non-finite check
                if sample is not None:   # (a call dropped above is not sampled either)
                    self._sample(mode, indices, weights, *sample)
                m = indices.numel()
                # calls grown past MAX_CALL (counted at once from now on), and weights that do not
                # match the indices (record refuses the call: a fault; the cat would shift the
                # other calls' weights or fail the batch)
                if storeless or m > MAX_CALL or (weights is not None and weights.numel() != m):
                    self._eager(mode, slot, routed)
                    continue
                if n + m > MAX_ASSIGNMENTS:
                    self._count_or_eager(batch, n)
                    batch, n = [], 0
                batch.append((mode, slot, routed, norm))
                n += m
            if batch:
                self._count_or_eager(batch, n)

    def _sample(self, mode: int, indices, weights, layer: int, ctx) -> None:
        """Sample a staged call's tokens (``TokenSampler.sample``) at the flush, in call order,
        from the same values it is counted from: the ops run in one loop over the forward's
        calls, with warm caches, instead of in each router hook. A failure is a fault."""
        try:
            self.sampler.sample(layer, mode, indices, weights, None, ctx)
        except Exception as e:  # telemetry must never break the forward
            if self.faults is None:
                raise
            self.faults.fault(f"token sampling, layer {layer}", e)

    def _changed(self, slot: int, routed: Routed, versions: tuple) -> str | None:
        """What of a staged call changed in place since the router returned: None, "logits"
        (then counted without its non-finite check) or "counts" (indices or weights: then not
        counted). A change is a fault, and the router is counted at once from now on."""
        iv, wv, lv = versions
        if routed.indices._version != iv or (wv >= 0 and routed.weights._version != wv):
            what = "counts"
        elif lv >= 0 and routed.logits._version != lv:
            what = "logits"
        else:
            return None
        self._fault(slot, what, "were changed in place before they were counted")
        return what

    def _fault(self, slot: int, what: str, why: str) -> None:
        self.state[slot] = EAGER
        if self.faults is not None:
            self.faults.fault(f"router slot {slot}", RuntimeError(
                "the router's " + ("indices or weights" if what == "counts" else "logits") + f" {why}; "
                + ("that call is not counted" if what == "counts" else "that call's non-finite check is skipped")
                + "; this router is counted at once from now on"))

    def _judge(self, thread: int) -> None:
        """Probation calls of ``thread``'s forward, which just ended: a router whose indices,
        weights or logits changed in place since it returned stays eager, else it is staged."""
        mine, self.watch = [w for w in self.watch if w[0] == thread], [w for w in self.watch if w[0] != thread]
        addresses = [_addresses(Routed(t[0], t[1])) for _, _, t, _, _ in mine]
        shared = _reused(addresses)
        clean = []
        for i, (_, slot, tensors, versions, mode) in enumerate(mine):
            if i in shared or addresses[i] is None or tensors[0].numel() > MAX_CALL \
                    or any(v >= 0 and t._version != v for t, v in zip(tensors, versions)):
                self.state[slot] = EAGER
            else:
                clean.append((slot, mode))
        for slot, mode in clean:   # staged in the modes it was judged clean in
            if self.state[slot] != EAGER:
                self.state[slot] = STAGED
                self.clean[slot] |= 1 << mode

    def _count_or_eager(self, batch: list, n: int) -> None:
        """``_count``; if it fails before writing (a call on another device than the
        recorder: ``torch.cat`` refuses), count each call at once instead."""
        try:
            self._count(batch, n)
        except RuntimeError:
            for mode, slot, routed, _ in batch:
                self._eager(mode, slot, routed)

    def _eager(self, mode: int, slot: int, routed: Routed) -> None:
        """Count one staged call with ``Recorder.record``, on the recorder's device; its router
        is counted at once from now on (the hook then follows it to its device)."""
        self.state[slot] = EAGER
        rec = self.rec
        try:
            rec.record_plain(mode, slot, Routed(*(None if t is None else t.to(rec.device) for t in routed)))
        except Exception as e:   # a call record refuses is a fault of its own: the flush goes on
            if self.faults is None:
                raise
            self.faults.fault(f"router slot {slot}", e)

    def _count(self, batch: list, n: int) -> None:
        """One batch's device ops (``probes.batch_count.Layouts.count``), or on CPU one C call
        for all its calls (``probes.native.describe`` each, then ``native.count``: the same
        cells); a batch with a call C cannot read takes the ops."""
        rec = self.rec
        if rec.native is not None:
            hold = []   # describe's contiguous copies, alive until the C call
            if native.count(rec.native, *rec._native_at, [native.describe(rec._native_cells[mode][slot][0], routed,
                                                                          norm, hold=hold)
                                                          for mode, slot, routed, norm in batch]):
                return
        self._layouts.count(batch, n)
