"""``peftcore demo --suite memory``: the shipped instruction set, the loss mask, the evaluation on a
tiny causal LM, the options, and the parent's table and JSON (the SmolLM2 run itself is the demo's)."""

import json
import subprocess

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pc_testing import bpe_tokenizer  # noqa: E402
from peftcore import memory_demo as M  # noqa: E402
from peftcore.data import TEXTCLS_LABELS, load_textcls  # noqa: E402


def test_instruction_set_is_the_textcls_set_in_json():
    for split, n in (("train", 464), ("test", 161)):
        rows = M._data(split, None)
        texts, labels, names = load_textcls(split)
        assert len(rows) == n
        for r, t, y in zip(rows, texts, labels):
            assert t in r["prompt"] and r["prompt"].endswith("Answer:")
            assert json.loads(r["completion"]) == {"intent": names[y]} and names[y] in TEXTCLS_LABELS


def test_labels_cover_only_the_completion_and_eos():
    tok = bpe_tokenizer()
    rows = M._data("test", 3)
    ids, lab, mask = M._batch(tok, rows)
    for i, r in enumerate(rows):
        n_p = len(tok(r["prompt"], add_special_tokens=False)["input_ids"])
        n_c = len(tok(r["completion"], add_special_tokens=False)["input_ids"]) + 1
        assert (lab[i, :n_p] == -100).all() and (lab[i, n_p:n_p + n_c] != -100).all()
        assert int(mask[i].sum()) == n_p + n_c and (lab[i, n_p + n_c:] == -100).all()
        assert lab[i, n_p + n_c - 1] == tok.eos_token_id


def test_eval_loss_and_exact_match_on_a_tiny_model():
    tok = bpe_tokenizer()
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, max_position_embeddings=256))
    rows = M._data("test", 4)
    loss = M._eval_loss(lm, tok, rows, bs=3)
    assert 0 < loss < 2 * torch.log(torch.tensor(float(len(tok)))).item()
    assert M._exact_match(lm, tok, rows) == 0.0  # an untrained model answers nothing right
    assert tok.padding_side == "right"  # restored after left-padded generation


def test_options_and_the_parent_table(tmp_path, monkeypatch, capsys):
    from peftcore.demo import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--suite", "memory", "--memory-methods", "qlora,nope"])
    _, args = parse_args(["--suite", "memory", "--steps", "3", "--memory-methods", "qlora,lora",
                          "--json", str(tmp_path / "rows.json")])
    assert args.methods == [] and args.steps == 3

    def fake(cmd, **kw):
        m = cmd[cmd.index("--worker") + 1]
        if m == "lora":
            return subprocess.CompletedProcess(cmd, 1, stdout="boom\n")
        row = {"method": m, "what": M.DESCRIBE[m], "checkpointing": "--checkpointing" in cmd, "trainable": 10, "base_bytes": 2e6, "loss_before": 3.0,
               "seconds_per_step": 1.5, "peak_rss_mb": 900.0, "peak_model_mb": 400.0, "loss_after": 1.0,
               "exact_match": 0.5}
        return subprocess.CompletedProcess(cmd, 0, stdout="progress\n" + json.dumps(row) + "\n")

    monkeypatch.setattr(M.subprocess, "run", fake)
    rows = M.run(args)
    out = capsys.readouterr().out
    assert "| peftcore QLoRA" in out and "900 (400)" in out and "exit 1" in out
    assert json.loads((tmp_path / "rows.json").read_text()) == rows and rows[2]["error"] == "exit 1"
    assert [r["checkpointing"] for r in rows] == [False, True, False, True]  # every method both ways
    _, args = parse_args(["--suite", "memory", "--memory-methods", "qlora", "--no-checkpointing"])
    assert len(M.run(args)) == 1
