"""ChronoCallback on a real transformers.Trainer (tiny random Qwen3-MoE, CPU, offline)."""
import logging

import pytest
import torch

pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import chrono  # noqa: E402
from chrono.integrations.transformers import ChronoCallback, run_id_from  # noqa: E402

from .tiny import (LAYERS, RouterTruth, TokenData, assert_health_tags, qwen3_moe, stored_counts,  # noqa: E402
                   tensorboard_scalars)

GA, STEPS, EVAL_EVERY, BATCH = 3, 20, 5, 2


class StateSpy(TrainerCallback):
    """Keeps the TrainerState, so the truth hooks know the global step of each forward."""

    state = None

    def on_train_begin(self, args, state, control, **kw):
        self.state = state


def _args(out, **kw):
    base = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=BATCH,
                per_device_eval_batch_size=BATCH, gradient_accumulation_steps=GA,
                eval_strategy="steps", eval_steps=EVAL_EVERY, logging_steps=EVAL_EVERY,
                save_strategy="no", report_to=[], use_cpu=True, learning_rate=1e-3, seed=0,
                disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def _trainer(model, args, *callbacks):
    return Trainer(model=model, args=args, train_dataset=TokenData(STEPS * GA * BATCH),
                   eval_dataset=TokenData(2 * BATCH, seed=1), callbacks=list(callbacks))


def _truth(model, spy):
    # the rule under test, stated independently: the micro-batches that lead to the update that
    # makes global_step == N are step N (TRAIN); an evaluation after update N is step N (EVAL)
    return RouterTruth(model, lambda m: (spy.state.global_step + 1, "TRAIN") if m.training
                       else (spy.state.global_step, "EVAL"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("trainer")
    root = out / "store"
    model = qwen3_moe()
    spy = StateSpy()
    truth = _truth(model, spy)
    cb = ChronoCallback(root=root)
    trainer = _trainer(model, _args(out / "out", report_to=["tensorboard"]), spy, cb)
    trainer.train()
    truth.remove()
    return dict(out=out, root=root, cb=cb, truth=truth, trainer=trainer, model=model)


def test_steps_are_optimizer_steps_and_counts_equal_truth(trained):
    root, cb, truth = trained["root"], trained["cb"], trained["truth"]
    assert cb.run_id == "out" and cb.handle is None   # detached at train end
    stored = stored_counts(root, cb.run_id)
    assert stored == truth.counts
    train_steps = sorted({s for s, m, *_ in stored if m == "TRAIN"})
    assert train_steps == list(range(1, STEPS + 1))
    # gradient accumulation: every stored TRAIN step holds GA micro-batches
    assert all(truth.calls[(s, "TRAIN")] == GA for s in train_steps)
    eval_steps = sorted({s for s, m, *_ in stored if m == "EVAL"})
    assert eval_steps == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    assert eval_steps == [e["step"] for e in trained["trainer"].state.log_history if "eval_loss" in e]


def test_health_reaches_the_trainer_tensorboard_files(trained):
    ea = tensorboard_scalars(trained["out"] / "out")
    assert_health_tags(ea, prefix="train/")
    neff = ea.Scalars("train/chrono/neff/layer_0")
    assert [e.step for e in neff] == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    assert all(1.0 <= e.value <= 6.0 for e in neff)
    assert neff[-1].value == pytest.approx(trained["cb"].last_health["chrono/neff/layer_0"], rel=1e-6)


def test_logged_health_equals_the_stored_window(trained):
    """The last logged values are metrics of steps 16..20, recomputed here from stored counts."""
    from chrono.metrics import summarize

    con = chrono.connect(trained["root"])
    h = trained["cb"].last_health
    for layer in range(LAYERS):
        counts = [r[0] for r in con.execute(
            "SELECT sum(tokens) FROM routing WHERE run_id = ? AND layer = ? AND mode = 'TRAIN' "
            "AND step BETWEEN 16 AND 20 GROUP BY expert ORDER BY expert",
            [trained["cb"].run_id, layer]).fetchall()]
        m = summarize(counts + [0] * (6 - len(counts)))
        assert h[f"chrono/neff/layer_{layer}"] == pytest.approx(float(m.neff), rel=1e-9)
        assert h[f"chrono/dead/layer_{layer}"] == int(m.dead)


def test_resume_from_checkpoint_is_one_run_without_gap_or_duplicate(tmp_path):
    torch.set_num_threads(1)
    root = tmp_path / "store"
    args = _args(tmp_path / "out", save_strategy="steps", save_steps=10, eval_strategy="no",
                 max_steps=STEPS)
    model = qwen3_moe()

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 13:   # after checkpoint-10, steps 11..13 logged, then a crash
                raise RuntimeError("simulated crash")

    chrono.open_run(root, "out").close()   # the default id is taken: this training becomes out-2
    cb = ChronoCallback(root=root, flush_every=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _trainer(model, args, cb, Crash()).train()
    cb.close()
    run = cb.run_id
    assert run == "out-2"
    crashed = stored_counts(root, run)
    assert max(s for s, *_ in crashed) == 13

    model2 = qwen3_moe(seed=1)   # weights come from the checkpoint
    spy = StateSpy()
    truth = _truth(model2, spy)
    cb2 = ChronoCallback(root=root, flush_every=1)
    _trainer(model2, args, spy, cb2).train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-10"))
    truth.remove()
    assert cb2.run_id == run and chrono.store.list_runs(root) == ["out", run]   # id read from the checkpoint
    final = stored_counts(root, run)   # asserts no key is stored twice
    assert sorted({s for s, *_ in final}) == list(range(1, STEPS + 1))
    before = {k: v for k, v in crashed.items() if k[0] <= 10}
    assert {k: v for k, v in final.items() if k[0] <= 10} == before   # the checkpoint's steps kept
    assert {k: v for k, v in final.items() if k[0] > 10} == truth.counts   # 11..20 are the redone ones


def test_fresh_training_with_the_same_output_dir_gets_a_new_run(tmp_path):
    root = tmp_path / "store"
    for _ in range(2):
        cb = ChronoCallback(root=root)
        _trainer(qwen3_moe(), _args(tmp_path / "exp 1", max_steps=2, eval_strategy="no"), cb).train()
    assert chrono.store.list_runs(root) == ["exp-1", "exp-1-2"]


def test_model_without_router_one_error_and_training_runs(tmp_path, caplog):
    transformers_cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=16, num_hidden_layers=1,
                                                num_attention_heads=2, num_key_value_heads=1,
                                                intermediate_size=32, max_position_embeddings=32)
    dense = transformers.LlamaForCausalLM(transformers_cfg)
    cb = ChronoCallback(root=tmp_path / "store")
    with caplog.at_level(logging.ERROR, logger="chrono.integrations"):
        tr = _trainer(dense, _args(tmp_path / "out", max_steps=3, eval_strategy="no"), cb)
        tr.train()
    errors = [r for r in caplog.records if r.name == "chrono.integrations"]
    assert len(errors) == 1 and "router" in errors[0].getMessage()
    assert tr.state.global_step == 3 and cb.handle is None
    assert not (tmp_path / "store").exists() or chrono.store.list_runs(tmp_path / "store") == []

    strict = ChronoCallback(root=tmp_path / "store", strict=True)
    tr = _trainer(dense, _args(tmp_path / "out2", max_steps=3, eval_strategy="no"), strict)
    import probes

    with pytest.raises(probes.ProbeError, match="router"):
        tr.train()
    assert tr.state.global_step == 0   # refused before the first optimizer step
    assert not dense._forward_hooks and not dense._forward_pre_hooks


@pytest.mark.parametrize("name,rid", [("runs/exp 1/", "exp-1"), ("a/b:c", "b-c"), ("///", "trainer"),
                                      ("x" * 200, "x" * 128), ("Ω", "trainer")])
def test_run_id_from_names(name, rid):
    assert run_id_from(name) == rid
    chrono.validate_run_id(rid)


def test_governance_decides_at_every_window_and_replays(tmp_path, capsys):
    from chrono_cli.main import main

    root = tmp_path / "store"
    cb = ChronoCallback(root=root, flush_every=2, govern="informed-lens")
    _trainer(qwen3_moe(), _args(tmp_path / "gov", max_steps=8, eval_strategy="no"), cb).train()
    con = chrono.connect(root)
    rows = con.execute("SELECT step, layer, actuator FROM decisions WHERE run_id = 'gov' "
                       "ORDER BY step, layer").fetchall()
    windows = [r[0] for r in con.execute("SELECT DISTINCT step FROM snapshots WHERE run_id = 'gov' "
                                         "ORDER BY step").fetchall()]
    assert windows == [2, 4, 6, 8]
    assert rows == [(s, l, "informed-lens") for s in windows for l in range(LAYERS)]
    assert cb.governor is None   # removed with the probes at train end
    assert main(["--root", str(root), "replay", "gov"]) == 0
    assert "reproduces all 8 decisions exactly" in capsys.readouterr().out


def test_unwrap_finds_the_module_that_runs():
    from chrono.integrations.common import unwrap

    m = qwen3_moe()
    assert unwrap(torch.compile(m)) is m
    assert unwrap(torch.nn.DataParallel(m)) is m
    assert unwrap(m) is m


CRASH_SCRIPT = r"""
import sys, torch
from transformers import Trainer, TrainerCallback
sys.path.insert(0, sys.argv[2])
from tests.integrations.test_transformers_callback import _args, _trainer
from tests.integrations.tiny import qwen3_moe
from chrono.integrations.transformers import ChronoCallback

class Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 7:
            raise RuntimeError("simulated crash")

torch.set_num_threads(1)
out = sys.argv[1]
_trainer(qwen3_moe(), _args(out + "/out", eval_strategy="no"),
         ChronoCallback(root=out + "/store", flush_every=50), Crash()).train()
"""


@pytest.mark.slow
def test_training_that_raises_still_flushes_and_releases_the_run(tmp_path):
    """The Trainer calls no callback on an exception: the window is flushed at interpreter exit."""
    import os
    import subprocess
    import sys

    repo = os.getcwd()
    p = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(tmp_path), repo], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": repo}, timeout=300)
    assert p.returncode != 0 and "simulated crash" in p.stderr
    stored = stored_counts(tmp_path / "store", "out")
    # steps 1..7 ran (the crash came after update 7), none was flushed by a full window (50)
    assert sorted({s for s, *_ in stored}) == list(range(1, 8))
    with chrono.open_run(tmp_path / "store", "out"):   # the writer lock is free again
        pass


def test_explicit_run_that_already_has_steps_is_refused_before_training(tmp_path):
    root = tmp_path / "store"
    _trainer(qwen3_moe(), _args(tmp_path / "a", max_steps=2, eval_strategy="no"),
             ChronoCallback(run="mine", root=root)).train()
    before = stored_counts(root, "mine")
    tr = _trainer(qwen3_moe(), _args(tmp_path / "b", max_steps=2, eval_strategy="no"),
                  ChronoCallback(run="mine", root=root))
    with pytest.raises(chrono.StoreError, match="mine"):
        tr.train()   # a fresh training would write steps 1, 2 a second time
    assert tr.state.global_step == 0
    assert stored_counts(root, "mine") == before


def test_add_callback_after_construction_still_reaches_the_reporters(tmp_path):
    tr = _trainer(qwen3_moe(), _args(tmp_path / "late", max_steps=EVAL_EVERY, eval_strategy="no",
                                     report_to=["tensorboard"]))
    tr.add_callback(ChronoCallback(root=tmp_path / "store"))   # appended after TensorBoardCallback
    tr.train()
    assert_health_tags(tensorboard_scalars(tmp_path / "late"), prefix="train/")


def test_eval_on_start_is_stored_at_step_zero_where_the_trainer_logs_it(tmp_path):
    """Review 11: ``eval_on_start=True`` evaluates before the first update; the Trainer logs that
    ``eval_loss`` at step 0, so its routing is EVAL rows at step 0 (it was stored at step 1, mixed
    into the first update's step). Windows still end at the logging steps (steps 1-2, 3-4).
    Truth: the routers' own hooks keyed by the Trainer's global step (``_truth``)."""
    torch.set_num_threads(1)
    root = tmp_path / "store"
    model = qwen3_moe()
    spy = StateSpy()
    truth = _truth(model, spy)
    cb = ChronoCallback(root=root, flush_every=2)
    args = _args(tmp_path / "out", max_steps=4, gradient_accumulation_steps=1, eval_on_start=True,
                 eval_steps=2, logging_steps=2)
    trainer = _trainer(model, args, spy, cb)
    trainer.train()
    truth.remove()
    stored = stored_counts(root, cb.run_id)
    assert stored == truth.counts
    evals = sorted({s for s, m, *_ in stored if m == "EVAL"})
    assert evals == [0, 2, 4] == [e["step"] for e in trainer.state.log_history if "eval_loss" in e]
    windows = chrono.connect(root).execute("SELECT DISTINCT window_start, window_end FROM snapshots WHERE "
                                           "run_id = ? AND layer = -1 ORDER BY ALL", [cb.run_id]).fetchall()
    assert windows == [(0, 0), (1, 2), (3, 4)]


@pytest.mark.parametrize("run", [None, "mine"])
def test_auto_find_batch_size_retry_replaces_the_failed_attempt_in_one_run(tmp_path, run):
    """``auto_find_batch_size=True``: an out-of-memory error at step 2 makes the Trainer start
    ``train`` again from step 0 with a smaller batch (no ``on_train_end`` in between). The retry
    redoes steps 1.. of the same training: one run whose steps are the retry's, the failed
    attempt's rows replaced. Was: with the default id the retry became a new run (``out-2``) beside
    the failed attempt's partial run; with an explicit ``run=`` the retry's attach was refused
    (``StoreError``: steps 1, 2 stored already) and the training crashed. Truth: the routers' own
    hooks during the retry."""
    torch.set_num_threads(1)
    root = tmp_path / "store"
    model = qwen3_moe()
    spy = StateSpy()
    attempts = []

    class OOMOnce(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            attempts.append(state.train_batch_size)
            truth.counts.clear()
            truth.calls.clear()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2 and len(attempts) == 1:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    truth = _truth(model, spy)
    cb = ChronoCallback(run=run, root=root)
    args = _args(tmp_path / "out", max_steps=4, gradient_accumulation_steps=1, per_device_train_batch_size=4,
                 eval_strategy="no", auto_find_batch_size=True)
    trainer = Trainer(model=model, args=args, train_dataset=TokenData(32), callbacks=[spy, OOMOnce(), cb])
    trainer.train()
    truth.remove()
    assert len(attempts) == 2 and attempts[1] < attempts[0] == 4   # the Trainer retried with a smaller batch
    assert chrono.store.list_runs(root) == [run or "out"] and cb.run_id == (run or "out")
    stored = stored_counts(root, cb.run_id)
    assert stored == truth.counts
    assert sorted({s for s, *_ in stored}) == [1, 2, 3, 4]
