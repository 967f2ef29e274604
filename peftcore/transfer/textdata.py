"""A user's labelled text file: CSV or JSONL with a text and a label column (``peftcore finetune``).

Every problem is reported with the file, the line and the column: a missing column, an empty text,
a missing or unknown label, a line that is not JSON, an empty file.  Labels may be strings or
integers; a file's label names are sorted (integers numerically) so that the same file always maps
to the same class ids.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

MAX_BYTES = 512 * 2**20  # a classification file this large is a mistake (or an attack), not data


class DataFileError(ValueError):
    """A data file that cannot be used, with its path, line and column in the message."""


@dataclass
class TextData:
    """``texts[i]`` with class id ``labels[i]`` (an index into ``label_names``; None when unlabelled)."""

    texts: list
    labels: list | None
    label_names: list = field(default_factory=list)
    path: str = ""

    def __len__(self):
        return len(self.texts)


def _rows(path: Path, text_column: str, label_column: str):
    """Yield ``(line, row dict)``; the format is chosen by the suffix (.csv/.tsv, else JSONL)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataFileError(f"{path}: no such file") from None
    if not path.is_file():
        raise DataFileError(f"{path}: not a file")
    if size > MAX_BYTES:
        raise DataFileError(f"{path}: {size} bytes; at most {MAX_BYTES} are read")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataFileError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if path.suffix.lower() in (".csv", ".tsv"):
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        reader = csv.DictReader(text.splitlines(keepends=True), delimiter=delimiter)
        header = reader.fieldnames or []
        if not header:
            return
        if text_column not in header:
            raise DataFileError(f"{path}:1: no column {text_column!r} (the header has {header}); "
                                f"name the text column with --text-column")
        try:
            for row in reader:
                if None in row:  # more cells than the header names
                    raise DataFileError(f"{path}:{reader.line_num}: {len(header) + len(row[None])} cells, "
                                        f"the header has {len(header)}")
                if all(v in (None, "") for v in row.values()):
                    continue
                yield reader.line_num, row
        except csv.Error as e:
            raise DataFileError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFileError(f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataFileError(f"{path}:{lineno}: expected a JSON object with {text_column!r} and "
                                f"{label_column!r}, got {type(row).__name__}")
        yield lineno, row


def _label_value(value, path, lineno, label_column):
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataFileError(f"{path}:{lineno}: column {label_column!r}: expected a string or an integer label, "
                            f"got {value!r}")
    if isinstance(value, str):
        value = value.strip()
        if not value:
            raise DataFileError(f"{path}:{lineno}: column {label_column!r} is empty")
        if value.lstrip("-").isdigit():
            return int(value)
    return value


def load_text_file(path: str | os.PathLike, *, text_column: str = "text", label_column: str = "label",
                   label_names: list | None = None, labelled: bool = True) -> TextData:
    """Read a CSV (``.csv``, ``.tsv``) or JSONL file of texts and labels.

    Args:
        path: the file; CSV needs a header row naming the columns.
        text_column, label_column: the columns' names.
        label_names: the classes of the training file: a label outside them is an error naming the
            line (an evaluation file must not bring new classes).  None: this is the training
            file, and its labels define the classes (sorted; integers numerically).
        labelled: False for prediction input: the label column is optional and ignored.

    Returns:
        ``TextData`` with ``labels`` as class ids (None when ``labelled`` is False).

    Raises:
        DataFileError (a ValueError) naming the file, line and column of the first bad row, or
        saying that the file holds no rows, or only one class.
    """
    path = Path(path)
    texts, raw = [], []
    for lineno, row in _rows(path, text_column, label_column):
        text = row.get(text_column)
        if text is None:
            raise DataFileError(f"{path}:{lineno}: no column {text_column!r} (found {sorted(row)}); "
                                f"name the text column with --text-column")
        if not isinstance(text, str):
            raise DataFileError(f"{path}:{lineno}: column {text_column!r}: expected a string, got {text!r}")
        if not text.strip():
            raise DataFileError(f"{path}:{lineno}: column {text_column!r} is empty")
        texts.append(text)
        if labelled:
            if label_column not in row or row[label_column] is None:
                raise DataFileError(f"{path}:{lineno}: no column {label_column!r} (found {sorted(row)}); "
                                    f"name the label column with --label-column")
            raw.append((lineno, _label_value(row[label_column], path, lineno, label_column)))
    if not texts:
        raise DataFileError(f"{path}: the file holds no rows")
    if not labelled:
        return TextData(texts, None, list(label_names or []), str(path))
    if label_names is None:
        values = {v for _, v in raw}
        if len({type(v) for v in values}) > 1:
            kinds = sorted(str(v) for v in values)
            raise DataFileError(f"{path}: column {label_column!r} mixes integer and string labels ({kinds[:6]})")
        names = [str(v) for v in sorted(values)]
        if len(names) < 2:
            raise DataFileError(f"{path}: column {label_column!r} has a single class {names}; "
                                "a classifier needs at least two")
    else:
        names = [str(n) for n in label_names]
    index = {n: i for i, n in enumerate(names)}
    labels = []
    for lineno, v in raw:
        i = index.get(str(v))
        if i is None:
            raise DataFileError(f"{path}:{lineno}: column {label_column!r}: unknown label {v!r}; "
                                f"the training file's labels are {names}")
        labels.append(i)
    return TextData(texts, labels, names, str(path))


def per_class_sample(labels, k: int, seed: int = 0, exclude=()) -> list[int]:
    """Indices of ``k`` examples of every class in ``labels`` (seeded; sorted), skipping ``exclude``.

    The few-shot draw (k-shot dev splits, k target-language examples per class).  Raises
    ValueError naming the class when it has fewer than ``k`` examples left.
    """
    import random

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected a positive int, got {k!r}")
    skip = set(exclude)
    by_class: dict = {y: [] for y in labels}  # every class, also one that exclude empties
    for i, y in enumerate(labels):
        if i not in skip:
            by_class[y].append(i)
    rng = random.Random(seed)
    out = []
    for y in sorted(by_class, key=str):
        pool = by_class[y]
        if len(pool) < k:
            raise ValueError(f"k={k}: class {y!r} has only {len(pool)} examples to draw from")
        out += rng.sample(pool, k)
    return sorted(out)


def content_groups(texts, n: int = 5) -> list[int]:
    """A group id per text: texts that share a word ``n``-gram (lower-cased), directly or through
    others, are one group.

    Templated data (one message body under several framings, as in the shipped set) must not
    straddle a split: draw few-shot examples from some groups and evaluate on the others.
    """
    import re

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive int, got {n!r}")
    parent = list(range(len(texts)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict = {}
    for i, t in enumerate(texts):
        w = re.findall(r"\w+(?:'\w+)?", str(t).lower())
        keys = {tuple(w[j:j + n]) for j in range(len(w) - n + 1)} or {tuple(w)}  # a short text: all of it
        for g in keys:
            if g in first:
                parent[root(i)] = root(first[g])
            else:
                first[g] = i
    ids: dict = {}
    return [ids.setdefault(root(i), len(ids)) for i in range(len(texts))]


def group_split(labels, groups, per_class: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """``(pool, rest)`` index lists: whole groups (seeded order) go to the pool until each class
    has at least ``per_class`` examples there; every other group goes to ``rest``."""
    import random

    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"per_class: expected a positive int, got {per_class!r}")
    if len(labels) != len(groups):
        raise ValueError(f"labels, groups: {len(labels)} labels for {len(groups)} group ids")
    members: dict = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    order = sorted(members, key=str)
    random.Random(seed).shuffle(order)
    have: dict = {y: 0 for y in set(labels)}
    pool = []
    for g in order:
        classes = {labels[i] for i in members[g]}
        if any(have[y] < per_class for y in classes):
            pool += members[g]
            for i in members[g]:
                have[labels[i]] += 1
    short = {y: c for y, c in have.items() if c < per_class}
    if short:
        raise ValueError(f"per_class={per_class}: classes {sorted(short, key=str)} have fewer examples than that")
    chosen = set(pool)
    return sorted(pool), [i for i in range(len(labels)) if i not in chosen]
