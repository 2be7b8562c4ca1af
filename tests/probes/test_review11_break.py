"""Review 11 (hostile): where a count lands when routing happens outside any top-level forward
the handle saw start, under the forward rule (``steps="auto"`` before training, ``"forward"``).
Every test runs with both counting backends (``tests/probes/conftest.py``). Ground truth: the
test's own forward hooks on the routers (registered before probes attach), counted with NumPy
(``staging_review.count``), one truth step per top-level forward.
"""
from __future__ import annotations

import pytest
import torch

import chrono
import probes
from probes.staging import STAGED

from . import probe_models as T
from .field_truth import capture, count as field_count, stored as field_stored
from .staging_review import D, IDS, K, MoE, Router, count, diff, stored, truth_hooks

pytestmark = pytest.mark.usefixtures("backend")

CONTEXTS = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "grad": torch.enable_grad}


def left_padded(seq: int, pads: tuple, seed: int) -> tuple:
    """``(ids, mask)`` ``[len(pads), seq]``: row ``b`` left-padded by ``pads[b]`` (id 0, mask 0)."""
    ids = torch.randint(1, T.VOCAB, (len(pads), seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for b, n in enumerate(pads):
        mask[b, :n] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.mark.parametrize("rule", ["auto", "forward"])
@pytest.mark.parametrize("ctx", list(CONTEXTS))
def test_attach_during_a_forward_makes_its_rest_a_step_of_its_own(store_root, rule, ctx):
    """``probes.attach`` called from a hook inside a running forward (router 0's): the rest of
    that forward (routers 1, 2) is counted, outside any forward the handle saw start; it must
    not be merged into the next forward's step (an inference step is one top-level forward).
    Was: the partial forward and the next forward stored as one step (84 tokens per router at
    step 0 instead of 42), and every later step number one behind the forwards."""
    model = MoE([Router() for _ in range(3)])
    model.eval()
    calls = truth_hooks(model)
    box: dict = {}

    def attach_now(module, args, out):
        if "h" not in box:
            box["h"] = probes.attach(model, run="mid", root=store_root, flush_every=2, steps=rule)

    model.routers[0].register_forward_hook(attach_now)
    truth = []
    for i in range(4):
        del calls[:]
        with CONTEXTS[ctx]():
            model(IDS)
        c = count(calls)
        truth.append({k: v for k, v in c.items() if k[0] != 0} if i == 0 else c)   # router 0 ran before
    box["h"].detach()
    assert sum(t for t, _ in truth[0].values()) == 2 * IDS.numel() * 2
    assert diff(truth, stored(store_root, "mid")) == []
    assert box["h"].stats()["faults"] == 0


@pytest.mark.parametrize("rule", ["auto", "forward"])
def test_a_router_called_by_hand_before_the_first_forward_is_not_merged_into_it(store_root, rule):
    """A router called by hand right after attach, before any forward (a warm-up, a probe of the
    router): its step is not the first forward's; each forward after it is a step of its own."""
    model = MoE([Router() for _ in range(3)])
    calls = truth_hooks(model)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    truth = []
    with probes.attach(model, run="hand", root=store_root, flush_every=3, steps=rule) as h, torch.no_grad():
        model.routers[1](x)
        truth.append(count(calls))
        for _ in range(3):
            del calls[:]
            model(IDS)
            truth.append(count(calls))
    assert diff(truth, stored(store_root, "hand")) == []
    assert h.stats()["faults"] == 0


# bool 4-D masks (sdpa), float additive ones (eager); Qwen2-MoE and GPT-OSS get a dict of them per
# layer type ({"full_attention": mask}), GPT-OSS has no sdpa
@pytest.mark.parametrize("family, attn, ctx", [("mixtral", "sdpa", "no_grad"), ("mixtral", "eager", "inference_mode"),
                                               ("qwen2_moe", "sdpa", "inference_mode"), ("gpt_oss", "eager", "no_grad")])
def test_generate_with_a_static_cache_excludes_left_padding(store_root, family, attn, ctx):
    """``generate(..., cache_implementation="static")`` hands the model a 4-D attention mask
    ``[B, 1, S, max_cache_len]`` (bool for sdpa, additive float for eager attention; a dict of
    them per layer type for models with sliding-window layers) and the cache as ``cache=``,
    never the 2-D mask: the left padding of the prompt must still be
    excluded (and counted apart in ``probes.padding_excluded``), as with the default dynamic
    cache. Was: 36 assignments stored per layer at the prefill instead of 24 (6 pads x top-2
    counted), no padding signal. Truth: the routers' own outputs; pads from the 2-D mask the
    test passed (prefill), every decode token real."""
    m = getattr(T, family)().eval()
    m.set_attn_implementation(attn)
    ids, mask = left_padded(6, (0, 2, 4), seed=0)
    with probes.attach(m, run="static", root=store_root) as h, CONTEXTS[ctx]():
        truth = capture(m, lambda: m.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                              pad_token_id=0, eos_token_id=None, cache_implementation="static"))
    got = field_stored(store_root, "static")
    for layer in (0, 1):
        calls = truth[layer]
        assert len(calls) == 3 and calls[0].shape[0] == 18                # prefill, then 2 decode steps
        keep = [mask.reshape(-1).numpy().astype(bool)] + [None] * 2
        for step, idx in enumerate(calls):
            want = field_count([idx], 6, None if keep[step] is None else [keep[step]])
            mode = "INFER" if ctx == "inference_mode" else "EVAL"
            assert got[(step, mode, layer)].tolist() == want.tolist()
    assert want.sum() == 6 and field_count([calls[0]], 6, [keep[0]]).sum() == 24
    pads = chrono.connect(store_root).execute(
        "SELECT step, layer, value FROM signals WHERE run_id = 'static' AND name = 'probes.padding_excluded' "
        "ORDER BY ALL").fetchall()
    assert pads == [(0, 0, 12.0), (0, 1, 12.0)]
    assert h.stats()["faults"] == 0


class TrainingOnlyInPlace(MoE):
    """Changes each router's weights in place after it returned, in training only (an in-place
    dropout / scaling of the gate weights, ``nn.Dropout(inplace=True)`` style): a forward in
    eval mode shows the router clean on probation, a training forward does not."""

    def forward(self, input_ids):
        x = self.emb(input_ids).reshape(-1, D)
        for i in self.order:
            _, w, idx = self.routers[i](x)[:3]
            if self.training:
                w.mul_(0.9)
            x = x + (w[..., None] * self.table[idx]).sum(1)
        return x.sum()


@pytest.mark.parametrize("first", ["no_grad_eval", "inference_then_no_grad_eval"])
def test_a_router_judged_clean_in_eval_mode_loses_no_training_call(store_root, first):
    """Probation judged the routers clean in an evaluation forward (no in-place change there);
    the training forwards that follow change the weights in place. Every call must still be
    counted, tokens and the weights the router returned. Was: the first training step's calls
    were dropped at the flush (3 faults, 0 tokens stored for step 1); the router is then
    counted at once. Truth: the test's own router hooks (the weights as returned)."""
    model = TrainingOnlyInPlace([Router() for _ in range(3)])
    calls = truth_hooks(model)
    truth = []
    with probes.attach(model, run="mode", root=store_root, steps="manual", flush_every=2) as h:
        for s in range(4):
            del calls[:]
            if s == 0 or (s == 1 and first == "inference_then_no_grad_eval"):
                model.eval()
                with (torch.inference_mode() if s == 0 and first != "no_grad_eval" else torch.no_grad()):
                    model(IDS)
            else:
                model.train()
                model(IDS).backward()
            truth.append(count(calls))
            h.step()
    assert all(sum(t for t, _ in step.values()) == 3 * IDS.numel() * K for step in truth)
    assert diff(truth, stored(store_root, "mode")) == []
    assert h.stats()["faults"] == 0


@pytest.mark.slow   # continuous batching starts a manager thread: ~12 s a run here
def test_continuous_batching_counts_every_token(store_root):
    """``generate_batch`` (continuous batching, a paged cache) packs the sequences into one row
    with a 4-D mask whose keys sit in each sequence's own cache blocks, with ``cu_seq_lens_*``:
    no token there is padding, and none may be dropped by reading the mask's diagonal as if keys
    were laid out by position (what the first 4-D mask reading of this review did: 60 of 84
    assignments stored). Truth: the routers' own outputs, every token counted."""
    from transformers import GenerationConfig

    m = T.mixtral().eval()
    config = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0,
                              num_blocks=8, block_size=16, max_batch_tokens=32)
    with probes.attach(m, run="cb", root=store_root) as h:
        truth = capture(m, lambda: m.generate_batch(inputs=[[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]],
                                                     generation_config=config))
    got = field_stored(store_root, "cb")
    for layer in (0, 1):
        want = field_count(truth[layer], 6)
        assert want.sum() == 2 * (12 + 3 * 3)   # 12 prompt tokens, then 3 decode steps of 3 (top-2)
        have = sum((v for (s, mode, l), v in got.items() if l == layer), start=0 * want)
        assert have.tolist() == want.tolist()
    assert h.stats()["faults"] == 0


@pytest.mark.parametrize("how", ["beam", "sample_nrs", "no_cache"])
@pytest.mark.parametrize("ctx", ["no_grad", "inference_mode"])
def test_generate_with_left_padding_every_forward_is_a_step_of_real_tokens(store_root, how, ctx):
    """Review 11, no fault found: ``generate`` with a left-padded prompt by beam search (the batch
    expanded to batch x beams), sampling with ``num_return_sequences``, and ``use_cache=False``
    (every forward re-reads the whole sequence and its 2-D mask): one step per forward, the
    padding of each forward excluded. Truth: the routers' own outputs, and the 2-D mask each
    forward received (the test's own pre-hook on the model), counted with NumPy."""
    m = T.mixtral().eval()
    ids, mask = left_padded(7, (0, 3, 5), seed=3)
    masks: list = []
    hk = m.register_forward_pre_hook(lambda mod, a, kw: masks.append((kw["attention_mask"], kw["input_ids"].shape[1])),
                                     with_kwargs=True)
    kw = {"beam": dict(num_beams=3, do_sample=False), "sample_nrs": dict(do_sample=True, top_k=5, num_return_sequences=2),
          "no_cache": dict(do_sample=False, use_cache=False)}[how]
    torch.manual_seed(0)
    with probes.attach(m, run="gen", root=store_root) as h, CONTEXTS[ctx]():
        truth = capture(m, lambda: m.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0,
                                              eos_token_id=None, **kw))
    hk.remove()
    got = field_stored(store_root, "gen")
    mode = "INFER" if ctx == "inference_mode" else "EVAL"
    assert len(masks) == 4 and sorted({s for s, _, _ in got}) == [0, 1, 2, 3]
    for layer in (0, 1):
        for step, (idx, (am, s)) in enumerate(zip(truth[layer], masks)):
            keep = (am[:, -s:] != 0).reshape(-1).numpy()
            assert keep.shape[0] == idx.shape[0]
            assert got[(step, mode, layer)].tolist() == field_count([idx], 6, [keep]).tolist()
    assert field_count([truth[0][0]], 6, [(masks[0][0] != 0).reshape(-1).numpy()]).sum() < truth[0][0].numel()  # pads seen
    assert h.stats()["faults"] == 0


@pytest.mark.parametrize("tokens", [0.0, 1.0])
def test_a_model_offloaded_by_accelerate_is_counted(store_root, tokens):
    """Big-model inference: ``accelerate.cpu_offload`` (as ``from_pretrained(device_map=...)``
    with CPU or disk offload) leaves the parameters on the ``meta`` device between forwards and
    loads them around each module's call. Attached then, every router call must be counted
    (and its tokens sampled) on the device the routers really run on. Was: the recorder's
    buffers were allocated on ``meta``: every call a fault, nothing stored. Truth: the routers'
    own outputs, one step per forward."""
    accelerate = pytest.importorskip("accelerate")
    m = T.mixtral().eval()
    accelerate.cpu_offload(m, execution_device=torch.device("cpu"))
    assert next(m.parameters()).device.type == "meta"
    ids, mask = left_padded(5, (0, 2, 0), seed=4)
    with probes.attach(m, run="offload", root=store_root, tokens=tokens) as h, torch.no_grad():
        truth = capture(m, lambda: [m(input_ids=ids, attention_mask=mask) for _ in range(2)])
    got = field_stored(store_root, "offload")
    keep = mask.reshape(-1).numpy().astype(bool)
    for layer in (0, 1):
        for step, idx in enumerate(truth[layer]):
            assert got[(step, "EVAL", layer)].tolist() == field_count([idx], 6, [keep]).tolist()
    assert h.stats()["faults"] == 0
    if tokens:
        n = chrono.connect(store_root).execute("SELECT count(*) FROM tokens WHERE run_id = 'offload'").fetchone()[0]
        assert n == 2 * 2 * int(keep.sum()) * 2   # steps x layers x real tokens x top-2


@pytest.mark.parametrize("ctx", ["no_grad", "grad"])
@pytest.mark.parametrize("tokens", [0.0, 1.0])
def test_a_dry_run_on_meta_loses_nothing_after_it(store_root, ctx, tokens):
    """A model built on ``meta`` (``init_empty_weights``), attached, run once on meta tensors (a
    shape or FLOP-count dry run: no data, nothing to count), then materialised and loaded: every
    real forward after it must be counted. Was: the recorder followed the dry run's outputs to
    ``meta`` and stayed there: every later call a fault, nothing stored. Truth: the routers' own
    outputs after the load; the dry run's step holds nothing."""
    real = MoE([Router() for _ in range(3)])
    model = MoE([Router() for _ in range(3)]).to("meta")
    h = probes.attach(model, run="dry", root=store_root, steps="manual", tokens=tokens)
    with CONTEXTS[ctx]():
        model(IDS.to("meta"))
    h.step()
    model.to_empty(device="cpu")
    model.load_state_dict(real.state_dict())
    calls = truth_hooks(model)
    truth = [{}]
    for _ in range(2):
        del calls[:]
        with CONTEXTS[ctx]():
            model(IDS)
        truth.append(count(calls))
        h.step()
    h.detach()
    assert diff(truth, stored(store_root, "dry")) == []
    assert h.stats()["faults"] == 0


def test_a_dry_run_on_meta_after_routers_are_staged(store_root, backend):
    """The meta dry run after real training forwards, when the routers' calls are staged by
    reference (not on probation): the hot path does not test for meta (that read cost ~8 us a
    call in situ); the flush drops the staged meta calls. Truth: the routers' own outputs; the dry
    run's step holds nothing, the routers stay staged, no fault."""
    real = MoE([Router() for _ in range(3)])
    model = MoE([Router() for _ in range(3)])
    model.load_state_dict(real.state_dict())
    calls: list = []   # the routers' own outputs, as truth_hooks keeps them (meta calls: no data)
    for i, r in enumerate(model.routers):
        r.register_forward_hook(lambda m, a, out, i=i: None if out[2].is_meta else calls.append(
            (i, out[2].detach().clone().long(), out[1].detach().clone().double(), True)))
    truth = []
    with probes.attach(model, run="dry2", root=store_root, steps="manual") as h:
        for _ in range(2):
            del calls[:]
            model(IDS).backward()
            truth.append(count(calls))
            h.step()
        stage = h._window.rec.stage
        assert stage.state == [STAGED] * 3          # the next calls are staged by reference
        model.to("meta")
        model(IDS.to("meta")).backward()             # the dry run, in training, with grad
        truth.append({})
        h.step()
        assert stage.state == [STAGED] * 3          # not made eager by the meta calls
        model.to_empty(device="cpu")
        model.load_state_dict(real.state_dict())
        del calls[:]
        model(IDS).backward()
        truth.append(count(calls))
        h.step()
    assert diff(truth, stored(store_root, "dry2")) == []
    assert h.stats()["faults"] == 0


class Classifier(torch.nn.Module):
    """A user's head over a transformers backbone, calling it positionally (common in user code)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(32, 2)

    def forward(self, input_ids, attention_mask):
        return self.head(self.backbone(input_ids, attention_mask).last_hidden_state[:, -1])


@pytest.mark.parametrize("how", ["base_model", "user_head"])
def test_an_attention_mask_passed_positionally_excludes_padding(store_root, how):
    """The stack (the module whose forward takes ``input_ids``) called with its arguments by
    position, ``backbone(input_ids, attention_mask)``: attached to the base model itself, or to a
    user's head around it. The mask must be read as if given by name. Was: only the keyword
    was read, so padding was counted (72 assignments instead of 48, no padding signal). Truth:
    the routers' own outputs and the test's mask."""
    base = T.mixtral().model.eval()
    model = base if how == "base_model" else Classifier(base).eval()
    ids, mask = left_padded(6, (0, 2, 4), seed=5)
    with probes.attach(model, run="pos", root=store_root) as h, torch.no_grad():
        truth = capture(base, lambda: model(ids, mask))
    got = field_stored(store_root, "pos")
    keep = mask.reshape(-1).numpy().astype(bool)
    for layer in (0, 1):
        assert got[(0, "EVAL", layer)].tolist() == field_count(truth[layer], 6, [keep]).tolist()
    pads = chrono.connect(store_root).execute("SELECT sum(value) FROM signals WHERE run_id = 'pos' AND "
                                              "name = 'probes.padding_excluded'").fetchone()[0]
    assert pads == 2 * 6 * 2   # 6 padding tokens x top-2, 2 layers
    assert h.stats()["faults"] == 0
