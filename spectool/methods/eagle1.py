"""EAGLE-1/2 (SafeAILab): a one-layer Llama draft that regresses the target's post-norm last hidden state from
(hidden state, next token embedding) and shares the target's lm_head; EAGLE-2 is its dynamic-tree decoding.

Checkpoints: `LlamaForCausalLMEagle` with SafeAILab's keys (`embed_tokens`, `fc`, `layers.*`, optional `norm`);
SafeAILab's own releases (`yuhuili/EAGLE-*`) call themselves `LlamaForCausalLM` and are told by their weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from spectool.layout import Tensor, attention_tensors, mlp_tensors, norm_tensor
from spectool.methods.base import DraftMethod, DraftSpec, PublishedConfig, strip_prefixes

#: The dense targets both EAGLE formats serve.
DENSE_TARGETS = ("LlamaForCausalLM", "Phi3ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM")


class Eagle1(DraftMethod):
    """EAGLE-1/2: feature regression on the last hidden state, chains or EAGLE-2 trees at decode time."""

    name = "eagle1"
    title = "EAGLE-1/2"
    order = 10
    supported = dict.fromkeys(DENSE_TARGETS, "LlamaEagleDraftModel")
    checkpoint_architectures = ("LlamaForCausalLMEagle", "LlamaEagleDraftModel")
    checkpoint_format = "EAGLE-1/2 (LlamaForCausalLMEagle: SafeAILab EAGLE keys embed_tokens, fc, layers.*, plus norm)"
    required_keys = ("fc.weight", "embed_tokens.weight")
    loaders = "SGLang, vLLM, spectool"
    conversions = ("sglang", "vllm")
    engine_names = {"vllm": "eagle", "sglang": "EAGLE"}
    default_lr = 1e-4
    reads_feature_layers = False
    fixed_feature_count = 1
    stores_target_tensors = True
    supports_tree = True
    draft_model = "spectool.drafts.eagle1:LlamaEagleDraftModel"
    draft_config = "spectool.drafts.eagle1:EagleDraftConfig"
    objective = "spectool.training.objectives.eagle1:Eagle1Objective"
    proposer = "spectool.decoding.proposers:Eagle1Proposer"
    takes_draft_vocab = True

    def layout(self, spec: DraftSpec, arch: Any) -> list[Tensor]:
        h, v = arch.hidden_size, arch.vocab_size
        tensors = [
            Tensor("embed_tokens.weight", (v, h), "frozen"),
            Tensor("fc.weight", (h, 2 * h), "trainable"),
            Tensor("fc.bias", (h,), "trainable"),
        ]
        for i in range(spec.num_draft_layers):
            p = f"layers.{i}"
            tensors += attention_tensors(f"{p}.self_attn", arch, h, qk_norm=False)
            tensors += mlp_tensors(f"{p}.mlp", arch)
            if i > 0:  # SafeAILab's EAGLE: the first layer's input is fc's output, not normed again
                tensors.append(norm_tensor(f"{p}.input_layernorm", arch))
            tensors.append(norm_tensor(f"{p}.post_attention_layernorm", arch))
        tensors.append(norm_tensor("norm", arch))
        tensors.append(Tensor("lm_head.weight", (v, h), "borrowed"))
        return tensors

    def build_config(self, target_config: Any, ids: list[int] | None, options: dict[str, Any]) -> Any:
        num_layers = options.get("num_draft_layers") or 1
        return self.config_class().from_target(target_config, num_draft_layers=num_layers, **options["overrides"])

    def copy_target_tensors(self, draft: Any, weights: Mapping[str, Any], spec: DraftSpec) -> None:
        draft.embed_tokens.weight.data.copy_(weights["embed_tokens"])

    def claims_by_weights(self, config: Mapping[str, Any], shapes: Mapping[str, Sequence[int]]) -> bool:
        """SafeAILab's EAGLE-1 checkpoints (yuhuili/EAGLE-*) call themselves a plain causal LM (`LlamaForCausalLM`):
        they are told apart by their weights, an `fc` from 2H to H in front of `layers.*`, and no `model.layers.*`."""
        archs = config.get("architectures") or []
        if not archs or not all(str(a).endswith("ForCausalLM") for a in archs):
            return False
        names = {strip_prefixes(k): v for k, v in shapes.items()}
        fc, hidden = names.get("fc.weight"), config.get("hidden_size")
        return (
            fc is not None
            and isinstance(hidden, int)
            and tuple(fc) == (hidden, 2 * hidden)
            and any(k.startswith("layers.0.") for k in names)
            and not any(k.startswith(("model.layers.", "midlayer.")) for k in shapes)
        )

    def normalise_config(self, published: PublishedConfig) -> dict[str, Any]:
        config, shapes = dict(published.config), published.shapes
        if set(config.get("architectures") or []) & set(self.checkpoint_architectures):
            return config
        config["architectures"] = [self.checkpoint_architectures[0]]
        config.setdefault("fc_bias", "fc.bias" in shapes)
        config.setdefault("final_norm", "norm.weight" in shapes)
        if "qkv_bias" in config:
            config.setdefault("attention_bias", bool(config["qkv_bias"]))
        published.notes.append(
            "read a SafeAILab EAGLE layout (a one-layer LlamaForCausalLM config; fc bias "
            f"{'yes' if config['fc_bias'] else 'no'}, final norm {'yes' if config['final_norm'] else 'no'})"
        )
        return config
