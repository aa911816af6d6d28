"""What the block-drafting methods share (DFlash and DSpark): a Qwen3-style draft that reads fused target features
and drafts a whole block `[anchor, MASK x (B-1)]` in one forward; block size and mask token as shape options, the
layout of its layers, `fc` and norms, and its config built the same way. `BlockMethod` is abstract (each method
says which embedding and output head it keeps), so the registry does not take it for a method.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

from spectool.errors import UsageError
from spectool.layout import Tensor, norm_tensor, qwen3_layer_tensors
from spectool.methods.base import DraftMethod, DraftSpec
from spectool.methods.options import MethodOption

#: Targets a block draft serves. The draft itself is Qwen3-shaped whatever the target (as z-lab's drafts for
#: Llama-3.1-8B-Instruct are): it only needs the target's width, embedding, lm_head and feature layers.
BLOCK_TARGETS = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "LlamaForCausalLM")


#: Largest --block-size accepted: published DFlash / DSpark blocks are 7 to 16 tokens, and every block costs the
#: target a verify forward of that many positions.
MAX_BLOCK_SIZE = 64


def block_size_option(default: str) -> MethodOption:
    """--block-size, with the method's own default in its help."""
    return MethodOption(
        "block_size",
        int,
        f"block size [{default}].",
        "shape",
        minimum=2,
        maximum=MAX_BLOCK_SIZE,
        range_note="published blocks are 7 to 16",
    )


MASK_TOKEN = MethodOption(
    "mask_token_id",
    int,
    "mask token (an unused row) [the first spare embedding row, else a special token chat never writes].",
    "shape",
    minimum=0,
)
GAMMA = MethodOption("gamma", float, "slot-weight decay [from the block size].", "objective", minimum=0, exclusive=True)


def anchors_option(default: str) -> MethodOption:
    """--num-anchors, with the method's own default in its help."""
    return MethodOption("num_anchors", int, f"blocks per sequence [{default}].", "objective", minimum=1)


def spare_mask_token_id(vocab_size: int, tokenizer_length: int | None) -> int | None:
    """The first unused embedding row (`len(tokenizer)`), when the embedding has spare rows."""
    if tokenizer_length is not None and vocab_size > tokenizer_length:
        return tokenizer_length
    return None


class BlockMethod(DraftMethod):
    """A block-drafting method: `upstream_block_size`, `head_tensors` and `default_block_size` are its own."""

    #: The block size the method's reference code uses.
    upstream_block_size: int = 16

    def default_num_draft_layers(self, num_target_layers: int) -> int:
        """5 upstream, fewer on shallow targets (depth // 4)."""
        return 5 if num_target_layers >= 24 else max(1, min(5, num_target_layers // 4))

    def default_block_size(self, num_target_layers: int) -> int:
        return self.upstream_block_size

    def resolve_options(
        self, arch: Any, tokenizer_length: int | None, options: dict[str, Any], *, unused_token_id: int | None = None
    ) -> dict:
        block = options.get("block_size")
        block = self.default_block_size(arch.num_hidden_layers) if block is None else block
        mask = options.get("mask_token_id")
        if mask is None:
            mask = spare_mask_token_id(arch.vocab_size, tokenizer_length)
        if mask is None:  # no spare embedding row (Llama 3, SmolLM2): a special token chat never produces
            mask = unused_token_id
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

    @abstractmethod
    def head_tensors(self, spec: DraftSpec, arch: Any) -> list[Tensor]:
        """The embedding and output head (and any other heads) the draft keeps or borrows."""

    def notes(self, spec: DraftSpec, *, initialised: bool) -> list[str]:
        if not initialised and spec.option("mask_token_id") is None:
            return ["no spare embedding row is known: pass --mask-token-id to init / train"]
        return []

    def shape_phrases(self, spec: DraftSpec, arch: Any) -> list[str]:
        mask = spec.option("mask_token_id")
        return [
            f"block size {spec.option('block_size')}",
            f"mask token {'? (pass --mask-token-id)' if mask is None else mask}",
        ]

    def check_options(self, values: Mapping[str, Any], *, max_length: int | None = None) -> None:
        super().check_options(values)
        block = values.get("block_size")
        if block is not None and max_length is not None and block >= max_length:
            raise UsageError(
                f"--block-size {block} leaves no room in --max-length {max_length}: a block must fit inside one "
                "example after its anchor; lower --block-size or raise --max-length"
            )

    def check_spec(self, spec: DraftSpec, target: str) -> None:
        if spec.option("mask_token_id") is None:
            raise UsageError(
                f"{target}: no spare embedding row is known for the {spec.method} mask token; pass --mask-token-id "
                "(an id of the embedding that the tokenizer never produces)"
            )

    def training_notes(self, given: Mapping[str, Any], objective: Any, device_type: str) -> list[str]:
        anchors = getattr(objective, "num_anchors", None)
        if anchors and given.get("num_anchors") is None and device_type == "cpu":
            return [
                f"{self.name} draws up to {anchors} blocks per row (the published setting, sized for long rows on "
                "GPUs): on a CPU and short rows that is up to ~9x slower per token than --num-anchors 8, what the "
                "demo trains with"
            ]
        return []

    def block_length(self, config: Mapping[str, Any]) -> int | None:
        block = config.get("block_size")
        return int(block) if block else None

    def target_fit_problems(self, config: Any, arch: Any) -> list[str]:
        mask = getattr(config, "mask_token_id", None)
        if mask is not None and not 0 <= mask < arch.vocab_size:
            return [f"its mask token {mask} is outside the target's embedding [0, {arch.vocab_size - 1}]"]
        return []

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
        """Config fields of the method's own shape options beyond block size and mask token."""
        return {}

    def check_config(self, config: Any) -> None:
        super().check_config(config)
        block = config.block_size
        if not isinstance(block, int) or isinstance(block, bool) or block < 2:
            raise ValueError(f"block_size must be an integer of at least 2, got {block!r}")
