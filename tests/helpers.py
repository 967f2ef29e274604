"""Tiny transformers models built from configs (no download) for model-level tests."""

import torch


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
