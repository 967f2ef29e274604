"""peftcore finetune / predict: data files, every method end to end, exact resume after kill -9, CLI errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from peftcore.transfer import TaskConfig, finetune, predict  # noqa: E402
from peftcore.transfer.cli import finetune_main, predict_main  # noqa: E402
from peftcore.transfer.textdata import DataFileError, load_text_file  # noqa: E402

LABELS = ["complaint", "praise", "question"]


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTCORE_CACHE", str(tmp_path / "cache"))  # never the user's ~/.cache


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A 2-layer BERT (hidden 32) with the packaged MiniLM's tokenizer, saved like a user's model."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from peftcore.demo import default_model_dir

    d = tmp_path_factory.mktemp("tiny")
    tok = AutoTokenizer.from_pretrained(default_model_dir(), local_files_only=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from peftcore.data import load_textcls

    d = tmp_path_factory.mktemp("data")
    texts, labels, names = load_textcls("train")
    rows = [{"text": t, "label": names[y]} for t, y in zip(texts, labels) if names[y] in LABELS]
    train = d / "train.csv"
    train.write_text("text,label\n" + "".join(f'"{r["text"]}",{r["label"]}\n' for r in rows[:40]))
    return train, _write_jsonl(d / "eval.jsonl", rows[40:64])


# ------------------------------------------------------------------------------------------
# data files


def test_csv_and_jsonl_rows_and_sorted_labels(files):
    train, ev = files
    a = load_text_file(train)
    b = load_text_file(ev, label_names=a.label_names)
    assert a.label_names == sorted(LABELS) and len(a) == 40 and len(b) == 24
    assert set(a.labels) == {0, 1, 2} and all(isinstance(t, str) and t for t in a.texts)


def test_integer_labels_sort_numerically(tmp_path):
    f = _write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 10}, {"text": "b", "label": 2}, {"text": "c", "label": "10"}])
    d = load_text_file(f)
    assert d.label_names == ["2", "10"] and d.labels == [1, 0, 1]


@pytest.mark.parametrize("content,suffix,match", [
    ("", ".jsonl", "holds no rows"),
    ("text,label\n", ".csv", "holds no rows"),
    ('{"text": "a", "label": "x"}\n{"text": "b" "label": "y"}\n', ".jsonl", r":2: not valid JSON"),
    ('{"text": "a", "label": "x"}\n{"txt": "b", "label": "y"}\n', ".jsonl", r":2: no column 'text'"),
    ('{"text": "a", "label": "x"}\n{"text": "  ", "label": "y"}\n', ".jsonl", r":2: column 'text' is empty"),
    ('{"text": "a", "label": "x"}\n{"text": "b"}\n', ".jsonl", r":2: no column 'label'"),
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": 1.5}\n', ".jsonl", r":2: column 'label': expected a string"),
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": 1}\n', ".jsonl", "mixes integer and string"),
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n', ".jsonl", "single class"),
    ("sentence,label\nhello,x\n", ".csv", r":1: no column 'text'"),
    ("text,label\nhello,x\nhi,y,extra\n", ".csv", r":3: 3 cells, the header has 2"),
    ("[1, 2]\n", ".jsonl", r":1: expected a JSON object"),
])
def test_bad_files_name_file_line_and_column(tmp_path, content, suffix, match):
    f = tmp_path / f"bad{suffix}"
    f.write_text(content)
    with pytest.raises(DataFileError, match=match) as e:
        load_text_file(f)
    assert str(f) in str(e.value)


def test_unknown_label_in_eval_file_names_line(tmp_path):
    f = _write_jsonl(tmp_path / "ev.jsonl", [{"text": "a", "label": "praise"}, {"text": "b", "label": "refund"}])
    with pytest.raises(DataFileError, match=r"ev.jsonl:2: column 'label': unknown label 'refund'"):
        load_text_file(f, label_names=LABELS)


def test_missing_and_undecodable_files(tmp_path):
    with pytest.raises(DataFileError, match="no such file"):
        load_text_file(tmp_path / "nope.csv")
    f = tmp_path / "latin.csv"
    f.write_bytes(b"text,label\ncaf\xe9,x\n")
    with pytest.raises(DataFileError, match="not UTF-8"):
        load_text_file(f)


# ------------------------------------------------------------------------------------------
# every method end to end, and predict


def _state(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("method", ["head", "freeze", "unfreeze", "lora", "bottleneck", "compacter", "prompt", "full"])
def test_every_method_trains_writes_and_predicts(tiny_dir, files, tmp_path, method):
    train, ev = files
    cfg = TaskConfig.for_method(method, epochs=2, batch_size=8, **({"freeze_to": -2} if method == "freeze" else {}),
                                **({"adapter_reduction": 8} if method == "compacter" else {}))
    out = tmp_path / method
    m = finetune(train, eval=ev, model=tiny_dir, config=cfg, out=out, progress=False, say=lambda *a: None)
    assert [r["epoch"] for r in m["epochs"]] == [1, 2]
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 and r["train_loss"] > 0 for r in m["epochs"])
    assert m["best_epoch"] in (1, 2) and m["best_accuracy"] == max(r["eval_accuracy"] for r in m["epochs"])
    assert 0 < m["trainable_params"] <= m["total_params"]
    assert json.loads((out / "metrics.json").read_text()) == m
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "checkpoint.safetensors").exists() and not list(out.glob(".peftcore-tmp*"))
    files_ = json.loads((out / "finetune.json").read_text())["files"]
    if method in ("lora", "bottleneck", "compacter", "prompt"):
        assert (out / "adapter" / "adapter_config.json").is_file() and (out / "head.safetensors").is_file()
    elif method == "head":
        assert set(_state(out / "head.safetensors")) == {"head.weight", "head.bias"}
    else:
        assert "encoder.embeddings.word_embeddings.weight" in _state(out / files_["model"])
    rows = predict(out, ev, say=lambda *a: None)
    assert len(rows) == 24 and all(r["label"] in LABELS and 0 < r["score"] <= 1 for r in rows)
    data = load_text_file(ev, label_names=m["labels"])
    acc = sum(m["labels"][y] == r["label"] for y, r in zip(data.labels, rows)) / len(rows)
    assert acc == pytest.approx(m["best_accuracy"])  # the exported model is the best epoch's


def test_freeze_trains_only_the_top(tiny_dir, files, tmp_path):
    """Top-layer fine-tuning: the embeddings and the lower block keep their pre-trained values."""
    from safetensors.torch import load_file

    train, ev = files
    cfg = TaskConfig.for_method("freeze", epochs=1, batch_size=8, freeze_to=-2)  # block 1 + head train
    finetune(train, eval=ev, model=tiny_dir, config=cfg, out=tmp_path / "f", progress=False, plot=False,
             say=lambda *a: None)
    trained, base = load_file(str(tmp_path / "f" / "model.safetensors")), load_file(str(tiny_dir / "model.safetensors"))
    base = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in base.items()}
    lower = [k for k in base if k.startswith(("embeddings.", "encoder.layer.0."))]
    upper = [k for k in base if k.startswith("encoder.layer.1.") and k.endswith("weight")]
    assert lower and upper
    assert all(torch.equal(trained["encoder." + k], base[k]) for k in lower)
    assert any(not torch.equal(trained["encoder." + k], base[k]) for k in upper)


# ------------------------------------------------------------------------------------------
# resume after kill -9


def _cli_args(tiny_dir, files, out, extra):
    train, ev = files
    return ["--model", str(tiny_dir), "--train", str(train), "--eval", str(ev), "--out", str(out),
            "--no-progress", "--no-plot", "--threads", "1", "--batch-size", "8", *extra]


@pytest.mark.parametrize("extra", [
    ["--method", "lora", "--epochs", "3", "--regularizer", "r_drop", "--augment", "eda", "--save-every", "3"],
    ["--method", "unfreeze", "--epochs", "3", "--augment", "token_cutoff", "--save-every", "4"],
])
def test_resume_after_kill_gives_the_same_weights(tiny_dir, files, tmp_path, extra):
    """A run SIGKILLed mid-epoch (step 8 of 5 per epoch, last checkpoint earlier) and resumed ends
    with exactly the weights of an uninterrupted run with the same seed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert finetune_main(_cli_args(tiny_dir, files, tmp_path / "whole", extra)) == 0
    finally:
        torch.set_num_threads(threads)
    env = dict(os.environ, PEFTCORE_TEST_KILL_AFTER_STEP="8")
    killed = subprocess.run([sys.executable, "-m", "peftcore", "finetune", *_cli_args(tiny_dir, files, tmp_path / "cut", extra)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (tmp_path / "cut" / "checkpoint.safetensors").is_file() and not (tmp_path / "cut" / "finetune.json").exists()
    torch.set_num_threads(1)
    try:
        assert finetune_main(_cli_args(tiny_dir, files, tmp_path / "cut", [*extra, "--resume"])) == 0
    finally:
        torch.set_num_threads(threads)
    name = "head.safetensors" if "lora" in extra else "model.safetensors"
    a, b = _state(tmp_path / "whole" / name), _state(tmp_path / "cut" / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if "lora" in extra:
        a, b = (_state(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("whole", "cut"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("whole", "cut"))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(ma["epochs"]) == strip(mb["epochs"])


# ------------------------------------------------------------------------------------------
# command-line errors


def test_cli_errors_are_one_line_usage_errors(tiny_dir, files, tmp_path, capsys):
    train, ev = files
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "a", "label": "praise"}, {"text": "b", "label": "nope"}])
    base = ["--model", str(tiny_dir), "--train", str(train), "--no-progress", "--epochs", "1"]
    cases = [
        ([*base, "--eval", str(bad), "--out", str(tmp_path / "o1")], "bad.jsonl:2: column 'label': unknown label 'nope'"),
        ([*base, "--out", str(tmp_path / "o2"), "--resume"], "no checkpoint.safetensors to resume from"),
        ([*base, "--out", str(tmp_path / "o3"), "--lr", "-1"], "lr"),
        (["--train", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o4")], "missing.csv: no such file"),
        ([*base, "--out", str(tmp_path / "o5"), "--model", str(tmp_path)], "config.json"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            finetune_main(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err, argv
    # a finished run is never overwritten silently
    assert finetune_main([*base, "--method", "head", "--out", str(tmp_path / "done")]) == 0
    with pytest.raises(SystemExit):
        finetune_main([*base, "--method", "head", "--out", str(tmp_path / "done")])
    assert "holds a run already" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict_main(["--adapter", str(tmp_path / "o2"), "--input", str(ev)])
    assert "finetune.json" in capsys.readouterr().err


def test_resume_with_other_settings_is_refused(tiny_dir, files, tmp_path, capsys):
    args = _cli_args(tiny_dir, files, tmp_path / "r", ["--method", "head", "--epochs", "2"])
    env = dict(os.environ, PEFTCORE_TEST_KILL_AFTER_STEP="6")
    subprocess.run([sys.executable, "-m", "peftcore", "finetune", *args], env=env, capture_output=True, timeout=300)
    with pytest.raises(SystemExit):
        finetune_main([*args, "--resume", "--lr", "0.5"])
    assert "task differ" in capsys.readouterr().err


def test_predict_writes_csv_and_refuses_another_model(tiny_dir, files, tmp_path, capsys):
    import csv

    train, ev = files
    finetune(train, model=tiny_dir, config=TaskConfig.for_method("lora", epochs=1), out=tmp_path / "l",
             progress=False, plot=False, say=lambda *a: None)
    assert predict_main(["--adapter", str(tmp_path / "l"), "--input", str(ev), "--output", str(tmp_path / "p.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(rows) == 24 and set(rows[0]) == {"text", "label", "score"}
    from peftcore.demo import default_model_dir

    with pytest.raises(SystemExit):
        predict_main(["--adapter", str(tmp_path / "l"), "--input", str(ev), "--model", str(default_model_dir())])
    assert "not the model this run was trained on" in capsys.readouterr().err
