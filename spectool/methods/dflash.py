"""DFlash (z-lab): a Qwen3-style block draft that reads fused target features and drafts a whole block
`[anchor, MASK x (B-1)]` in one forward, with the target's embedding and lm_head.

Checkpoints: `DFlashDraftModel` for the z-lab `dflash` package and vLLM (`layers.*`, `fc`, `hidden_norm`, `norm`;
the target's embedding / lm_head are not stored). Feature layers: `dflash_config.target_layer_ids`; a config that
names none gets the dflash package's own default for its target depth.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from spectool.errors import SpectoolError, UsageError
from spectool.layers import dflash_layer_ids
from spectool.layout import Tensor, norm_tensor, qwen3_layer_tensors
from spectool.methods.base import DraftMethod, DraftSpec

QWEN3_TARGETS = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")


def spare_mask_token_id(vocab_size: int, tokenizer_length: int | None) -> int | None:
    """The first unused embedding row (`len(tokenizer)`), when the embedding has spare rows."""
    if tokenizer_length is not None and vocab_size > tokenizer_length:
        return tokenizer_length
    return None


class DFlash(DraftMethod):
    """DFlash: block drafting from fused features; DSpark extends it (`spectool.methods.dspark`)."""

    name = "dflash"
    title = "DFlash"
    order = 30
    supported = dict.fromkeys(QWEN3_TARGETS, "Qwen3DFlashDraftModel")
    checkpoint_architectures = ("DFlashDraftModel", "Qwen3DFlashDraftModel")
    checkpoint_format = (
        "z-lab DFlash (DFlashDraftModel: layers.*, fc, hidden_norm, norm) for the dflash package and vLLM"
    )
    required_keys = ("fc.weight", "hidden_norm.weight", "norm.weight")
    loaders = "the z-lab dflash package (DFlashDraftModel.from_pretrained), vLLM, spectool"
    conversions = ("vllm", "dflash")
    hf_readers = ("spectool", "the z-lab dflash package")
    package_baselines = ("dflash-package",)
    default_lr = 6e-4
    needs_mask_token = True
    shape_options = ("block_size", "mask_token_id")
    #: The upstream block size (targets under 24 layers get 8 by default, see `default_block_size`).
    upstream_block_size = 16
    draft_model = "spectool.drafts.dflash:Qwen3DFlashDraftModel"
    draft_config = "spectool.drafts.dflash:DFlashDraftConfig"
    objective = "spectool.training.objectives.dflash:DFlashObjective"
    proposer = "spectool.decoding.proposers:DFlashProposer"

    # -- shape ----------------------------------------------------------------------------------------------------

    def default_num_draft_layers(self, num_target_layers: int) -> int:
        """5 upstream, fewer on shallow targets (depth // 4)."""
        return 5 if num_target_layers >= 24 else max(1, min(5, num_target_layers // 4))

    def default_feature_count(self, num_target_layers: int, num_draft_layers: int) -> int | None:
        return min(num_draft_layers, max(1, num_target_layers - 3))

    def default_layer_ids(self, num_target_layers: int, num_feature_layers: int | None) -> list[int]:
        return dflash_layer_ids(num_target_layers, 5 if num_feature_layers is None else num_feature_layers)

    def default_block_size(self, num_target_layers: int) -> int:
        return self.upstream_block_size if num_target_layers >= 24 else 8

    def resolve_options(self, arch: Any, tokenizer_length: int | None, options: dict[str, Any]) -> dict:
        block = options.get("block_size")
        block = self.default_block_size(arch.num_hidden_layers) if block is None else block
        if block < 2:
            raise UsageError(f"--block-size must be at least 2, got {block}")
        mask = options.get("mask_token_id")
        if mask is None:
            mask = spare_mask_token_id(arch.vocab_size, tokenizer_length)
        elif not 0 <= mask < arch.vocab_size:
            raise UsageError(f"--mask-token-id {mask} is outside the target's embedding [0, {arch.vocab_size - 1}]")
        return {"block_size": block, "mask_token_id": mask}

    def layout(self, spec: DraftSpec, arch: Any) -> list[Tensor]:
        h = arch.hidden_size
        tensors = qwen3_layer_tensors(arch, spec.num_draft_layers)
        tensors += [
            Tensor("fc.weight", (h, len(spec.target_layer_ids) * h), "trainable"),
            norm_tensor("hidden_norm", arch),
            norm_tensor("norm", arch),
        ]
        return tensors + self.head_tensors(spec, arch)

    def head_tensors(self, spec: DraftSpec, arch: Any) -> list[Tensor]:
        """The embedding and output head: DFlash borrows the target's."""
        h, v = arch.hidden_size, arch.vocab_size
        return [Tensor("embed_tokens.weight", (v, h), "borrowed"), Tensor("lm_head.weight", (v, h), "borrowed")]

    def notes(self, spec: DraftSpec, *, initialised: bool) -> list[str]:
        if not initialised and spec.mask_token_id is None:
            return ["no spare embedding row is known: pass --mask-token-id to init / train"]
        return []

    def shape_phrases(self, spec: DraftSpec, arch: Any) -> list[str]:
        mask = spec.mask_token_id if spec.mask_token_id is not None else "? (pass --mask-token-id)"
        return [f"mask token {mask}"]

    # -- building -------------------------------------------------------------------------------------------------

    def build_config(self, target_config: Any, ids: list[int] | None, options: dict[str, Any]) -> Any:
        if ids is None:
            raise UsageError(f"{self.name} needs target_layer_ids")
        return self.config_class().from_target(
            target_config,
            target_layer_ids=ids,
            num_draft_layers=options.get("num_draft_layers"),
            block_size=options.get("block_size") or self.upstream_block_size,
            mask_token_id=options.get("mask_token_id"),
            **self.extra_config_fields(options),
            **options["overrides"],
        )

    def extra_config_fields(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Config fields of a subclass's own shape options."""
        return {}

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def claims(self, config: Mapping[str, Any]) -> bool:
        return "dflash_config" in config

    def check_config(self, config: Any) -> None:
        super().check_config(config)
        block = config.block_size
        if not isinstance(block, int) or isinstance(block, bool) or block < 2:
            raise ValueError(f"block_size must be an integer of at least 2, got {block!r}")

    def normalise_config(
        self,
        config: dict[str, Any],
        shapes: Mapping[str, Sequence[int]],
        notes: list[str],
        *,
        where: str,
        depth: int | None,
    ) -> dict[str, Any]:
        config = dict(config)
        nested = config.get("dflash_config") if isinstance(config.get("dflash_config"), dict) else {}
        if not nested.get("target_layer_ids") and not config.get("target_layer_ids"):
            n, k = config.get("num_target_layers") or depth, config.get("num_hidden_layers")
            if isinstance(n, int) and isinstance(k, int) and n >= 1 and k >= 1:
                # The z-lab dflash package's default when a config names none (its build_target_layer_ids).
                ids = [n // 2] if k == 1 else [round(1 + i * (n - 4) / (k - 1)) for i in range(k)]
                config["dflash_config"] = {**nested, "target_layer_ids": ids}
                notes.append(f"config.json names no DFlash feature layers; using the dflash package's default {ids}")
        return config

    def config_layer_ids(self, config: Mapping[str, Any]) -> list[int] | None:
        nested = config.get("dflash_config") if isinstance(config.get("dflash_config"), dict) else {}
        return nested.get("target_layer_ids") or config.get("target_layer_ids") or None

    def missing_feature_layers(self, count: float, fc_in: int, width: int, where: str) -> None:
        raise SpectoolError(
            f"{where}: names no feature layers (dflash_config.target_layer_ids) and no num_target_layers to derive them"
        )
