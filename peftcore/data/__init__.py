"""Datasets shipped with peftcore.

``textcls``: short English customer messages labelled by intent (complaint, praise, question,
cancellation, suggestion), written for this project; see ``README.md`` next to this file.  Its
test split also comes in German and Spanish (``load_textcls("test", language="de")``, line by line
the same messages and labels), and the training texts, translated, as unlabelled German and
Spanish text (``load_unlabelled("de")``) for language adapters.
"""

from __future__ import annotations

import json
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent

TEXTCLS_LABELS = ["complaint", "praise", "question", "cancellation", "suggestion"]
"""Label names of the ``textcls`` set; a label's integer id is its index here."""

TEXTCLS_SPLITS = ("train", "test")
TEXTCLS_LANGUAGES = ("en", "de", "es")
"""Languages of the test split (``en`` also has the training split)."""

__all__ = ["DATA_DIR", "TEXTCLS_LABELS", "TEXTCLS_SPLITS", "TEXTCLS_LANGUAGES", "load_textcls", "load_unlabelled"]


def _missing(path: Path):
    return FileNotFoundError(
        f"{path} is missing: the peftcore package was installed without its data files "
        "(package-data peftcore/data/*.jsonl, *.txt)"
    )


def load_unlabelled(language: str) -> list[str]:
    """The 464 training texts of ``textcls`` translated into ``language`` (``"de"`` or ``"es"``),
    without labels: in-domain text for a language adapter, disjoint in content from the test split."""
    if language not in TEXTCLS_LANGUAGES[1:]:
        raise ValueError(f"language: expected one of {list(TEXTCLS_LANGUAGES[1:])}, got {language!r}")
    path = DATA_DIR / f"textcls_unlabelled_{language}.txt"
    if not path.is_file():
        raise _missing(path)
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_textcls(split: str, language: str = "en") -> tuple[list[str], list[int], list[str]]:
    """Load one fixed split of the ``textcls`` intent set.

    Args:
        split: ``"train"`` (464 texts) or ``"test"`` (161 texts).
        language: ``"en"``; for the test split also ``"de"`` or ``"es"`` (translations written
            for this project: line i is line i of the English file, same label).

    Returns:
        ``(texts, labels, label_names)``: ``texts[i]`` is a string, ``labels[i]`` an int in
        ``[0, len(label_names))`` indexing ``label_names`` (a copy of ``TEXTCLS_LABELS``).

    Raises:
        ValueError: unknown split, or a malformed line (its file and line number are named).
        FileNotFoundError: the JSONL file is missing from the installed package.
    """
    if split not in TEXTCLS_SPLITS:
        raise ValueError(f"unknown textcls split {split!r}; expected one of {list(TEXTCLS_SPLITS)}")
    if language not in TEXTCLS_LANGUAGES or (language != "en" and split != "test"):
        raise ValueError(f"language: expected 'en', or for the test split one of {list(TEXTCLS_LANGUAGES)}; "
                         f"got {language!r} for split {split!r}")
    path = DATA_DIR / (f"textcls_{split}.jsonl" if language == "en" else f"textcls_{split}_{language}.jsonl")
    if not path.is_file():
        raise _missing(path)
    index = {name: i for i, name in enumerate(TEXTCLS_LABELS)}
    texts: list[str] = []
    labels: list[int] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str) or "label" not in row:
                raise ValueError(f"{path}:{lineno}: expected {{\"text\": str, \"label\": str}}, got {line.strip()!r}")
            if row["label"] not in index:
                raise ValueError(
                    f"{path}:{lineno}: unknown label {row['label']!r}; expected one of {TEXTCLS_LABELS}"
                )
            texts.append(row["text"])
            labels.append(index[row["label"]])
    return texts, labels, list(TEXTCLS_LABELS)
