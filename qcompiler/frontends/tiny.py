"""Tiny random Hugging Face checkpoints of each supported family: for tests and ``bench --quick``."""

from __future__ import annotations

from pathlib import Path

TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, vocab_size=512)


def _tiny_config(family: str):
    import transformers as tf

    if family == "gpt2":
        return tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=256,
                             bos_token_id=0, eos_token_id=0, architectures=["GPT2LMHeadModel"])
    if family == "llama":
        return tf.LlamaConfig(**TINY, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              architectures=["LlamaForCausalLM"])
    if family == "qwen2":
        return tf.Qwen2Config(**TINY, num_attention_heads=4, num_key_value_heads=2,
                              architectures=["Qwen2ForCausalLM"])
    if family == "gemma2":
        return tf.Gemma2Config(**TINY, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               architectures=["Gemma2ForCausalLM"])
    if family == "gemma3":  # one KV head, q/k norms, a sliding layer (window 4) and a full one
        return tf.Gemma3TextConfig(**TINY, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                   sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                                   architectures=["Gemma3ForCausalLM"])
    if family == "phi3":  # fused qkv_proj and gate_up_proj
        return tf.Phi3Config(**TINY, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             pad_token_id=0, eos_token_id=1, bos_token_id=1, architectures=["Phi3ForCausalLM"])
    if family == "bert":
        return tf.BertConfig(**TINY, num_attention_heads=4, max_position_embeddings=256,
                             architectures=["BertModel"])
    raise ValueError(family)


def make_tiny_checkpoint(family: str, folder: Path) -> Path:
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg = _tiny_config(family)
    cls = tf.AutoModel if family == "bert" else tf.AutoModelForCausalLM
    model = cls.from_config(cfg).eval()
    model.save_pretrained(folder)
    return folder


