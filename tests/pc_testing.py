"""Helpers shared by test modules (imported as ``pc_testing``: pyproject puts tests/ on the path, so
no test depends on the repository root being importable): tiny transformers models built from
configs (no download) for model-level tests, the relative error of the equivalence tests, the
device setup of the Triton kernel tests, the bottleneck tests' probes and the benchmarks' smoke run."""

import json
import time

import pytest
import torch
from hypothesis import HealthCheck


def tiny_model(kind: str, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "llama":
        cfg = tf.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model, targets = tf.LlamaForCausalLM(cfg), ["q_proj", "v_proj", "down_proj"]
    elif kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        model, targets = tf.GPT2LMHeadModel(cfg), ["c_attn", "c_fc"]
    elif kind == "bert":
        cfg = tf.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=48, max_position_embeddings=64)
        model, targets = tf.BertModel(cfg), ["query", "value", "dense"]
    else:
        raise ValueError(kind)
    return model.eval(), targets


def tiny_inputs(seed: int = 1, batch: int = 2, seq: int = 9):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 97, (batch, seq), generator=g)


def model_out(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# --------------------------------------------------------------------------- Triton kernel tests

# On a machine without CUDA the kernels run under the interpreter (conftest).
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (Triton runs compiled kernels only there)")
SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}


def gpu_configs(kernels, kernel: str) -> list:
    """``kernels._GPU_CONFIGS[kernel]`` (dicts holding num_warps and num_stages among the block
    sizes) as the ``triton.Config`` list the autotuner's pruner sees."""
    import triton

    out = []
    for c in kernels._GPU_CONFIGS[kernel]:
        c = dict(c)
        out.append(triton.Config(c, num_warps=c.pop("num_warps"), num_stages=c.pop("num_stages")))
    return out


# --------------------------------------------------------------------------- benchmarks

SMOKE_ARGS = ["--preset", "smoke", "--device", "cpu", "--no-progress", "--no-print"]


def run_bench_smoke(op: str, out):
    """``peftcore bench <op>`` on the smoke preset (CPU) into ``out``: (out, file stem, the JSON, seconds)."""
    from peftcore.bench import main

    t0 = time.perf_counter()
    rc = main([op, *SMOKE_ARGS, "--out", str(out)])
    elapsed = time.perf_counter() - t0
    assert rc == 0
    stem = op.replace("-", "_") + "_cpu_smoke"
    return out, stem, json.loads((out / f"{stem}.json").read_text()), elapsed


def rel_err(out, ref):
    """||out - ref|| / ||ref|| in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


# --------------------------------------------------------------------------- bottleneck adapters

HIDDEN, LAYERS = 32, 2


def adapter_params(model, name=None):
    from peftcore.layers.bottleneck import BottleneckSlot

    return {n: p for n, p in model.named_parameters()
            if BottleneckSlot.ATTR in n.split(".") and (name is None or f".adapters.{name}." in n)}


def perturb(model, name, std=0.5, seed=3):
    """Give adapter ``name`` non-zero up weights (and a fresh down) so it changes outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_params(model, name).values():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def hook_counts(model):
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}


def n_slots(placement, layers=LAYERS):
    return 2 * layers if placement == "houlsby" else layers


# --------------------------------------------------------------------------- trainers

def tiny_tokenizer(vocab_size: int = 97):
    """A word-level fast tokenizer over ``w0 .. w{n}`` plus specials, built in memory (no download),
    matching the tiny models' vocabulary size; pad/bos/eos/unk are ids 0-3."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(vocab_size - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def tiny_texts(n: int, words: int, seed: int = 0, lo: int = 0, hi: int = 90) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(f"w{int(i)}" for i in torch.randint(lo, hi, (words,), generator=g)) for _ in range(n)]


def bpe_tokenizer(extra_texts=()):
    """A byte-level BPE tokenizer (GPT-2 style: a word's leading space belongs to its token), trained in
    memory on the shipped texts: an offline stand-in for a causal LM's tokenizer."""
    import transformers
    from tokenizers import ByteLevelBPETokenizer

    from peftcore.data import load_textcls

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(load_textcls("train")[0] + list(extra_texts), vocab_size=400, min_frequency=1,
                            special_tokens=["<|endoftext|>"])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                                bos_token="<|endoftext|>", pad_token="<|endoftext|>")
