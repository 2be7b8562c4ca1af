"""Token labels from the manifest: byte-level runs, a local tokenizer.json, and nothing."""
from __future__ import annotations

import json

import chrono
from chrono.analysis.labels import byte_label, token_labeler
from chrono_cli.main import main
from tests.analysis import spec_store


def test_byte_labels():
    assert [byte_label(b) for b in (32, 10, 9, 65, 0, 200)] == ["·", "\\n", "\\t", "A", "\\x00", "\\xc8"]


def test_labeler_from_manifest(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    tok_file = tmp_path / "tokenizer.json"
    Tokenizer(WordLevel({"[UNK]": 0, "expert": 1, "router": 2}, unk_token="[UNK]")).save(str(tok_file))
    root = tmp_path / "s"
    for run, config in (("hf", {"tokenizer": str(tok_file)}), ("bytes", {"byte_level": True}),
                        ("workload", {"workload": {"vocab_size": 256}}), ("plain", {})):
        with chrono.open_run(root, run, config=config) as w:
            w.log_routing(0, 0, [1, 1])
    con = chrono.connect(root)
    assert token_labeler(con, "hf")(2) == "router"
    assert token_labeler(con, "bytes")(101) == "e" and token_labeler(con, "workload")(32) == "·"
    assert token_labeler(con, "plain") is None


def test_cli_vocabulary_shows_text_for_byte_level_runs(tmp_path, capsys):
    spec_store.build(tmp_path / "s")
    assert main(["--root", str(tmp_path / "s"), "analyze", spec_store.RUN, "vocabulary", "--layer", "0",
                 "--top", "1", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    first = next(r for r in rows if r["expert"] == 0)
    assert first["token_id"] == 32 and first["text"] == "·"
