"""From a real model to the analyses: a tiny HF Mixtral under probes.attach(tokens=1.0)."""
from __future__ import annotations

import pytest

import chrono
from chrono.analysis import Scope, analyze
from chrono.analysis.base import experts_per_layer
from chrono.analysis.coactivation import _by_blocks, coactivation_matrix


@pytest.fixture(scope="module")
def probed_root(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import probes

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=32)
    model = transformers.MixtralForCausalLM(cfg).eval()
    root = tmp_path_factory.mktemp("probed") / "store"
    with probes.attach(model, run="mixtral", root=root, tokens=1.0) as h, torch.no_grad():
        for _ in range(3):
            model(input_ids=torch.randint(0, 64, (2, 16)))
            h.step()
    return root


def test_probe_rows_take_the_block_path_and_agree_with_sql(probed_root):
    con = chrono.connect(probed_root)
    scope = Scope("mixtral")
    assert _by_blocks(con, scope, experts_per_layer(con, "mixtral")) is not None  # rows in token blocks
    fast, sql = coactivation_matrix(con, scope), coactivation_matrix(con, scope, fast=False)
    for layer in fast:
        assert (fast[layer]["both"] == sql[layer]["both"]).all()
        assert fast[layer]["tokens"] == sql[layer]["tokens"] == 3 * 2 * 16


def test_every_token_matches_across_layers_at_tokens_1(probed_root):
    res = analyze(chrono.connect(probed_root), "transitions", Scope("mixtral"))
    (s,) = res.summary.values()
    assert s["matched_tokens"] == 3 * 2 * 16 and s["matched_share"] == 1.0
    voc = analyze(chrono.connect(probed_root), "vocabulary", Scope("mixtral"))
    assert voc.table.num_rows > 0 and voc.table.column("token_id").null_count == 0
