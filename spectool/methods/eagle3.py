"""EAGLE-3: one decoder layer over the fused low / mid / high target features (`fc`), trained with test-time
training steps, with an optional pruned draft vocabulary (`d2t` / `t2d`).

Checkpoints: `LlamaForCausalLMEagle3` for SGLang / vLLM (`midlayer.*`, `fc`, `norm`, `lm_head`, `d2t`, `t2d`).
Also read: SpecForge / SGLang configs (which may name no feature layers), vLLM `speculators` (`Eagle3Speculator`:
`transformer_layer_config` plus layer ids in vLLM's numbering) and NeMo AutoModel exports (`model.`-prefixed keys,
the layer named `layers.0`, the target's depth in `num_hidden_layers`).

Feature layers are named for both engines: `eagle_config.eagle_aux_hidden_state_layer_ids` in spectool's
numbering (SGLang adds 1 itself) and a top-level `eagle_aux_hidden_state_layer_ids` in vLLM's (spectool id + 1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from spectool.errors import SpectoolError, UsageError
from spectool.layers import eagle3_layer_ids, engine_default_eagle3_ids, engine_ids, from_engine_ids
from spectool.layout import Tensor, attention_tensors, mlp_tensors, norm_tensor
from spectool.methods.base import DraftMethod, DraftSpec, PublishedConfig, feature_count, int_list, load_reference
from spectool.methods.eagle1 import DENSE_TARGETS
from spectool.methods.options import MethodOption

#: EAGLE-3 prunes the draft vocabulary to this many of the most frequent supervised tokens by default.
DRAFT_VOCAB_SIZE = 32000
#: Keys of config.json that say where the feature layers come from (the published checkpoint layouts).
EAGLE_CONFIG = "eagle_config"
VLLM_AUX_LAYER_IDS = "eagle_aux_hidden_state_layer_ids"
NUM_FEATURE_LAYERS = 3


class Eagle3(DraftMethod):
    """EAGLE-3: fused multi-layer features, TTT training, chains or EAGLE-2 trees at decode time."""

    name = "eagle3"
    title = "EAGLE-3"
    order = 20
    supported = {
        **dict.fromkeys(DENSE_TARGETS, "LlamaEagle3DraftModel"),
        "GptOssForCausalLM": "GptOssEagle3DraftModel",  # same draft, YaRN rotary from the target
    }
    checkpoint_architectures = (
        "LlamaForCausalLMEagle3",
        "Eagle3LlamaForCausalLM",
        "LlamaEagle3DraftModel",
        "GptOssEagle3DraftModel",
        "Eagle3Speculator",  # vLLM speculators format (speculators_config + transformer_layer_config)
        "Eagle3DraftModel",
    )
    checkpoint_format = "EAGLE-3 for SGLang / vLLM (LlamaForCausalLMEagle3: midlayer.*, fc, norm, lm_head, d2t, t2d)"
    required_keys = ("fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d")
    loaders = "SGLang, vLLM (and vLLM speculators' converter), spectool"
    conversions = ("sglang", "vllm")
    engine_names = {"vllm": "eagle3", "sglang": "EAGLE3"}
    speculators_algorithm = "eagle3"
    default_lr = 1e-4
    fixed_feature_count = NUM_FEATURE_LAYERS
    fixed_draft_layers = 1
    stores_target_tensors = True
    supports_tree = True
    options = (
        MethodOption(
            "draft_vocab_size",
            int,
            f"draft vocabulary size [{DRAFT_VOCAB_SIZE}, or the target's when smaller].",
            "shape",
            minimum=1,
        ),
        MethodOption("ttt_steps", int, "training-time-test steps [7].", "objective", minimum=1),
    )
    draft_model = "spectool.drafts.eagle3:LlamaEagle3DraftModel"
    draft_config = "spectool.drafts.eagle3:Eagle3DraftConfig"
    objective = "spectool.training.objectives.eagle3:Eagle3Objective"
    proposer = "spectool.decoding.proposers:Eagle3Proposer"

    # -- shape ----------------------------------------------------------------------------------------------------

    def default_layer_ids(self, num_target_layers: int, num_feature_layers: int | None) -> list[int]:
        if num_feature_layers not in (None, NUM_FEATURE_LAYERS):
            raise UsageError(f"EAGLE-3 fuses exactly 3 feature layers (low, mid, high), got {num_feature_layers}")
        return eagle3_layer_ids(num_target_layers)

    def resolve_options(
        self, arch: Any, tokenizer_length: int | None, options: dict[str, Any], *, unused_token_id: int | None = None
    ) -> dict:
        size = options.get("draft_vocab_size")
        if size is None:
            size = DRAFT_VOCAB_SIZE if arch.vocab_size > DRAFT_VOCAB_SIZE else None
        elif not 1 <= size <= arch.vocab_size:
            raise UsageError(f"--draft-vocab-size must be in [1, {arch.vocab_size}], got {size}")
        return {"draft_vocab_size": None if size == arch.vocab_size else size}

    def layout(self, spec: DraftSpec, arch: Any) -> list[Tensor]:
        h, v = arch.hidden_size, arch.vocab_size
        vd = spec.option("draft_vocab_size") or v
        tensors = [Tensor("embed_tokens.weight", (v, h), "borrowed")]
        tensors += attention_tensors("midlayer.self_attn", arch, 2 * h, qk_norm=False)
        tensors += mlp_tensors("midlayer.mlp", arch)
        tensors += [
            norm_tensor("midlayer.input_layernorm", arch),
            norm_tensor("midlayer.hidden_norm", arch),
            norm_tensor("midlayer.post_attention_layernorm", arch),
            Tensor("fc.weight", (h, len(spec.target_layer_ids) * h), "trainable"),
            norm_tensor("norm", arch),
            Tensor("lm_head.weight", (vd, h), "trainable"),
        ]
        if spec.option("draft_vocab_size"):
            tensors += [Tensor("d2t", (vd,), "buffer", "int64"), Tensor("t2d", (v,), "buffer", "bool")]
        return tensors

    def serving_notes(self, config: Mapping[str, Any], engine: str) -> list[str]:
        if engine == "vllm" and VLLM_AUX_LAYER_IDS not in config and "eagle_config" in config:
            return [
                "this draft's config.json names its layers only as SGLang does (eagle_config."
                f"{VLLM_AUX_LAYER_IDS}): current vLLM ignores that key and captures its default layers, older "
                "releases read it one layer off; pass --out DIR to write a copy vLLM reads right"
            ]
        return []

    def speculators_kwargs(self, config: Mapping[str, Any]) -> dict[str, Any]:
        # speculators 0.9.0 does not read the layer ids from config.json: without them it takes [2, n//2, n-3]
        ids = config.get(VLLM_AUX_LAYER_IDS)
        return {VLLM_AUX_LAYER_IDS: list(ids)} if ids else {}

    def notes(self, spec: DraftSpec, *, initialised: bool) -> list[str]:
        if initialised and spec.option("draft_vocab_size"):
            return [
                f"draft vocabulary = target ids 0..{spec.option('draft_vocab_size') - 1} for now; `spectool train` rebuilds it "
                "from the most frequent supervised tokens of your data"
            ]
        if not initialised and spec.option("draft_vocab_size") is None:
            return ["draft vocabulary = the full target vocabulary (no pruning, no d2t / t2d)"]
        return []

    def shape_phrases(self, spec: DraftSpec, arch: Any) -> list[str]:
        return [f"draft vocab {spec.option('draft_vocab_size') or arch.vocab_size}"]

    # -- building -------------------------------------------------------------------------------------------------

    def model_class(self, config: Mapping[str, Any] | Any) -> type:
        get = config.get if isinstance(config, Mapping) else lambda key: getattr(config, key, None)
        rope = get("rope_parameters") or {}
        if "GptOssEagle3DraftModel" in (get("architectures") or []) or rope.get("rope_type") == "yarn":
            return load_reference("spectool.drafts.eagle3:GptOssEagle3DraftModel")
        return load_reference(self.draft_model)

    def build_config(self, target_config: Any, ids: list[int] | None, options: dict[str, Any]) -> Any:
        if ids is None:
            raise UsageError("eagle3 needs target_layer_ids")
        if options.get("num_draft_layers") not in (None, 1):
            raise UsageError("the EAGLE-3 format holds exactly one decoder layer; drop --num-draft-layers")
        return self.config_class().from_target(
            target_config,
            target_layer_ids=ids,
            draft_vocab_size=options.get("draft_vocab_size"),
            **options["overrides"],
        )

    def copy_target_tensors(self, draft: Any, weights: Mapping[str, Any], spec: DraftSpec) -> None:
        """The lm_head rows of the draft vocabulary (all rows when it is not pruned)."""
        head = weights["lm_head"]
        if spec.option("draft_vocab_size"):
            import torch

            head = head[draft.draft_to_target(torch.arange(spec.option("draft_vocab_size")))]
        draft.lm_head.weight.data.copy_(head)

    # -- checkpoints ----------------------------------------------------------------------------------------------

    key_renaming = "layers.0 -> midlayer"

    def claims(self, config: Mapping[str, Any]) -> bool:
        return EAGLE_CONFIG in config or config.get("speculators_model_type") == "eagle3"

    def checkpoint_key(self, name: str) -> str:
        # NeMo AutoModel and vLLM speculators name the EAGLE-3 layer layers.0
        return "midlayer." + name[len("layers.0.") :] if name.startswith("layers.0.") else name

    def normalise_config(self, published: PublishedConfig) -> dict[str, Any]:
        notes, where = published.notes, published.where
        config, depth = _published_eagle3(published.config, notes, where, published.depth)
        depth = depth or (config.get("num_target_layers") if isinstance(config.get("num_target_layers"), int) else None)
        ids = _layer_ids(config, notes, where)
        if not ids and depth and feature_count(config, published.shapes) == NUM_FEATURE_LAYERS:
            try:
                ids = engine_default_eagle3_ids(depth)
            except UsageError:
                ids = None
            if ids:
                notes.append(
                    f"config.json names no EAGLE-3 feature layers; using the engines' default for its {depth}-layer "
                    f"target: {ids} (engine ids {engine_ids(ids)})"
                )
        nested = config.get(EAGLE_CONFIG) if isinstance(config.get(EAGLE_CONFIG), dict) else {}
        eagle = {k: v for k, v in nested.items() if k != VLLM_AUX_LAYER_IDS}
        if ids:
            eagle[VLLM_AUX_LAYER_IDS] = ids
        config[EAGLE_CONFIG] = eagle
        config.pop("target_layer_ids", None)
        return config

    def config_layer_ids(self, config: Mapping[str, Any]) -> list[int] | None:
        return (config.get(EAGLE_CONFIG) or {}).get(VLLM_AUX_LAYER_IDS) or None

    def missing_feature_layers(self, count: float, fc_in: int, width: int, where: str) -> None:
        if count != NUM_FEATURE_LAYERS:
            raise SpectoolError(
                f"{where}: names no feature layers and fc.weight takes {fc_in} inputs ({count:g} layers of width "
                f"{width}), not the 3 the engines default to; name them in {EAGLE_CONFIG}.{VLLM_AUX_LAYER_IDS}"
            )

    def adapt_loaded_weights(self, model: Any, tensors: dict[str, Any], notes: list[str]) -> None:
        expected = model.state_dict()
        _unpruned_vocab_buffers(expected, tensors)
        if "embed_tokens.weight" in tensors and "embed_tokens.weight" not in expected:
            del tensors["embed_tokens.weight"]
            notes.append("ignored the checkpoint's embed_tokens.weight: EAGLE-3 drafts use the target's embedding")

    def layer_ids_for_target(self, loaded_ids: list[int], num_target_layers: int) -> tuple[list[int], str] | None:
        if loaded_ids:
            return None
        n = num_target_layers
        try:
            ids = engine_default_eagle3_ids(n)
        except UsageError:
            raise SpectoolError(
                f"names no EAGLE-3 feature layers and the engines' default [1, N//2-1, N-4] does not "
                f"fit a {n}-layer target; name them in {EAGLE_CONFIG}.{VLLM_AUX_LAYER_IDS}"
            ) from None
        return ids, (
            f"config.json names no EAGLE-3 feature layers; using the layers SGLang and vLLM capture by default for a "
            f"{n}-layer target: {ids} (engine ids {engine_ids(ids)})"
        )

    def export_weights(self, model: Any, tensors: dict[str, Any]) -> None:
        if "d2t" not in tensors:
            import torch

            # Engines look for d2t / t2d even without pruning; the identity mapping keeps them from guessing.
            tensors["d2t"] = torch.zeros(model.config.draft_vocab_size or model.config.vocab_size, dtype=torch.long)
            tensors["t2d"] = torch.ones(model.config.vocab_size, dtype=torch.bool)

    def export_config(self, config: dict[str, Any], model: Any) -> None:
        """Name the feature layers for both engines (SGLang: nested, spectool's numbering; vLLM: top level, + 1).
        With no ids known, neither is written: the engines' defaults apply."""
        ids = list(getattr(model.config, "target_layer_ids", None) or [])
        eagle = dict(config.get(EAGLE_CONFIG) or {})
        eagle.pop(VLLM_AUX_LAYER_IDS, None)
        config.pop(VLLM_AUX_LAYER_IDS, None)
        if ids:
            eagle[VLLM_AUX_LAYER_IDS] = list(ids)
            config[VLLM_AUX_LAYER_IDS] = engine_ids(ids)
        config[EAGLE_CONFIG] = {**eagle, "use_aux_hidden_state": True}


def _refuse_variants(config: Mapping[str, Any], flags: Sequence[str], layout: str, where: str) -> None:
    on = [flag for flag in flags if config.get(flag)]
    if on:
        raise SpectoolError(
            f"{where}: this {layout} sets {', '.join(f'{flag}=true' for flag in on)}, an EAGLE-3 variant spectool's "
            "draft does not implement"
        )


def _published_eagle3(
    config: dict[str, Any], notes: list[str], where: str, depth: int | None
) -> tuple[dict[str, Any], int | None]:
    """A speculators or NeMo AutoModel config as a plain EAGLE-3 config (and the target depth it reveals)."""
    archs = config.get("architectures") or []
    if config.get("speculators_model_type") == "eagle3" or "transformer_layer_config" in config:
        return _flatten_speculators(config, notes, where), depth
    if "LlamaEagle3DraftModel" in archs and (config.get("num_hidden_layers") != 1 or "num_aux_hidden_states" in config):
        # NeMo AutoModel writes the target's text config (its depth in num_hidden_layers) plus the draft fields,
        # and records neither the draft's single layer nor the feature layers it trained on.
        _refuse_variants(config, ("parallel_drafting", "fc_norm", "norm_output"), "NeMo AutoModel export", where)
        config = dict(config)
        if isinstance(config.get("num_hidden_layers"), int) and config["num_hidden_layers"] > 1:
            depth = depth or config["num_hidden_layers"]
            config.setdefault("num_target_layers", config["num_hidden_layers"])
        config["num_hidden_layers"] = 1
        notes.append("read a NeMo AutoModel EAGLE-3 export (num_hidden_layers there is the target's depth)")
        return config, depth
    _refuse_variants(config, ("fc_norm",), "EAGLE-3 config", where)
    return dict(config), depth


def _flatten_speculators(config: dict[str, Any], notes: list[str], where: str) -> dict[str, Any]:
    """vLLM `speculators` EAGLE-3 (`Eagle3Speculator`): the decoder layer's Llama config sits in
    `transformer_layer_config`, the EAGLE-3 fields (`draft_vocab_size`, `target_hidden_size`,
    `eagle_aux_hidden_state_layer_ids` in vLLM's numbering, the norm flags) at the top level."""
    layer = config.get("transformer_layer_config")
    if not isinstance(layer, dict) or not layer:
        raise SpectoolError(f"{where}: a speculators EAGLE-3 config needs a transformer_layer_config object")
    _refuse_variants(config, ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output"), "speculators", where)
    if layer.get("model_type", "llama") != "llama":
        raise SpectoolError(
            f"{where}: transformer_layer_config.model_type is {layer.get('model_type')!r}; spectool reads the Llama "
            "EAGLE-3 layer (model_type llama) only"
        )
    out = dict(layer)
    out["architectures"] = ["LlamaForCausalLMEagle3"]
    for key in ("draft_vocab_size", "target_hidden_size", VLLM_AUX_LAYER_IDS):
        if config.get(key) is not None:
            out[key] = config[key]
    notes.append("read a vLLM speculators EAGLE-3 config (transformer_layer_config, layer ids in vLLM's numbering)")
    return out


def _layer_ids(config: dict[str, Any], notes: list[str], where: str) -> list[int] | None:
    """The feature layers a config names: SGLang's nested key, else vLLM's top-level one (numbering - 1), else a
    plain `target_layer_ids`. vLLM's key is removed from `config` (it is written back on save)."""
    nested = config.get(EAGLE_CONFIG) if isinstance(config.get(EAGLE_CONFIG), dict) else {}
    sglang_ids = int_list(nested.get(VLLM_AUX_LAYER_IDS), f"{EAGLE_CONFIG}.{VLLM_AUX_LAYER_IDS}", where)
    vllm_ids = int_list(config.pop(VLLM_AUX_LAYER_IDS, None), VLLM_AUX_LAYER_IDS, where)
    ids = sglang_ids
    if sglang_ids and vllm_ids and engine_ids(sglang_ids) != vllm_ids:
        notes.append(
            f"config.json's {EAGLE_CONFIG} (SGLang, spectool's numbering) names layers {sglang_ids} but its top-level "
            f"{VLLM_AUX_LAYER_IDS} (vLLM, numbering + 1) names layers {from_engine_ids(vllm_ids)}: SGLang and vLLM "
            "read different layers; spectool follows eagle_config"
        )
    elif not sglang_ids and vllm_ids:
        ids = from_engine_ids(vllm_ids)
    if not ids and isinstance(config.get("target_layer_ids"), list):
        ids = int_list(config.get("target_layer_ids"), "target_layer_ids", where)
    return ids


def _unpruned_vocab_buffers(expected: Mapping[str, Any], tensors: dict[str, Any]) -> None:
    """An unpruned EAGLE-3 draft has no d2t / t2d buffers; checkpoints written for engines carry the identity."""
    if "d2t" in expected:
        return
    d2t, t2d = tensors.get("d2t"), tensors.get("t2d")
    if d2t is None and t2d is None:
        return
    if d2t is not None and bool((d2t == 0).all()) and (t2d is None or bool(t2d.all())):
        tensors.pop("d2t", None)
        tensors.pop("t2d", None)
        return
    raise SpectoolError(
        "this EAGLE-3 checkpoint maps a pruned draft vocabulary (d2t/t2d) but config.json says draft_vocab_size "
        "equals vocab_size; fix draft_vocab_size in config.json"
    )
