"""ChronoCallback on a real lightning.Trainer (tiny random Qwen3-MoE, CPU, offline)."""
import glob

import pytest
import torch

L = pytest.importorskip("lightning")
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

import chrono  # noqa: E402
from chrono.integrations.lightning import ChronoCallback  # noqa: E402

from .tiny import (LAYERS, RouterTruth, TokenData, assert_health_tags, qwen3_moe, stored_counts,  # noqa: E402
                   tensorboard_scalars)

ACC, STEPS, BATCH, VAL_EVERY = 2, 12, 2, 4   # validation every VAL_EVERY optimizer steps


class LM(L.LightningModule):
    def __init__(self, seed=0):
        super().__init__()
        self.model = qwen3_moe(seed)

    def training_step(self, batch, i):
        return self.model(**batch).loss

    def validation_step(self, batch, i):
        self.log("val_loss", self.model(**batch).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(TokenData(STEPS * ACC * BATCH * 2), batch_size=BATCH)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(TokenData(2 * BATCH, seed=1), batch_size=BATCH)


class TrainerSpy(Callback):
    trainer = None

    def on_fit_start(self, trainer, pl_module):
        self.trainer = trainer


def _truth(lm, spy):
    # TRAIN micro-batches of the update that makes global_step == N are step N; validation after
    # update N is step N (EVAL). Sanity-check validation is not recorded (probes attach at train start).
    def key(m):
        if spy.trainer.sanity_checking:
            return (None, "SANITY")
        return (spy.trainer.global_step + 1, "TRAIN") if m.training else (spy.trainer.global_step, "EVAL")
    return RouterTruth(lm.model, key)


def _trainer(tmp, callbacks, max_steps=STEPS, **kw):
    opts = dict(max_steps=max_steps, accumulate_grad_batches=ACC, accelerator="cpu", devices=1,
                val_check_interval=VAL_EVERY * ACC, limit_val_batches=2, log_every_n_steps=VAL_EVERY,
                logger=TensorBoardLogger(str(tmp), name="tb"), enable_progress_bar=False,
                enable_model_summary=False, callbacks=callbacks, default_root_dir=str(tmp))
    return L.Trainer(**{**opts, **kw})


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("lightning")
    lm, spy, cb = LM(), TrainerSpy(), ChronoCallback(root=tmp / "store")
    truth = _truth(lm, spy)
    _trainer(tmp, [spy, cb], enable_checkpointing=False, num_sanity_val_steps=1).fit(lm)
    truth.remove()
    return dict(tmp=tmp, cb=cb, truth=truth)


def test_steps_are_optimizer_steps_and_counts_equal_truth(fitted):
    cb, truth = fitted["cb"], fitted["truth"]
    assert cb.run_id == "tb-version_0" and cb.handle is None
    stored = stored_counts(fitted["tmp"] / "store", cb.run_id)
    expected = {k: v for k, v in truth.counts.items() if k[1] != "SANITY"}
    assert any(k[1] == "SANITY" for k in truth.counts)   # sanity validation ran, and is not stored
    assert stored == expected
    train_steps = sorted({s for s, m, *_ in stored if m == "TRAIN"})
    assert train_steps == list(range(1, STEPS + 1))
    assert all(truth.calls[(s, "TRAIN")] == ACC for s in train_steps)
    assert sorted({s for s, m, *_ in stored if m == "EVAL"}) == list(range(VAL_EVERY, STEPS + 1, VAL_EVERY))


def test_health_is_logged_through_lightning_loggers(fitted):
    ea = tensorboard_scalars(fitted["tmp"] / "tb")
    assert_health_tags(ea)
    neff = ea.Scalars("chrono/neff/layer_1")
    assert len(neff) == STEPS // VAL_EVERY
    assert neff[-1].value == pytest.approx(fitted["cb"].last_health["chrono/neff/layer_1"], rel=1e-6)


def test_ckpt_resume_is_one_run_without_gap_or_duplicate(tmp_path):
    torch.set_num_threads(1)
    root = tmp_path / "store"
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=6, save_top_k=-1)

    class Crash(Callback):
        def on_train_batch_end(self, trainer, *a):
            if trainer.global_step == 9:
                raise RuntimeError("simulated crash")

    cb = ChronoCallback(root=root, flush_every=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _trainer(tmp_path, [cb, ckpt, Crash()], num_sanity_val_steps=0).fit(LM())
    assert cb.handle is None   # on_exception detached
    run = cb.run_id
    crashed = stored_counts(root, run)
    assert max(s for s, *_ in crashed) == 9
    path = glob.glob(str(tmp_path / "ckpt" / "*step=6*.ckpt"))[0]

    lm, spy, cb2 = LM(seed=1), TrainerSpy(), ChronoCallback(root=root, flush_every=1)
    truth = _truth(lm, spy)
    _trainer(tmp_path, [spy, cb2], num_sanity_val_steps=0, enable_checkpointing=False).fit(lm, ckpt_path=path)
    truth.remove()
    assert cb2.run_id == run and chrono.store.list_runs(root) == [run]
    final = stored_counts(root, run)
    assert sorted({s for s, *_ in final}) == list(range(1, STEPS + 1))
    assert {k: v for k, v in final.items() if k[0] <= 6} == {k: v for k, v in crashed.items() if k[0] <= 6}
    assert {k: v for k, v in final.items() if k[0] > 6} == truth.counts


def test_governance_and_no_router(tmp_path, caplog):
    import logging

    import transformers

    torch.set_num_threads(1)
    root = tmp_path / "store"
    cb = ChronoCallback(root=root, run="gov", flush_every=2, govern="informed-lens")
    _trainer(tmp_path, [cb], max_steps=4, num_sanity_val_steps=0, enable_checkpointing=False,
             limit_val_batches=0).fit(LM())
    con = chrono.connect(root)
    assert con.execute("SELECT step, layer FROM decisions WHERE run_id = 'gov' ORDER BY ALL").fetchall() \
        == [(s, l) for s in (2, 4) for l in range(LAYERS)]

    class Dense(LM):
        def __init__(self):
            L.LightningModule.__init__(self)
            self.model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
                vocab_size=61, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, intermediate_size=32, max_position_embeddings=32))

    cb = ChronoCallback(root=root)
    tr = _trainer(tmp_path, [cb], max_steps=2, num_sanity_val_steps=0, enable_checkpointing=False,
                  limit_val_batches=0)
    with caplog.at_level(logging.ERROR, logger="chrono.integrations"):
        tr.fit(Dense())
    assert tr.global_step == 2
    assert len([r for r in caplog.records if r.name == "chrono.integrations"]) == 1
    assert chrono.store.list_runs(root) == ["gov"]


def test_validation_in_the_middle_of_an_accumulation_is_stored_at_the_open_step(tmp_path):
    """Review 11: ``val_check_interval`` counted in batches that is not a multiple of
    ``accumulate_grad_batches`` runs validation between two micro-batches of update N + 1
    (``global_step == N``, where Lightning logs it). Its rows cannot go to step N (ended, maybe
    written, when update N + 1's first micro-batch began): they are ``EVAL`` rows at the open
    step N + 1, as docs/integrations.md says. Truth: the routers' own hooks; a validation that
    starts with a micro-batch of the next update already run is keyed N + 1."""
    torch.set_num_threads(1)
    lm, spy, cb = LM(), TrainerSpy(), ChronoCallback(root=tmp_path / "store", flush_every=2)
    state = {"mid": False}

    class Mid(Callback):   # the test's own record of where validation starts
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            state["mid"] = (batch_idx + 1) % ACC != 0

    def key(m):
        if spy.trainer.sanity_checking:
            return (None, "SANITY")
        step = spy.trainer.global_step
        return (step + 1, "TRAIN") if m.training else (step + (1 if state["mid"] else 0), "EVAL")

    truth = RouterTruth(lm.model, key)
    _trainer(tmp_path, [spy, Mid(), cb], max_steps=6, val_check_interval=3, enable_checkpointing=False,
             num_sanity_val_steps=1).fit(lm)
    truth.remove()
    stored = stored_counts(tmp_path / "store", cb.run_id)
    assert stored == {k: v for k, v in truth.counts.items() if k[1] != "SANITY"}
    evals = sorted({s for s, m, *_ in stored if m == "EVAL"})
    assert evals == [2, 3, 5, 6]   # after batches 3, 6, 9, 12: mid-update 2, after 3, mid 5, after 6
