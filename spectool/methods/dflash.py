"""DFlash (z-lab): a Qwen3-style block draft that reads fused target features and drafts a whole block
`[anchor, MASK x (B-1)]` in one forward, with the target's embedding and lm_head.

Checkpoints: `DFlashDraftModel` for the z-lab `dflash` package and vLLM (`layers.*`, `fc`, `hidden_norm`, `norm`;
the target's embedding / lm_head are not stored). Feature layers: `dflash_config.target_layer_ids`; a config that
names none gets the dflash package's own default for its target depth.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from spectool.errors import SpectoolError
from spectool.layers import dflash_layer_ids, zlab_dflash_layer_ids
from spectool.layout import Tensor
from spectool.methods.base import DraftSpec, PublishedConfig
from spectool.methods.blocks import BLOCK_TARGETS, GAMMA, MASK_TOKEN, BlockMethod, anchors_option, block_size_option


class DFlash(BlockMethod):
    """DFlash: block drafting from fused features, with the target's embedding and lm_head borrowed."""

    name = "dflash"
    title = "DFlash"
    order = 30
    supported = dict.fromkeys(BLOCK_TARGETS, "Qwen3DFlashDraftModel")
    checkpoint_architectures = ("DFlashDraftModel", "Qwen3DFlashDraftModel")
    checkpoint_format = (
        "z-lab DFlash (DFlashDraftModel: layers.*, fc, hidden_norm, norm) for the dflash package and vLLM"
    )
    required_keys = ("fc.weight", "hidden_norm.weight", "norm.weight")
    loaders = "the z-lab dflash package (DFlashDraftModel.from_pretrained), vLLM, spectool"
    conversions = ("vllm", "dflash")
    speculators_algorithm = "dflash"  # the converter reads dflash_config.target_layer_ids (and adds 1) itself
    engine_names = {"vllm": "dflash", "sglang": "DFLASH"}  # vLLM >= 0.19 / 0.20, SGLang builds with DFLASH
    hf_readers = ("spectool", "the z-lab dflash package")
    package_baselines = ("dflash-package",)
    default_lr = 6e-4
    #: Targets under 24 layers get 8 by default (`default_block_size`).
    upstream_block_size = 16
    options = (block_size_option("16; 8 on targets under 24 layers"), MASK_TOKEN, GAMMA, anchors_option("512"))
    draft_model = "spectool.drafts.dflash:Qwen3DFlashDraftModel"
    draft_config = "spectool.drafts.dflash:DFlashDraftConfig"
    objective = "spectool.training.objectives.dflash:DFlashObjective"
    proposer = "spectool.decoding.proposers:DFlashProposer"
    takes_draft_vocab = True

    # -- shape ----------------------------------------------------------------------------------------------------

    def default_feature_count(self, num_target_layers: int, num_draft_layers: int) -> int | None:
        return min(num_draft_layers, max(1, num_target_layers - 3))

    def default_layer_ids(self, num_target_layers: int, num_feature_layers: int | None) -> list[int]:
        return dflash_layer_ids(num_target_layers, 5 if num_feature_layers is None else num_feature_layers)

    def serving_notes(self, config: Mapping[str, Any], engine: str) -> list[str]:
        note = (
            "DFlash is served by recent engines only: vLLM from 0.19 / 0.20 (z-lab's README recommends a build "
            "of vLLM PR #40898; DFlash needs an attention backend with non-causal attention, e.g. "
            "--attention-backend flash_attn) and SGLang builds whose --speculative-algorithm takes DFLASH"
        )
        return [note]

    def default_block_size(self, num_target_layers: int) -> int:
        return self.upstream_block_size if num_target_layers >= 24 else 8

    def head_tensors(self, spec: DraftSpec, arch: Any) -> list[Tensor]:
        """The embedding and output head: DFlash borrows the target's."""
        h, v = arch.hidden_size, arch.vocab_size
        return [Tensor("embed_tokens.weight", (v, h), "borrowed"), Tensor("lm_head.weight", (v, h), "borrowed")]

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def claims(self, config: Mapping[str, Any]) -> bool:
        return "dflash_config" in config

    def normalise_config(self, published: PublishedConfig) -> dict[str, Any]:
        config, notes = dict(published.config), published.notes
        nested = config.get("dflash_config") if isinstance(config.get("dflash_config"), dict) else {}
        if not nested.get("target_layer_ids") and not config.get("target_layer_ids"):
            n, k = config.get("num_target_layers") or published.depth, config.get("num_hidden_layers")
            if isinstance(n, int) and isinstance(k, int) and n >= 1 and k >= 1:
                ids = zlab_dflash_layer_ids(n, k)  # the z-lab dflash package's default when a config names none
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
