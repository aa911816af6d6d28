"""A tiny Llama written as a GGUF file, as llama.cpp's converter lays one out, for the GGUF target tests.

The model is random (2 layers, hidden 64) with the embedded tiny target's byte-level BPE tokenizer, stored as
float32 tensors (exact), so the converted cache must give the same logits as the model written here. The q / k
projections are permuted the way llama.cpp stores them; transformers' reader undoes that.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from spectool.hub import DEFAULT_MODEL_DIR

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def _llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(path: Path, model: LlamaForCausalLM | None = None) -> LlamaForCausalLM:
    """Write `model` (default: `tiny_llama()`) to `path` as a GGUF file; returns the model written."""
    import gguf

    model = model or tiny_llama()
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama-test")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta if hasattr(config, "rope_theta") else 10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_tokenizer(writer, config.vocab_size)
    for name, tensor in _gguf_tensors(model).items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def _gguf_tensors(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    config = model.config
    weights = {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}
    out = {
        "token_embd.weight": weights["model.embed_tokens.weight"],
        "output_norm.weight": weights["model.norm.weight"],
    }
    names = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for layer in range(config.num_hidden_layers):
        for hf_name, gguf_name in names.items():
            weight = weights[f"model.layers.{layer}.{hf_name}.weight"]
            if hf_name == "self_attn.q_proj":
                weight = _llama_cpp_permute(weight, config.num_attention_heads)
            elif hf_name == "self_attn.k_proj":
                weight = _llama_cpp_permute(weight, config.num_key_value_heads)
            out[f"blk.{layer}.{gguf_name}.weight"] = weight
    return out


def _add_tokenizer(writer, vocab_size: int) -> None:
    data = json.loads((DEFAULT_MODEL_DIR / "tokenizer.json").read_text(encoding="utf-8"))
    by_id = {index: token for token, index in data["model"]["vocab"].items()}
    special = {item["id"]: item["content"] for item in data["added_tokens"]}
    by_id.update(special)
    tokens = [by_id.get(index, f"[PAD{index}]") for index in range(vocab_size)]
    types = [3 if index in special else (5 if index not in by_id else 1) for index in range(vocab_size)]
    merges = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    ids = {content: index for index, content in special.items()}
    writer.add_bos_token_id(ids["<|im_start|>"])
    writer.add_eos_token_id(ids["<|im_end|>"])
    writer.add_pad_token_id(ids["<|endoftext|>"])
    writer.add_chat_template(CHAT_TEMPLATE)
