"""Router calls of a forward, counted together when it ends: one batch of device ops per forward.

Counting each router call on its own costs ~7 device ops per call (``Recorder.record``);
on small shapes the per-op dispatch (or, on CUDA, kernel launch) overhead is the whole
cost, and a DeepSeek-V3-sized model makes 61 calls per forward. ``Stage.add`` instead keeps
a *reference* to the call's ``Routed`` (no device op) and reads one version counter;
``flush`` (when the top-level forward ends, and before anything reads the step's counts)
counts every staged call at once, with the bookkeeping of all calls in one tight loop:

    col  = cat(indices, -1 per logits) clamped to [-1, capacity] + base    3 ops
    src  = [1 per assignment, 0 per logits; cat(weights, ‖logits‖₂)]       3 ops
           (``torch._foreach_norm`` over all logits: one dispatch; then a stack)
    acc[tokens, weight] .index_add_(col, src)                              1 op

writing the cells ``Recorder.record`` writes: tokens and weight sums per (mode, router,
expert). A call's logits norm lands in the weight cell of column 0 (the column of negative
indices, whose weight sum nothing reads) and adds 0 tokens: it only flags non-finite logits
(an L2 norm is non-finite exactly when some logit is, up to overflow past the float range),
like the eager path's logit sum. The eager path, still used under ``torch.compile``, for
padding masks and capacity drops, mixes with this one in any order (float64 sums of
integers are exact). SGLang's expert-distribution recorder has the same shape
(python/sglang/srt/eplb/expert_distribution.py: each layer writes its top-k ids into a
preallocated buffer, counted once per forward pass); here the per-layer write is gone too.

A reference is only safe while nobody changes the tensor in place. Each router slot
therefore starts *on probation*: its calls are counted eagerly, and its first one is
watched (indices, weights and logits): by ``Tensor._version`` (decided when the forward
ends), or, for inference tensors (they have no version counter), by comparing them with
copies on the device (read when the forward ends on CPU, at the next window close on CUDA,
where the host waits for the device anyway). If the model changed any of them in place
before the forward ended (e.g. ``weights /= weights.sum(-1, keepdim=True)`` after the
router) the slot stays eager for good, otherwise it is staged from then on. After that,
every staged call's indices version is checked at the flush: a call changed in place
anyway is not counted (its values are no longer the router's), a telemetry fault, and the
slot goes back to eager. Weights and logits are trusted after probation, as are inference
tensors. Nothing here reads a value on the host, except the CPU verdict above.

Memory: staged references keep tensors the forward made alive until it ends, bounded by
``MAX_LOGITS`` logits (a fuller stage is flushed first: 64 MiB of float32 logits, e.g. 16
DeepSeek-V3 layers of 4096 tokens). A flush counts at most ``MAX_ASSIGNMENTS`` top-k
assignments per batch. Per distinct forward layout (the (mode, router, assignments) of each
call; training repeats one), for the last ``_LAYOUTS``: three int64 vectors (raw indices,
column bases, columns) and a float64 ``[2, N]`` source for its ``N`` assignments, 40 bytes
per assignment (20 MiB at the bound).
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from chrono.schema import MODES

from .routing import Routed

MAX_ASSIGNMENTS = 1 << 19   # (token, k) assignments counted by one index_add_
MAX_LOGITS = 1 << 24        # logits (elements) kept alive by the stage before an early flush
PROBATION, STAGED, EAGER = 0, 1, 2
INFER = MODES.index("INFER")
_LAYOUTS = 8                # forward layouts whose column bases and sources are kept


def _version(t) -> int:
    """``t``'s in-place version counter; -1 for None or an inference tensor (it has none)."""
    return -1 if t is None or t.is_inference() else t._version


def _on(device: torch.device, values: list[int]) -> torch.Tensor:
    """A small long tensor on ``device`` without a host sync (pinned, non-blocking on CUDA)."""
    t = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class Stage:
    """The staged router calls of one recorder (see the module docstring).

    ``rec``: the ``probes.recorder.Recorder`` whose ``acc`` a flush adds to (its ``record``
    counts what cannot be staged); ``faults``: a ``probes.faults.Faults`` (or None) told
    about staged calls changed in place.
    """

    def __init__(self, rec, faults=None):
        self.rec, self.faults = rec, faults
        self.state = [PROBATION] * rec.n_slots
        self.calls: list = []        # (mode, slot, Routed, indices version or -1)
        self.nl = 0                  # staged logits (elements)
        self.watch: list = []        # probation calls: (slot, (indices, weights, logits), versions, copies)
        self._watched: set = set()   # slots watched, verdict not in yet
        self.verdicts: dict = {}     # slot -> 0-d bool on the device: changed in place
        self._layouts: OrderedDict = OrderedDict()

    def reset(self) -> None:
        """The recorder's buffers were reallocated (grown, moved): column bases change."""
        self._layouts.clear()

    def add(self, mode: int, slot: int, routed: Routed) -> bool:
        """Stage one router call; False if it must be counted eagerly (``Recorder.record``),
        in which case a probation call is also watched for in-place changes."""
        state = self.state[slot]
        if state != STAGED:
            if state == PROBATION and slot not in self._watched:
                self._watch(slot, routed)
            return False
        logits = routed.logits
        if logits is not None:
            nl = logits.numel()
            if self.nl + nl > MAX_LOGITS:
                self.flush()
                if nl > MAX_LOGITS:
                    return False
            self.nl += nl
        # under inference mode the outputs are inference tensors: no version counter
        self.calls.append((mode, slot, routed, -1 if mode == INFER else routed.indices._version))
        return True

    def _watch(self, slot: int, routed: Routed) -> None:
        self._watched.add(slot)
        tensors = (routed.indices, routed.weights, routed.logits)
        versions = tuple(_version(t) for t in tensors)
        copies = None if versions[0] >= 0 else tuple(None if t is None else t.clone() for t in tensors)
        self.watch.append((slot, tensors, versions, copies))

    def flush(self) -> None:
        """Count every staged call into ``rec.acc``; judge probation. Caller holds the lock."""
        if self.watch:
            self._judge()
        if not self.calls:
            return
        calls, self.calls, self.nl = self.calls, [], 0
        rec = self.rec
        with torch.no_grad():
            batch, n = [], 0
            for mode, slot, routed, v in calls:
                indices = routed.indices
                if v >= 0 and indices._version != v:
                    self._changed(slot)
                    continue
                m = indices.numel()
                if m > MAX_ASSIGNMENTS:
                    self._eager(mode, slot, routed)
                    continue
                if n + m > MAX_ASSIGNMENTS:
                    self._count_or_eager(batch, n)
                    batch, n = [], 0
                batch.append((mode, slot, routed, m))
                n += m
            if batch:
                self._count_or_eager(batch, n)

    def _count_or_eager(self, batch: list, n: int) -> None:
        """``_count``; if it fails before writing (a call on another device than the
        recorder: ``torch.cat`` refuses), count each call eagerly instead."""
        try:
            self._count(batch, n)
        except RuntimeError:
            for mode, slot, routed, _ in batch:
                self._eager(mode, slot, routed)

    def _eager(self, mode: int, slot: int, routed: Routed) -> None:
        """Count one staged call with ``Recorder.record``, on the recorder's device; its router
        is counted eagerly from now on (the hook then follows it to its device)."""
        self.state[slot] = EAGER
        rec = self.rec
        rec.record(mode, slot, Routed(*(None if t is None else t.to(rec.device) for t in routed)))

    def _changed(self, slot: int) -> None:
        self.state[slot] = EAGER
        if self.faults is not None:
            self.faults.fault(f"router slot {slot}", RuntimeError(
                "the model changed the router's indices in place before its forward ended; that "
                "call is not counted and this router is counted eagerly from now on"))

    def _judge(self) -> None:
        """Probation calls whose forward ended: versions decide now; inference tensors (no
        version counter) are compared with their copies on the device, read at ``settle``."""
        watch, self.watch = self.watch, []
        with torch.no_grad():
            for slot, tensors, versions, copies in watch:
                if copies is None:
                    changed = any(v >= 0 and t._version != v for t, v in zip(tensors, versions))
                    if self.state[slot] == PROBATION:
                        self.state[slot] = EAGER if changed else STAGED
                    self._watched.discard(slot)
                    continue
                verdict = None   # NaN != NaN: a NaN keeps the router eager (safe)
                for t, c in zip(tensors, copies):
                    if t is not None:
                        v = (t != c).any()
                        verdict = v if verdict is None else verdict | v
                self.verdicts[slot] = verdict
        if self.rec.device.type == "cpu":   # reading a CPU tensor waits for nothing: settle now
            self.settle()

    def settle(self) -> None:
        """Read the device verdicts of inference probation (on CUDA at window close, where the
        host waits for the device anyway; on CPU when the forward ends)."""
        if not self.verdicts:
            return
        verdicts, self.verdicts = self.verdicts, {}
        slots = list(verdicts)
        for slot, changed in zip(slots, torch.stack([verdicts[s] for s in slots]).tolist()):
            if self.state[slot] == PROBATION:
                self.state[slot] = EAGER if changed else STAGED
            self._watched.discard(slot)

    def _layout(self, batch: list, n: int) -> tuple:
        """Buffers of one layout (``j`` of its calls have logits), cached:

        ``raw [n + j]`` int64: a flush writes the indices into ``raw[:n]``; ``raw[n:]`` stays
        -1 (the raw index of a logits norm: column 0). ``base [n + j]`` int64: the column base
        of each entry. ``col [n + j]`` int64: the columns a flush computes. ``src [2, n + j]``
        float64: row 0 is 1 per assignment and 0 per norm; a flush writes row 1.
        """
        key = tuple((mode, slot, m, routed.logits is not None) for mode, slot, routed, m in batch)
        hit = self._layouts.get(key)
        if hit is not None:
            self._layouts.move_to_end(key)
            return hit
        rec = self.rec
        width = rec.capacity + 2
        bases = [(mode * rec.n_slots + slot) * width + 1 for mode, slot, _, _ in key]
        sizes = [m for _, _, m, _ in key]
        norm_bases = [b for b, (_, _, _, has) in zip(bases, key) if has]
        j = len(norm_bases)
        with torch.inference_mode(False):   # written in place by later flushes in any mode
            base = torch.repeat_interleave(_on(rec.device, bases + norm_bases),
                                           _on(rec.device, sizes + [1] * j), output_size=n + j)
            raw = torch.full((n + j,), -1, dtype=torch.int64, device=rec.device)
            src = torch.ones((2, n + j), dtype=torch.float64, device=rec.device)
            src[0, n:] = 0
            hit = self._layouts[key] = (raw, base, torch.empty_like(raw), src)
        if len(self._layouts) > _LAYOUTS:
            self._layouts.popitem(last=False)
        return hit

    def _count(self, batch: list, n: int) -> None:
        rec = self.rec
        raw, base, col, src = self._layout(batch, n)
        calls = [routed for _, _, routed, _ in batch]
        k = calls[0].indices.shape[-1]
        if all(r.indices.dim() == 2 and r.indices.shape[1] == k and r.weights is not None
               and r.weights.shape == r.indices.shape for r in calls):
            # [T, k] tensors concatenate along tokens straight into flat buffers: no reshapes
            torch.cat([r.indices for r in calls], out=raw[:n].view(-1, k))
            torch.cat([r.weights for r in calls], out=src[1, :n].view(-1, k))
        else:
            torch.cat([r.indices.reshape(-1) for r in calls], out=raw[:n])
            torch.cat([r.weights.reshape(-1) if r.weights is not None
                       else r.indices.new_zeros(m, dtype=torch.float64)
                       for (_, _, r, m) in batch], out=src[1, :n])
        logits = [r.logits for r in calls if r.logits is not None]
        if logits:   # each logits norm goes to the weight cell of column 0 of its router
            torch.stack(torch._foreach_norm(logits), out=src[1, n:])
        raw[:n].clamp_(-1, rec.capacity)
        torch.add(raw, base, out=col)
        rec.tw_cells.index_add_(1, col, src)
