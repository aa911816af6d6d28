"""Draft registries: which targets each method supports, and the resolved shape of a draft (`DraftSpec`).

Dispatch is on the target config's `architectures` strings (SPEC §1): the first string of
`config.architectures` that the method's registry knows wins. Adding a target family whose draft fits the
config-driven shape is a one-line append, e.g. ``DFLASH_REGISTRY["Qwen3NextForCausalLM"] = "Qwen3DFlashDraftModel"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from spectool.arch import TargetArch
from spectool.errors import SpectoolError, UsageError
from spectool.layers import EAGLE3_NUM_FEATURE_LAYERS, build_target_layer_ids, validate_layer_ids

METHODS = ("eagle1", "eagle3", "dflash", "dspark")
METHOD_TITLES = {"eagle1": "EAGLE-1/2", "eagle3": "EAGLE-3", "dflash": "DFlash", "dspark": "DSpark"}

_DENSE = ("LlamaForCausalLM", "Phi3ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM")

EAGLE1_REGISTRY: dict[str, str] = {arch: "LlamaEagleDraftModel" for arch in _DENSE}
EAGLE3_REGISTRY: dict[str, str] = {arch: "LlamaEagle3DraftModel" for arch in _DENSE}
EAGLE3_REGISTRY["GptOssForCausalLM"] = "GptOssEagle3DraftModel"  # same draft, YaRN rotary from the target
DFLASH_REGISTRY: dict[str, str] = {
    "Qwen3ForCausalLM": "Qwen3DFlashDraftModel",
    "Qwen3MoeForCausalLM": "Qwen3DFlashDraftModel",
}
DSPARK_REGISTRY: dict[str, str] = {
    "Qwen3ForCausalLM": "Qwen3DSparkModel",
    "Qwen3MoeForCausalLM": "Qwen3DSparkModel",
}
REGISTRIES: dict[str, dict[str, str]] = {
    "eagle1": EAGLE1_REGISTRY,
    "eagle3": EAGLE3_REGISTRY,
    "dflash": DFLASH_REGISTRY,
    "dspark": DSPARK_REGISTRY,
}

#: The on-disk layout `spectool init` writes for each method (SPEC §5).
CHECKPOINT_FORMATS = {
    "eagle1": "EAGLE-1/2 (LlamaForCausalLMEagle: SafeAILab EAGLE keys embed_tokens, fc, layers.*, plus norm)",
    "eagle3": "EAGLE-3 for SGLang / vLLM (LlamaForCausalLMEagle3: midlayer.*, fc, norm, lm_head, d2t, t2d)",
    "dflash": "z-lab DFlash (DFlashDraftModel: layers.*, fc, hidden_norm, norm) for the dflash package and vLLM",
    "dspark": "DeepSpec DSpark (Qwen3DSparkModel: DFlash keys + embed_tokens, lm_head, markov/confidence heads)",
}

#: EAGLE-3 prunes the draft vocabulary to this many of the most frequent supervised tokens by default.
EAGLE3_DRAFT_VOCAB_SIZE = 32000


class UnsupportedArchitecture(SpectoolError):
    """The target's architectures are not in the method's registry (exit code 1)."""


@dataclass(frozen=True)
class DraftSpec:
    """A draft resolved against one target: its class, feature layers and shape options."""

    method: str
    architecture: str  # the target architecture string that matched the registry
    draft_class: str
    checkpoint_format: str
    num_target_layers: int
    target_layer_ids: tuple[int, ...]
    num_draft_layers: int
    block_size: int | None = None  # DFlash / DSpark
    mask_token_id: int | None = None  # DFlash / DSpark; None = unknown, must be given
    draft_vocab_size: int | None = None  # EAGLE-3; None = the full target vocabulary
    markov_rank: int | None = None  # DSpark


def check_method(method: str) -> str:
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def match_architecture(method: str, architectures: Sequence[str]) -> tuple[str, str]:
    """(architecture, draft class) for the first of `architectures` the method's registry knows."""
    registry = REGISTRIES[check_method(method)]
    for arch in architectures:
        if arch in registry:
            return arch, registry[arch]
    given = ", ".join(architectures) if architectures else "none listed in config.json"
    raise UnsupportedArchitecture(
        f"{METHOD_TITLES[method]} has no draft for architectures [{given}]; supported: {', '.join(registry)}"
    )


def default_num_draft_layers(method: str, num_target_layers: int) -> int:
    """Draft depth: EAGLE uses one layer; DFlash / DSpark use 5 upstream, fewer on shallow targets."""
    if method in ("eagle1", "eagle3"):
        return 1
    return 5 if num_target_layers >= 24 else max(1, min(5, num_target_layers // 4))


def default_mask_token_id(vocab_size: int, tokenizer_length: int | None) -> int | None:
    """The first unused embedding row (`len(tokenizer)`), when the embedding has spare rows."""
    if tokenizer_length is not None and vocab_size > tokenizer_length:
        return tokenizer_length
    return None


def resolve(
    method: str,
    target: TargetArch | dict[str, Any],
    *,
    tokenizer_length: int | None = None,
    num_feature_layers: int | None = None,
    num_draft_layers: int | None = None,
    target_layer_ids: Sequence[int] | None = None,
    block_size: int | None = None,
    mask_token_id: int | None = None,
    draft_vocab_size: int | None = None,
    markov_rank: int | None = None,
) -> DraftSpec:
    """Resolve `method` against a target: registry match, default or validated layer ids, draft shape.

    Every option left as None takes the method's default scaled to the target: DFlash / DSpark use fewer
    layers (depth // 4, at most 5) and DFlash a block of 8 instead of 16 on targets under 24 layers; DSpark
    keeps its block of 7 and uses a Markov rank of 64 below hidden size 1024 (256 upstream).
    """
    arch = target if isinstance(target, TargetArch) else TargetArch.from_config(target)
    architecture, draft_class = match_architecture(method, arch.architectures)
    n = arch.num_hidden_layers

    if num_draft_layers is None:
        num_draft_layers = default_num_draft_layers(method, n)
    elif num_draft_layers < 1:
        raise UsageError(f"--num-draft-layers must be at least 1, got {num_draft_layers}")

    if target_layer_ids is not None:
        expected = {"eagle1": 1, "eagle3": EAGLE3_NUM_FEATURE_LAYERS}.get(method, num_feature_layers)
        ids = validate_layer_ids(list(target_layer_ids), n, expected_count=expected, method=METHOD_TITLES[method])
    else:
        if num_feature_layers is None and method == "dflash":
            num_feature_layers = min(num_draft_layers, max(1, n - 3))
        elif num_feature_layers is None and method == "dspark":
            num_feature_layers = min(5, max(1, n - 1))
        ids = build_target_layer_ids(method, n, num_feature_layers)

    spec: dict[str, Any] = {}
    if method in ("dflash", "dspark"):
        default_block = 7 if method == "dspark" else (16 if n >= 24 else 8)
        spec["block_size"] = default_block if block_size is None else block_size
        if spec["block_size"] < 2:
            raise UsageError(f"--block-size must be at least 2, got {spec['block_size']}")
        if mask_token_id is None:
            mask_token_id = default_mask_token_id(arch.vocab_size, tokenizer_length)
        elif not 0 <= mask_token_id < arch.vocab_size:
            raise UsageError(
                f"--mask-token-id {mask_token_id} is outside the target's embedding [0, {arch.vocab_size - 1}]"
            )
        spec["mask_token_id"] = mask_token_id
    if method == "dspark":
        spec["markov_rank"] = markov_rank or (256 if arch.hidden_size >= 1024 else 64)
    if method == "eagle3":
        if draft_vocab_size is None:
            draft_vocab_size = EAGLE3_DRAFT_VOCAB_SIZE if arch.vocab_size > EAGLE3_DRAFT_VOCAB_SIZE else None
        elif not 1 <= draft_vocab_size <= arch.vocab_size:
            raise UsageError(f"--draft-vocab-size must be in [1, {arch.vocab_size}], got {draft_vocab_size}")
        spec["draft_vocab_size"] = None if draft_vocab_size == arch.vocab_size else draft_vocab_size

    return DraftSpec(
        method=method,
        architecture=architecture,
        draft_class=draft_class,
        checkpoint_format=CHECKPOINT_FORMATS[method],
        num_target_layers=n,
        target_layer_ids=tuple(ids),
        num_draft_layers=num_draft_layers,
        **spec,
    )


def resolve_eagle1(target: TargetArch | dict[str, Any], **options: Any) -> DraftSpec:
    return resolve("eagle1", target, **options)


def resolve_eagle3(target: TargetArch | dict[str, Any], **options: Any) -> DraftSpec:
    return resolve("eagle3", target, **options)


def resolve_dflash(target: TargetArch | dict[str, Any], **options: Any) -> DraftSpec:
    return resolve("dflash", target, **options)


def resolve_dspark(target: TargetArch | dict[str, Any], **options: Any) -> DraftSpec:
    return resolve("dspark", target, **options)
