"""``peftcore predict``: label a text file with a classifier written by ``peftcore finetune``."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch

from .finetune import ADAPTER_METHODS, RESULT, FinetuneError, _read_weights, model_fingerprint
from .textdata import load_text_file


def load_finetuned(run_dir, model=None, device="cpu"):
    """``(tokenizer, classifier in eval mode, run info)`` from a finished ``finetune`` output directory.

    ``model``: the base encoder directory (default: the one the run recorded); it must be the
    model the run was trained on (its config.json is compared).
    """
    from ..assets import check_model_dir, load_encoder, load_tokenizer
    from .classifier import TextClassifier
    from .task import TaskConfig

    run_dir = Path(run_dir)
    result = run_dir / RESULT
    if not result.is_file():
        raise FinetuneError(f"--adapter {str(run_dir)!r}: no {RESULT} (not the --out directory of a finished "
                            f"peftcore finetune run)")
    try:
        info = json.loads(result.read_bytes()[: 2**20])
        cfg = TaskConfig.from_dict(info["task"], source=str(result))
        labels, files = list(info["labels"]), dict(info["files"])
    except (ValueError, KeyError, TypeError) as e:
        raise FinetuneError(f"{result}: not a finetune result ({type(e).__name__}: {e})") from None
    model_dir = check_model_dir(model if model else info["model"])
    if model_fingerprint(model_dir) != info.get("model_sha256"):
        raise FinetuneError(f"--model {str(model_dir)!r} is not the model this run was trained on "
                            f"({info['model']}): their config.json differ")
    tok = load_tokenizer(model_dir)
    enc = load_encoder(model_dir)
    if cfg.method in ADAPTER_METHODS:
        import peftcore as pc

        pc.load_adapter(enc, run_dir / files["adapter"], name=cfg.method)
    clf = TextClassifier(enc, len(labels), dropout=cfg.dropout)
    weights = _read_weights(run_dir / files.get("model", files.get("head", "head.safetensors")))
    own = clf.state_dict()
    bad = sorted(set(weights) - set(own)) + [k for k in weights if k in own and weights[k].shape != own[k].shape]
    if bad:
        raise FinetuneError(f"{run_dir}: weights {bad[:4]} do not fit the classifier")
    clf.load_state_dict(weights, strict=False)
    return tok, clf.to(device).eval(), info


@torch.no_grad()
def predict(run_dir, input, *, model=None, output=None, text_column="text", label_column="label",
            batch_size=64, device="cpu", say=print) -> list[dict]:
    """Predict a label for every text of ``input`` (CSV or JSONL); rows ``{"text", "label", "score"}``.

    ``output``: a ``.csv`` or ``.jsonl`` file to write (atomically); None prints JSONL. When the
    input has a label column too, the accuracy is reported.
    """
    if output is not None and Path(output).suffix.lower() not in (".csv", ".jsonl", ".json"):
        raise FinetuneError(f"--output {str(output)!r}: expected a .csv or .jsonl file")
    tok, clf, info = load_finetuned(run_dir, model, device)
    labels = info["labels"]
    max_length = info["task"].get("max_length", 64)
    data = load_text_file(input, text_column=text_column, label_column=label_column, labelled=False)
    rows = []
    for i in range(0, len(data), batch_size):
        enc = tok(data.texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt")
        prob = clf(enc["input_ids"].to(device), enc["attention_mask"].to(device)).float().softmax(-1)
        score, k = prob.max(-1)
        rows += [{"text": t, "label": labels[j], "score": round(s, 6)}
                 for t, j, s in zip(data.texts[i : i + batch_size], k.tolist(), score.tolist())]
    try:
        truth = load_text_file(input, text_column=text_column, label_column=label_column, label_names=labels)
    except ValueError:
        truth = None  # no label column (or labels of other classes): nothing to score against
    if truth is not None:
        acc = sum(labels[y] == r["label"] for y, r in zip(truth.labels, rows)) / len(rows)
        say(f"accuracy on {input}: {acc:.3f} ({len(rows)} texts)")
    if output is None:
        for r in rows:
            say(json.dumps(r, ensure_ascii=False))
    else:
        _write_rows(Path(output), rows)
        say(f"wrote {len(rows)} predictions to {output}")
    return rows


def _write_rows(path: Path, rows):
    from ..io import _atomic_write

    if path.suffix.lower() == ".csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["text", "label", "score"])
        w.writeheader()
        w.writerows(rows)
        data = buf.getvalue().encode()
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, lambda f: f.write(data))
    else:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, lambda f: f.write(data))
