"""A newcomer's walk through docs/integrations.md with a real transformers.Trainer."""
from __future__ import annotations

import logging

import torch
from torch.utils.data import Dataset


class _Bytes(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        t = torch.randint(1, 64, (8,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": t, "labels": t}


def test_a_dense_model_is_one_log_line_and_training_runs(tmp_path, caplog):
    # docs/integrations.md, `strict`: "default: one error line in the log, training runs without
    # telemetry". The line was six: the ProbeError text (reason, candidate modules, a RouterSpec
    # example over four lines) went into the log as it was. It is one line now, same words.
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from chrono.integrations.transformers import ChronoCallback

    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=2,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    cb = ChronoCallback(run="dense", root=tmp_path / "store")
    with caplog.at_level(logging.ERROR):
        Trainer(model=dense, args=args, train_dataset=_Bytes(), callbacks=[cb]).train()
    ours = [r for r in caplog.records if "not recording routing" in r.getMessage()]
    assert len(ours) == 1
    msg = ours[0].getMessage()
    assert "\n" not in msg
    assert "no MoE router found in LlamaForCausalLM" in msg
    assert "model.layers.0.mlp.gate_proj (Linear)" in msg and "RouterSpec(" in msg   # the guidance kept
    assert cb.last_health in (None, {})
