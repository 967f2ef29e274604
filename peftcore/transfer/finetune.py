"""``peftcore finetune`` as a library: fine-tune a local encoder on a user's labelled text file.

    from peftcore.transfer import TaskConfig, finetune
    metrics = finetune("train.csv", eval="dev.csv", out="runs/lora", config=TaskConfig.for_method("lora"))

One loop serves every method (``TaskConfig.method``): ``head`` (a new head on cached frozen
features, :class:`~peftcore.transfer.FeatureCache`), ``freeze`` (top-layer fine-tuning,
:func:`~peftcore.transfer.freeze_to`), ``unfreeze`` (ULMFiT's gradual unfreezing with layer-wise
rates), the adapter methods ``lora``/``bottleneck``/``compacter``/``prompt`` (``peftcore.apply``)
and ``full``.  The task config adds the regularizer (L2-SP, R-Drop, Mixout), the augmentation
(EDA-style word edits, token or span cutoff) and the schedule.

Resuming is exact: every ``save_every`` steps and at each epoch's end the whole training state
(trained tensors, optimizer, scheduler, torch's RNG, counters, history) goes atomically into
``OUT/checkpoint.safetensors``.  Batches are drawn from a generator seeded by (seed, epoch) and
augmentation from (seed, epoch, step), so a run killed anywhere and resumed ends with the same
weights as an uninterrupted one.  Outputs (written atomically; ``finetune.json`` last, so its
presence means the run finished): ``adapter/`` (PEFT's layout for LoRA) and ``head.safetensors``
for the adapter methods, ``head.safetensors`` for ``head``, ``model.safetensors`` (the classifier's
whole state dict) for ``freeze``/``unfreeze``/``full``; ``metrics.json``; ``curves.png``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import load_state, restore, save_state
from .classifier import TextClassifier, head_state
from .textdata import TextData, load_text_file

ADAPTER_METHODS = ("lora", "bottleneck", "compacter", "prompt")
CHECKPOINT = "checkpoint.safetensors"
BEST = "best.safetensors"
RESULT = "finetune.json"
_KILL_ENV = "PEFTCORE_TEST_KILL_AFTER_STEP"  # tests: SIGKILL this process after that global step


class FinetuneError(ValueError):
    """A problem with finetune's inputs or its output directory (shown without a traceback)."""


def _seed(*parts) -> int:
    """A 63-bit seed from integers, independent of Python's hash randomization."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def _fingerprint(data: TextData) -> str:
    h = hashlib.sha256()
    for t, y in zip(data.texts, data.labels or [None] * len(data.texts)):
        h.update(hashlib.sha256(t.encode()).digest() + str(y).encode())
    return h.hexdigest()


def model_fingerprint(model_dir: Path) -> str:
    """sha256 of the model directory's config.json: the base a saved run needs back."""
    return hashlib.sha256((Path(model_dir) / "config.json").read_bytes()).hexdigest()


def adapter_config(cfg, targets=None):
    """The peftcore config of an adapter method from the task config."""
    import peftcore as pc

    m = cfg.method
    if m == "lora":
        return pc.LoRAConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=targets)
    if m == "bottleneck":
        return pc.BottleneckConfig(placement="houlsby", reduction_factor=cfg.adapter_reduction, non_linearity="relu")
    if m == "compacter":
        return pc.CompacterConfig(reduction_factor=cfg.adapter_reduction)
    if m == "prompt":
        return pc.PromptTuningConfig(num_virtual_tokens=cfg.prompt_tokens, init="random")
    raise FinetuneError(f"not an adapter method: {m!r}")


def build(model_dir, cfg, num_classes, device="cpu", targets=None):
    """``(tokenizer, classifier, unfreezer or None)`` for ``cfg.method``, trainability set up."""
    from ..assets import load_encoder, load_tokenizer
    from .groups import freeze_to
    from .unfreeze import GradualUnfreezing

    tok = load_tokenizer(Path(model_dir))
    torch.manual_seed(cfg.seed)
    enc = load_encoder(Path(model_dir))
    if cfg.method in ADAPTER_METHODS:
        import peftcore as pc

        pc.apply(enc, adapter_config(cfg, targets), name=cfg.method)
    clf = TextClassifier(enc, num_classes, dropout=cfg.dropout).to(device)
    unfreezer = None
    if cfg.method == "head":
        for p in clf.encoder.parameters():
            p.requires_grad_(False)
    elif cfg.method in ("full", "freeze"):
        for p in clf.parameters():
            p.requires_grad_(True)
        if cfg.method == "freeze":
            freeze_to(clf, cfg.freeze_to)
    elif cfg.method == "unfreeze":
        for p in clf.parameters():
            p.requires_grad_(True)
        unfreezer = GradualUnfreezing(clf, every=cfg.unfreeze_every)
    if cfg.regularizer == "mixout":
        from .regularizers import apply_mixout

        apply_mixout(clf.encoder, _reg_weight(cfg))
    return tok, clf, unfreezer


def _reg_weight(cfg):
    from .task import default_regularizer_weight

    return cfg.regularizer_weight if cfg.regularizer_weight is not None else default_regularizer_weight(cfg.regularizer)


def _optimizer(clf, cfg):
    from .rates import param_groups

    # Gradual unfreezing keeps every parameter in the optimizer from the start (frozen ones have
    # no gradient, so AdamW skips them): its groups never change, so a resumed run matches.
    groups = param_groups(clf, cfg.lr, layer_decay=cfg.layer_decay, weight_decay=cfg.weight_decay,
                          trainable_only=cfg.method != "unfreeze")
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _scheduler(opt, cfg, total):
    if cfg.schedule == "slanted_triangular":
        from .schedules import slanted_triangular

        return slanted_triangular(opt, total)
    from transformers import get_scheduler

    warmup = int(round(cfg.warmup_ratio * total))
    name = {"constant": "constant_with_warmup"}.get(cfg.schedule, cfg.schedule)
    return get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total)


class _Batches:
    """Tokenized batches of ``data`` in a seeded order; augmentation applied per (epoch, index)."""

    def __init__(self, data, tok, cfg, clf, device):
        self.data, self.tok, self.cfg, self.clf, self.device = data, tok, cfg, clf, device
        self.labels = torch.tensor(data.labels, dtype=torch.long)
        self.augmenter = None
        if cfg.augment == "eda":
            from .augment import TextAugmenter

            r = cfg.augment_rate
            self.augmenter = TextAugmenter(swap=r, delete=r, insert=r, seed=cfg.seed)
        self.features = None  # method "head": cached features [N, H]

    def order(self, epoch):
        return torch.randperm(len(self.data), generator=torch.Generator().manual_seed(_seed(self.cfg.seed, epoch)))

    def encode(self, texts):
        enc = self.tok(list(texts), padding=True, truncation=True, max_length=self.cfg.max_length, return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def logits(self, idx, epoch, step):
        """Training logits of the rows ``idx`` at (epoch, step)."""
        if self.features is not None:
            return self.clf.head(self.clf.dropout(self.features[idx]))
        texts = [self.data.texts[i] for i in idx.tolist()]
        if self.augmenter is not None:
            texts = [self.augmenter(t, index=i, epoch=epoch) for t, i in zip(texts, idx.tolist())]
        ids, mask = self.encode(texts)
        if self.cfg.augment in ("token_cutoff", "span_cutoff"):
            from . import augment

            cut = getattr(augment, self.cfg.augment)
            gen = torch.Generator().manual_seed(_seed(self.cfg.seed, epoch, step, "cutoff"))
            embeds = cut(self.clf.encoder.get_input_embeddings()(ids), mask, self.cfg.augment_rate, generator=gen)
            return self.clf(ids, mask, inputs_embeds=embeds)
        return self.clf(ids, mask)


@torch.no_grad()
def evaluate(clf, data, tok, cfg, device, features=None, batch_size=64):
    """``(accuracy, mean cross-entropy)`` of ``clf`` on labelled ``data``."""
    was = clf.training
    clf.eval()
    correct, loss, n = 0, 0.0, len(data)
    y = torch.tensor(data.labels, dtype=torch.long)
    for i in range(0, n, batch_size):
        if features is not None:
            logits = clf.head(features[i : i + batch_size])
        else:
            enc = tok(data.texts[i : i + batch_size], padding=True, truncation=True, max_length=cfg.max_length,
                      return_tensors="pt")
            logits = clf(enc["input_ids"].to(device), enc["attention_mask"].to(device))
        t = y[i : i + batch_size].to(logits.device)
        correct += (logits.argmax(-1) == t).sum().item()
        loss += F.cross_entropy(logits.float(), t, reduction="sum").item()
    clf.train(was)
    return correct / n, loss / n


def _trained(clf):
    return {n: p for n, p in clf.named_parameters() if p.requires_grad}


def _prepare_out(out: Path, resume: bool, overwrite: bool):
    if resume:
        if (out / RESULT).is_file() and not (out / CHECKPOINT).is_file():
            raise FinetuneError(f"--out {str(out)!r}: that run finished ({RESULT} is there); nothing to resume")
        if not (out / CHECKPOINT).is_file():
            raise FinetuneError(f"--out {str(out)!r}: no {CHECKPOINT} to resume from")
        return
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"--out {str(out)!r}: exists and is not a directory")
    if out.is_dir() and any((out / f).exists() for f in (RESULT, CHECKPOINT)) and not overwrite:
        raise FinetuneError(f"--out {str(out)!r} holds a run already: pass --resume to continue it, "
                            f"--overwrite to replace it, or choose another directory")
    out.mkdir(parents=True, exist_ok=True)
    for f in (CHECKPOINT, BEST, RESULT):
        (out / f).unlink(missing_ok=True)


def finetune(train, *, eval=None, model=None, config=None, out, resume=False, overwrite=False,
             text_column="text", label_column="label", targets=None, save_every=50, progress=True,
             json_path=None, plot=True, device="cpu", cache_dir=None, say=print) -> dict:
    """Fine-tune ``model`` (a local transformers encoder directory; default the packaged
    all-MiniLM-L6-v2) on the labelled file ``train`` and write the result to ``out``.

    Args:
        train, eval: CSV or JSONL files (:func:`~peftcore.transfer.textdata.load_text_file`);
            without ``eval`` the last epoch's weights are kept, with it the best epoch's.
        config: a :class:`~peftcore.transfer.TaskConfig` (default ``TaskConfig.for_method("lora")``).
        resume: continue the run in ``out`` from its checkpoint (same files and config, checked).
        overwrite: replace a run already in ``out`` (otherwise an error).
        targets: LoRA ``target_modules`` (None: the model type's default).
        save_every: steps between mid-epoch checkpoints (0: at epoch ends only).
        cache_dir: where ``head`` keeps its cached features (None: in memory).
    Returns the metrics dict also written to ``out/metrics.json`` (and to ``json_path``).
    """
    from ..assets import check_model_dir, default_model_dir
    from .task import TaskConfig

    cfg = config if config is not None else TaskConfig.for_method("lora")
    model_dir = check_model_dir(model) if model else default_model_dir()
    out = Path(out)
    train_data = load_text_file(train, text_column=text_column, label_column=label_column)
    eval_data = (load_text_file(eval, text_column=text_column, label_column=label_column,
                                label_names=train_data.label_names) if eval else None)
    _prepare_out(out, resume, overwrite)
    clf, _, state, info = fit(train_data, eval_data, cfg, model_dir=model_dir, out=out, resume=resume,
                              targets=targets, save_every=save_every, progress=progress, device=device,
                              cache_dir=cache_dir, say=say)
    return _finish(out, clf, cfg, info, state, train_data, eval_data, json_path, plot, say)


def fit(train_data, eval_data, cfg, *, model_dir, out=None, resume=False, targets=None, save_every=50,
        progress=True, device="cpu", cache_dir=None, say=print, desc=None):
    """The training loop behind :func:`finetune` (and the demo's transfer rows) on loaded data.

    ``out``: the directory of the checkpoints and of the best epoch's weights; None keeps the best
    weights in memory and writes nothing (no resume).  Returns ``(classifier with the best
    epoch's weights, tokenizer, state, info)``; ``state`` holds the per-epoch ``history``,
    ``best_epoch``, ``best_accuracy``, ``seconds`` (training wall time, feature extraction
    included) and ``peak_mem_mb``.
    """
    from ..memory import PeakMemory
    from ..training import progress_bar

    info = {"task": cfg.to_dict(), "model": str(model_dir), "model_sha256": model_fingerprint(model_dir),
            "train_sha256": _fingerprint(train_data), "eval_sha256": _fingerprint(eval_data) if eval_data else None,
            "labels": train_data.label_names, "targets": targets}
    device = torch.device(device)
    tok, clf, unfreezer = build(model_dir, cfg, len(train_data.label_names), device, targets)
    batches = _Batches(train_data, tok, cfg, clf, device)
    l2sp = None
    if cfg.regularizer == "l2sp":
        from .regularizers import L2SP

        w = _reg_weight(cfg)
        l2sp = L2SP(clf, alpha=w, beta=w, new_params=list(clf.head.parameters()))
    opt = _optimizer(clf, cfg)
    steps = math.ceil(len(train_data) / cfg.batch_size)
    total = steps * cfg.epochs
    sched = _scheduler(opt, cfg, total)
    state = {"epoch": 0, "step": 0, "loss_sum": 0.0, "history": [], "best_accuracy": None, "best_epoch": None,
             "seconds": 0.0, "peak_mem_mb": 0.0}
    if resume:
        state = _resume(out, info, clf, unfreezer, opt, sched, say, steps)
    best_mem = {}
    kill_at = int(os.environ.get(_KILL_ENV, "0") or 0)

    def save():
        if out is not None:
            extra = {"state": state, **({"unfreezer": unfreezer.state_dict()} if unfreezer is not None else {})}
            save_state(out / CHECKPOINT, params=_trained(clf), optimizer=opt, scheduler=sched, info=info, extra=extra)

    global_step = state["epoch"] * steps + state["step"]
    with progress_bar(total, desc or f"finetune {cfg.method}", progress) as bar, PeakMemory(device) as mem:
        t0 = time.perf_counter()
        eval_features = _cache_features(batches, clf, tok, cfg, eval_data, device, cache_dir, progress)
        bar.update(global_step)
        while state["epoch"] < cfg.epochs:
            epoch = state["epoch"]
            order = batches.order(epoch)
            clf.train()
            for step in range(state["step"], steps):
                idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
                loss = _loss(batches, idx, epoch, step, cfg, l2sp, device)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                state["loss_sum"] += loss.item()
                state["step"] = step + 1
                global_step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                if out is not None and save_every and global_step % save_every == 0 and step + 1 < steps:
                    state["seconds"] += time.perf_counter() - t0
                    save()
                    t0 = time.perf_counter()
                if kill_at and global_step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            row = {"epoch": epoch + 1, "train_loss": state["loss_sum"] / steps,
                   "lr": max(g["lr"] for g in opt.param_groups),
                   "trainable_params": sum(p.numel() for p in clf.parameters() if p.requires_grad)}
            if unfreezer is not None:
                unfreezer.step()
            state["seconds"] += time.perf_counter() - t0
            if eval_data is not None:
                row["eval_accuracy"], row["eval_loss"] = evaluate(clf, eval_data, tok, cfg, device, eval_features)
            row["seconds"] = round(state["seconds"], 3)
            state["history"].append(row)
            if eval_data is None or state["best_accuracy"] is None or row["eval_accuracy"] > state["best_accuracy"]:
                state["best_accuracy"], state["best_epoch"] = row.get("eval_accuracy"), epoch + 1
                best = _best_params(clf, cfg)
                if out is not None:
                    _save_weights(out / BEST, best)
                else:
                    best_mem = {k: v.detach().clone() for k, v in best.items()}
            say(_epoch_line(row, cfg.epochs))
            state.update(epoch=epoch + 1, step=0, loss_sum=0.0)
            save()
            t0 = time.perf_counter()
    state["peak_mem_mb"] = max(state["peak_mem_mb"], round(mem.peak_mb, 1))
    _load_params(clf, _read_weights(out / BEST) if out is not None else best_mem)
    return clf, tok, state, info


def _cache_features(batches, clf, tok, cfg, eval_data, device, cache_dir, progress):
    """Method ``head``: the frozen encoder's features of the train and eval texts, computed once."""
    if cfg.method != "head":
        return None
    from .features import FeatureCache

    cache = FeatureCache(cache_dir)
    kw = dict(tokenizer=tok, pooling="mean", max_length=cfg.max_length, device=device, progress=progress)
    batches.features = cache.features(clf.encoder, batches.data.texts, **kw).to(device)
    return cache.features(clf.encoder, eval_data.texts, **kw).to(device) if eval_data is not None else None


def _loss(batches, idx, epoch, step, cfg, l2sp, device):
    y = batches.labels[idx].to(device)
    logits = batches.logits(idx, epoch, step)
    loss = F.cross_entropy(logits.float(), y)
    if cfg.regularizer == "r_drop":
        from .regularizers import r_drop_loss

        # R-Drop: a second pass with other dropout masks; CE on both plus their symmetric KL
        logits_b = batches.logits(idx, epoch, step)
        loss = 0.5 * (loss + F.cross_entropy(logits_b.float(), y)) + _reg_weight(cfg) * r_drop_loss(logits, logits_b)
    if l2sp is not None:
        loss = loss + l2sp.penalty()
    return loss


def _resume(out, info, clf, unfreezer, opt, sched, say, steps):
    params, tensors, doc = load_state(out / CHECKPOINT)
    saved = doc["info"]
    diff = [k for k in info if saved.get(k) != info[k]]
    if diff:
        raise FinetuneError(f"--resume: {', '.join(diff)} differ from the run in {str(out)!r} "
                            f"(resume with the same files and settings)")
    if unfreezer is not None:
        unfreezer.load_state_dict(doc["unfreezer"])
    _load_params(clf, params)
    restore(tensors, doc, optimizer=opt, scheduler=sched)
    state = doc["state"]
    say(f"resuming {out} at epoch {state['epoch'] + 1}, step {state['step']} of {steps}")
    return state


def _load_params(clf, tensors):
    own = dict(clf.named_parameters())
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise FinetuneError(f"saved weights {unknown[:4]} are not parameters of this classifier")
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v)


def _best_params(clf, cfg):
    """What the best epoch's weights must hold: whatever can differ from the pre-trained model at
    the end (gradual unfreezing trains more parameters after the best epoch: all of them)."""
    if cfg.method in ("unfreeze", "freeze", "full"):
        return dict(clf.named_parameters())
    return _trained(clf)


def _save_weights(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save

    from ..io import _atomic_write

    payload = save({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, metadata=metadata)
    _atomic_write(path, lambda f: f.write(payload))


def _read_weights(path: Path) -> dict:
    from safetensors.torch import load

    try:
        return load(path.read_bytes())
    except Exception as e:
        raise FinetuneError(f"{path}: not a valid safetensors file ({type(e).__name__}: {e})") from None


def _epoch_line(row, epochs):
    parts = [f"epoch {row['epoch']}/{epochs}", f"train loss {row['train_loss']:.4f}"]
    if "eval_accuracy" in row:
        parts += [f"eval accuracy {row['eval_accuracy']:.3f}", f"eval loss {row['eval_loss']:.4f}"]
    parts.append(f"{row['seconds']:.1f} s")
    return "  ".join(parts)


def _atomic_json(path: Path, doc) -> None:
    from ..io import _atomic_write

    data = (json.dumps(doc, indent=2) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda f: f.write(data))


def export(out: Path, clf, cfg) -> dict:
    """Write the trained weights in the method's format; returns ``{what: file}``."""
    files = {}
    if cfg.method in ADAPTER_METHODS:
        import peftcore as pc

        pc.save_adapter(clf.encoder, out / "adapter", name=cfg.method)
        files["adapter"] = "adapter"
    if cfg.method in ("freeze", "unfreeze", "full"):
        _save_weights(out / "model.safetensors", clf.state_dict())
        files["model"] = "model.safetensors"
    else:
        _save_weights(out / "head.safetensors", head_state(clf))
        files["head"] = "head.safetensors"
    return files


def _finish(out, clf, cfg, info, state, train_data, eval_data, json_path, plot, say):
    if cfg.regularizer == "mixout":
        from .regularizers import remove_mixout

        remove_mixout(clf.encoder)
    files = export(out, clf, cfg)
    from .. import __version__

    metrics = {
        "method": cfg.method, "model": info["model"], "labels": info["labels"],
        "train": train_data.path, "n_train": len(train_data),
        "eval": eval_data.path if eval_data else None, "n_eval": len(eval_data) if eval_data else 0,
        "epochs": state["history"], "best_epoch": state["best_epoch"], "best_accuracy": state["best_accuracy"],
        "seconds": round(state["seconds"], 3), "peak_mem_mb": state["peak_mem_mb"],
        "trainable_params": max(r["trainable_params"] for r in state["history"]),
        "total_params": sum(p.numel() for p in clf.parameters()),
        "task": cfg.to_dict(), "peftcore_version": __version__,
    }
    _atomic_json(out / "metrics.json", metrics)
    if json_path:
        _atomic_json(Path(json_path), metrics)
    if plot:
        from .report import plot_curves

        plot_curves(metrics, out / "curves.png", say)
    _atomic_json(out / RESULT, {**info, "files": files, "best_epoch": state["best_epoch"],
                                "peftcore_version": __version__})
    for f in (CHECKPOINT, BEST):
        (out / f).unlink(missing_ok=True)
    say(f"best epoch {state['best_epoch']}" + (f": eval accuracy {state['best_accuracy']:.3f}"
                                                  if state["best_accuracy"] is not None else "")
        + f"; wrote {out}")
    return metrics
