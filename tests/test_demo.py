"""The shipped textcls data set and the ``peftcore demo`` end to end on a tiny random BERT."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from peftcore.data import TEXTCLS_LABELS, load_textcls

ROW_KEYS = {"method", "trainable_params", "total_params", "accuracy", "seconds", "peak_mem_mb"}


# ------------------------------------------------------------------------------------ dataset


@pytest.fixture(scope="module")
def splits():
    return {s: load_textcls(s) for s in ("train", "test")}


def test_textcls_sizes_and_labels(splits):
    (tr, ytr, names), (te, yte, names_te) = splits["train"], splits["test"]
    assert names == names_te == TEXTCLS_LABELS
    assert len(names) >= 4 and len(set(names)) == len(names)
    assert len(tr) == len(ytr) and len(te) == len(yte)
    assert len(tr) >= 400 and len(te) >= 100
    assert 0.2 <= len(te) / (len(tr) + len(te)) <= 0.3
    for ys in (ytr, yte):
        assert all(isinstance(y, int) and 0 <= y < len(names) for y in ys)
        # every label present in both splits, and roughly balanced
        counts = [ys.count(c) for c in range(len(names))]
        assert min(counts) > 0 and max(counts) <= 1.5 * min(counts)


def test_textcls_texts(splits):
    tr, te = splits["train"][0], splits["test"][0]
    assert not set(tr) & set(te), "a text appears in both splits"
    assert len(set(tr)) == len(tr) and len(set(te)) == len(te), "duplicate text within a split"
    for t in tr + te:
        assert isinstance(t, str) and t == t.strip()
        assert 5 <= len(t.split()) <= 25, t


def test_load_textcls_bad_split():
    with pytest.raises(ValueError, match="unknown textcls split 'validation'"):
        load_textcls("validation")


# ------------------------------------------------------------------------------------ demo


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, splits):
    """A 2-layer, hidden-32 random BERT and a word-level vocabulary built from the data set."""
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("tiny_bert")
    words = set()
    for texts, _, _ in splits.values():
        for t in texts:
            words.update(re.findall(r"\w+|[^\w\s]", t.lower()))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(words)
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizer(vocab_file=str(d / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(d)
    cfg = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    import torch

    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(d)
    return d


def _run(args):
    from peftcore.demo import run

    return run(args)


def test_demo_end_to_end(tiny_bert, tmp_path, capsys):
    pytest.importorskip("peftcore.model")
    out = tmp_path / "rows.json"
    rc = _run(
        ["--model", str(tiny_bert), "--max-train", "60", "--max-test", "40", "--epochs", "2",
         "--epochs", "probe=5", "--batch-size", "16", "--no-progress", "--json", str(out), "--threads", "1",
         "--student-layers", "1", "--compacter-reduction", "8", "--prompt-tokens", "4", "--suite", "full",
         "--top-layers", "1"]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    names = ["linear probe", "lora (fused)", "bottleneck adapter (houlsby, 1/16)", "compacter (houlsby, phm n=4)",
             "compacter++ (pfeiffer, phm n=4)", "prompt tuning (4 tokens)", "top-layer fine-tune (top 1 block + head)",
             "gradual unfreezing, layer-wise lr x0.8 (ULMFiT)", "lora + R-Drop + EDA augmentation", "full fine-tune",
             "distilled student (1 layer)"]
    for name in (*names, "process RSS", "trainable params", "the distillation alone", "expected duration: about"):
        assert name in printed
    assert "teacher:" not in printed  # the full fine-tune row's model is the teacher
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == names
    for r in rows:
        assert set(r) == ROW_KEYS
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["seconds"] > 0
        assert 0 < r["trainable_params"] <= r["total_params"]
        assert r["peak_mem_mb"] == r["peak_mem_mb"]  # not NaN
    probe, lora, bottleneck, compacter, compacter_pp, prompt, top, unfreeze, lora_task, full, distill = rows
    head = probe["trainable_params"]
    # adapters: exactly their formulas on top of the head (hidden 32, 2 layers)
    b = 32 // 16  # bottleneck width; Houlsby: 2 slots per layer of 2·h·b + b + h
    assert bottleneck["trainable_params"] - head == 2 * 2 * (2 * 32 * b + b + 32)
    n, w = 4, 32 // 8  # Compacter: shared rule n³, per slot a rank-1 PHM down (32->4) and up (4->32) with biases
    phm_slot = (n * (32 // n) + n * (w // n) + w) + (n * (w // n) + n * (32 // n) + 32)
    assert compacter["trainable_params"] - head == n**3 + 2 * 2 * phm_slot
    assert compacter_pp["trainable_params"] - head == n**3 + 2 * phm_slot  # Pfeiffer: after the FFN only
    assert prompt["trainable_params"] - head == 4 * 32  # 4 virtual tokens of width 32
    for r in (bottleneck, compacter, compacter_pp, prompt):
        assert r["total_params"] == full["total_params"] + r["trainable_params"] - head
    assert probe["trainable_params"] == 32 * 5 + 5  # the linear head alone
    assert probe["trainable_params"] < lora["trainable_params"] < full["trainable_params"]
    assert full["trainable_params"] == full["total_params"] == probe["total_params"]
    # top-layer: one of the two blocks and the head train; gradual unfreezing trains the head in
    # epoch 1 and the top block too in epoch 2 (the row counts the most that trained)
    layer = sum(p.numel() for p in _tiny_layer_params(tiny_bert))
    assert top["trainable_params"] == layer + head and top["total_params"] == full["total_params"]
    assert unfreeze["trainable_params"] == layer + head and unfreeze["total_params"] == full["total_params"]
    assert lora_task["trainable_params"] == lora["trainable_params"] and lora_task["total_params"] == lora["total_params"]
    # LoRA adds its adapters on top of the same base model
    assert lora["total_params"] == full["total_params"] + lora["trainable_params"] - probe["trainable_params"]
    # the student: one of the two layers and a new head; its word embeddings (copied, frozen) do not train
    assert distill["total_params"] == full["total_params"] - layer
    assert distill["trainable_params"] == distill["total_params"] - _tiny_vocab(tiny_bert) * 32


def _tiny_layer_params(model_dir):
    import transformers

    return transformers.BertModel.from_pretrained(model_dir, add_pooling_layer=False).encoder.layer[0].parameters()


def _tiny_vocab(model_dir):
    return len((model_dir / "vocab.txt").read_text().split())


def test_demo_default_suite_and_top_layers_check(tiny_bert, capsys):
    from peftcore.demo import METHODS, SUITES, parse_args

    assert parse_args([])[1].methods == list(SUITES["default"])
    assert parse_args(["--suite", "full"])[1].methods == list(METHODS) == list(SUITES["full"])
    assert parse_args(["--suite", "full", "--methods", "lora"])[1].methods == ["lora"]
    assert set(SUITES["default"]) < set(METHODS)
    with pytest.raises(SystemExit):
        _run(["--model", str(tiny_bert), "--methods", "top", "--top-layers", "3", "--quiet"])
    assert "--top-layers 3: the encoder has only 2 layers" in capsys.readouterr().err


def test_demo_distill_alone_trains_its_teacher(tiny_bert, tmp_path, capsys):
    rows = []
    for i in range(2):
        out = tmp_path / f"rows{i}.json"
        rc = _run(["--model", str(tiny_bert), "--methods", "distill", "--max-train", "40", "--max-test", "40",
                   "--epochs", "2", "--student-layers", "1", "--temperature", "3", "--no-progress",
                   "--json", str(out), "--threads", "1"])
        assert rc == 0
        printed = capsys.readouterr().out
        assert "teacher: full fine-tune first" in printed and "teacher: test accuracy" in printed
        rows.append(json.loads(out.read_text()))
    assert [r["method"] for r in rows[0]] == ["distilled student (1 layer)"]
    assert set(rows[0][0]) == ROW_KEYS
    assert rows[0][0]["accuracy"] == rows[1][0]["accuracy"]  # deterministic


def test_demo_distill_bad_options(tiny_bert, capsys):
    with pytest.raises(SystemExit) as e:
        _run(["--model", str(tiny_bert), "--methods", "distill", "--student-layers", "3", "--max-train", "20",
              "--max-test", "10", "--epochs", "1", "--quiet", "--threads", "1"])
    assert e.value.code == 2
    assert "--student-layers 3: the teacher has only 2 layers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run(["--temperature", "0"])
    assert "--temperature must be positive" in capsys.readouterr().err


def test_demo_deterministic(tiny_bert, tmp_path):
    pytest.importorskip("peftcore.model")
    rows = []
    for i in range(2):
        out = tmp_path / f"rows{i}.json"
        _run(["--model", str(tiny_bert), "--methods", "lora,probe", "--max-train", "40", "--max-test", "40",
              "--epochs", "2", "--seed", "3", "--quiet", "--json", str(out), "--threads", "1"])
        rows.append(json.loads(out.read_text()))
    assert [r["method"] for r in rows[0]] == ["lora (fused)", "linear probe"]
    assert [r["accuracy"] for r in rows[0]] == [r["accuracy"] for r in rows[1]]


@pytest.mark.parametrize("kind", ["missing", "file", "no_config"])
def test_demo_bad_model_path(tmp_path, capsys, kind):
    target = tmp_path / "model"
    if kind == "file":
        target.write_text("not a model")
    elif kind == "no_config":
        target.mkdir()
    with pytest.raises(SystemExit) as e:
        _run(["--model", str(target), "--quiet"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    expected = {"missing": "no such directory", "file": "not a directory", "no_config": "no config.json"}[kind]
    assert str(target) in err and expected in err


def test_demo_bad_options(capsys):
    with pytest.raises(SystemExit) as e:
        _run(["--methods", "probe,adapter"])
    assert e.value.code == 2
    assert "unknown method 'adapter'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run(["--lr", "bogus=1e-3"])
    assert "unknown method 'bogus'" in capsys.readouterr().err


def test_demo_module_help():
    r = subprocess.run([sys.executable, "-m", "peftcore.demo", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    assert "--max-train" in r.stdout and "--json" in r.stdout
