"""The trainers users run: transformers' Trainer (train, save, resume), TRL's SFT, DPO and reward
trainers, accelerate, and the two exits from an adapted model (its save_pretrained, and
merge_and_unload), on tiny models built from configs.

Before: ``model.save_pretrained`` wrote the wrapped modules' keys and a plain ``from_pretrained``
of the folder silently re-initialized those layers (logits off by 0.84); DPO with ``ref_model=None``
tried to reload the model by name; the sequence-classification head of a reward model stayed frozen
and was never saved.
"""

import copy
import os

import pytest
import torch

import peftcore as pc

from pc_testing import tiny_inputs, tiny_model, tiny_texts, tiny_tokenizer

tf = pytest.importorskip("transformers", reason="transformers is in the test extra")
peft = pytest.importorskip("peft", reason="peft is in the test extra")
pytestmark = pytest.mark.hf
KINDS = ["llama", "gpt2", "bert"]


def _adapted(kind="llama", seed=3, **kw):
    base, targets = tiny_model(kind)
    model = pc.apply(copy.deepcopy(base), pc.LoRAConfig(r=4, alpha=8, target_modules=targets, **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return base, model


def _out(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _auto(kind):
    return tf.AutoModel if kind == "bert" else tf.AutoModelForCausalLM


@pytest.mark.parametrize("kind", KINDS)
def test_save_pretrained_folder_loads_anywhere_with_equal_outputs(kind, tmp_path):
    base, model = _adapted(kind)
    ids = tiny_inputs()
    with torch.no_grad():
        want = _out(model, ids)
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"config.json", "model.safetensors", "adapter_config.json", "adapter_model.safetensors"} <= files
    with torch.no_grad():
        # transformers' own loader: the base from the folder (its own keys), then the adapter (PEFT)
        plain = _auto(kind).from_pretrained(tmp_path).eval()
        torch.testing.assert_close(_out(plain, ids), want, rtol=1e-5, atol=1e-5)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
        torch.testing.assert_close(_out(theirs, ids), want, rtol=1e-5, atol=1e-5)
        ours = pc.load_adapter(copy.deepcopy(base), tmp_path)
        torch.testing.assert_close(_out(ours, ids), want, rtol=1e-5, atol=1e-5)


def test_save_pretrained_of_a_merged_model_writes_the_unmerged_base(tmp_path):
    _, model = _adapted("llama")
    ids = tiny_inputs()
    pc.merge(model)
    with torch.no_grad():
        want = _out(model, ids)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        plain = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # base + adapter once, not twice
        torch.testing.assert_close(_out(plain, ids), want, rtol=1e-5, atol=1e-5)
    assert all(layer.merged for _, layer in pc.model.lora_layers(model))  # merged again after the write


def test_several_adapters_save_in_peft_layout(tmp_path):
    _, model = _adapted("llama")
    base2, targets = tiny_model("llama")
    pc.apply(model, pc.LoRAConfig(r=2, target_modules=targets), name="other", activate=False)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "other" / "adapter_config.json").is_file()


@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_gives_a_plain_model(kind, tmp_path):
    _, model = _adapted(kind)
    ids = tiny_inputs()
    with torch.no_grad():
        want = _out(model, ids)
    plain = pc.merge_and_unload(model)
    assert plain is model and not any(isinstance(m, pc.layers.AdapterHost) for m in plain.modules())
    assert pc.adapter_configs(plain) == {} and "save_pretrained" not in plain.__dict__
    with torch.no_grad():
        torch.testing.assert_close(_out(plain, ids), want, rtol=1e-5, atol=1e-5)
    plain.save_pretrained(tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()
    back, info = _auto(kind).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        torch.testing.assert_close(_out(back.eval(), ids), want, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_refuses_unmergeable_adapters_and_changes_nothing():
    _, model = _adapted("llama")
    pc.apply(model, pc.BottleneckConfig(reduction_factor=4), name="bn")
    modules = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="'bn' is a BottleneckConfig adapter"):
        pc.merge_and_unload(model)
    assert [type(m) for m in model.modules()] == modules


def test_reference_model_shares_every_weight_and_runs_the_base():
    base, model = _adapted("llama", modules_to_save=["lm_head"])
    ref = pc.reference_model(model)
    ptrs = {p.data_ptr() for p in model.parameters()}
    assert {p.data_ptr() for p in ref.parameters()} <= ptrs  # no second copy of any weight
    assert not any(isinstance(m, pc.layers.AdapterHost) for m in ref.modules())
    ids = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(_out(ref, ids), _out(base, ids))
        assert not torch.allclose(_out(model, ids), _out(base, ids))
    model.train()
    assert not ref.training and model.training  # modes of their own


def _trainer(model, tmp_path, steps, **kw):
    from datasets import Dataset

    ids = tiny_inputs(seed=3, batch=16, seq=12)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = tf.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, max_steps=steps, per_device_train_batch_size=4,
                                learning_rate=2e-2, logging_steps=1, report_to=[], disable_tqdm=True, seed=0,
                                save_strategy="steps", save_steps=3, **kw)
    return tf.Trainer(model=model, args=args, train_dataset=data)


def _adapter(model):
    return {k: v.clone() for k, v in pc.io.adapter_state_dict(model, "default").items()}


def test_trainer_trains_saves_and_resumes_exactly(tmp_path):
    base, _ = tiny_model("llama")
    cfg = pc.LoRAConfig(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"])
    model = pc.apply(copy.deepcopy(base), cfg).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer = _trainer(model, tmp_path / "a", 6)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    full = _adapter(model)
    ckpt = tmp_path / "a" / "checkpoint-3"
    assert (ckpt / "adapter_config.json").is_file() and (ckpt / "model.safetensors").is_file()

    again = pc.apply(copy.deepcopy(base), cfg).train()  # a fresh process would build it the same way
    _trainer(again, tmp_path / "a", 6).train(resume_from_checkpoint=str(ckpt))
    resumed = _adapter(again)
    assert resumed.keys() == full.keys()
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=1e-6, msg=k)
    # the final folder the trainer wrote loads with transformers alone (+ peft for the adapter)
    trainer.save_model(str(tmp_path / "final"))
    ids = tiny_inputs()
    with torch.no_grad():
        plain = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
        torch.testing.assert_close(_out(plain, ids), _out(model.eval(), ids), rtol=1e-5, atol=1e-5)


def test_save_adapter_callback_writes_checkpoints_of_a_bare_module(tmp_path):
    from pc_testing import tiny_inputs as _ids

    class Bare(torch.nn.Module):  # not a transformers model: Trainer saves a bare state dict
        def __init__(self):
            super().__init__()
            self.net = tiny_model("llama")[0]

        def forward(self, input_ids, labels=None):
            return self.net(input_ids=input_ids, labels=labels)

    model = pc.apply(Bare(), pc.LoRAConfig(r=2, target_modules=["q_proj"]))
    from datasets import Dataset

    ids = _ids(batch=8)
    args = tf.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, max_steps=2, save_steps=1,
                                per_device_train_batch_size=4, report_to=[], disable_tqdm=True)
    trainer = tf.Trainer(model=model, args=args, callbacks=[pc.SaveAdapterCallback()],
                         train_dataset=Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}))
    trainer.train()
    for d in (tmp_path / "checkpoint-1", tmp_path / "checkpoint-2", tmp_path):
        assert (d / "adapter_model.safetensors").is_file(), d
    loaded = pc.load_adapter(pc.distributed.unwrap(Bare()), tmp_path / "checkpoint-2")
    assert pc.adapter_configs(loaded)


# --------------------------------------------------------------------------- TRL


@pytest.fixture
def trl():
    return pytest.importorskip("trl", reason="trl is in the test extra")


def test_trl_sft_trainer_with_its_default_config_trains(trl, tmp_path):
    """SFTConfig's defaults include bf16=True, on the CPU too (autocast bf16)."""
    from datasets import Dataset

    base, targets = tiny_model("llama")
    model = pc.apply(copy.deepcopy(base), pc.LoRAConfig(r=4, alpha=8, dropout=0.1, target_modules=targets))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    data = Dataset.from_dict({"text": tiny_texts(32, 10, lo=0, hi=8)})  # a tiny vocabulary: learnable
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=15, per_device_train_batch_size=8, learning_rate=3e-2,
                         logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                         max_length=16)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tiny_tokenizer())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-3:]) < sum(losses[:3])
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    trainer.save_model(str(tmp_path / "out"))
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_trl_dpo_with_peftcore_reference_model_needs_no_second_copy(trl, tmp_path):
    from datasets import Dataset

    base, targets = tiny_model("llama")
    model = pc.apply(copy.deepcopy(base), pc.LoRAConfig(r=4, alpha=8, target_modules=targets))
    ref = pc.reference_model(model)
    assert {p.data_ptr() for p in ref.parameters()} <= {p.data_ptr() for p in model.parameters()}
    prompts = tiny_texts(16, 4, seed=1)
    data = Dataset.from_dict({"prompt": prompts, "chosen": tiny_texts(16, 3, seed=2, lo=0, hi=4),
                              "rejected": tiny_texts(16, 3, seed=3, lo=40, hi=44)})
    args = trl.DPOConfig(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8, learning_rate=5e-2,
                         logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, beta=0.1)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer = trl.DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=data,
                             processing_class=tiny_tokenizer())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[-1]["loss"] < logs[0]["loss"]
    margins = [h[k] for h in logs for k in h if k.endswith("rewards/margins")]
    assert margins and margins[-1] > margins[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    # the reference is still the untouched base (accelerate wrapped its forward in DPOConfig's
    # default bf16 autocast, so compare under the same autocast)
    assert all(torch.equal(p, base.get_parameter(n)) for n, p in ref.named_parameters())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ids = tiny_inputs()
        torch.testing.assert_close(_out(ref, ids), _out(base, ids).float())  # accelerate casts outputs to fp32


def _reward_model(kind="llama"):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         num_labels=1, pad_token_id=0)
    return tf.LlamaForSequenceClassification(cfg)


def test_trl_reward_trainer_trains_and_saves_the_head(trl, tmp_path):
    from datasets import Dataset

    base = _reward_model()
    model = pc.apply(copy.deepcopy(base), pc.LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    head0 = model.score.modules_to_save["default"].weight.detach().clone()
    data = Dataset.from_dict({"chosen": tiny_texts(32, 6, seed=4, lo=0, hi=10),
                              "rejected": tiny_texts(32, 6, seed=5, lo=50, hi=60)})
    args = trl.RewardConfig(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8, learning_rate=3e-2,
                            logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = trl.RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tiny_tokenizer())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert not torch.equal(model.score.modules_to_save["default"].weight, head0)  # the head trained
    assert torch.equal(model.score.original_module.weight, base.score.weight)
    pc.save_adapter(model, tmp_path / "rm")
    ids = tiny_inputs()
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "rm").eval()
    ours = pc.load_adapter(copy.deepcopy(base), tmp_path / "rm")
    trained = model.score.modules_to_save["default"].weight
    assert torch.equal(ours.score.modules_to_save["default"].weight, trained)
    assert torch.equal(theirs.base_model.model.score.modules_to_save["default"].weight, trained)
    with torch.no_grad():  # (the trained model's forward is wrapped in RewardConfig's bf16 autocast)
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_accelerate_bf16_training_loop(tmp_path):
    accelerate = pytest.importorskip("accelerate", reason="accelerate is in the test extra")
    base, targets = tiny_model("llama")
    model = pc.apply(copy.deepcopy(base), pc.LoRAConfig(r=4, alpha=8, dropout=0.1, target_modules=targets)).train()
    acc = accelerate.Accelerator(mixed_precision="bf16", cpu=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model, opt = acc.prepare(model, opt)
    ids = tiny_inputs(seed=5, batch=8, seq=12)
    losses = []
    for _ in range(10):
        with acc.autocast():
            loss = model(input_ids=ids, labels=ids).loss
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and all(map(lambda v: v == v, losses))
