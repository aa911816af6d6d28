"""Target features computed once and stored, so a draft can train without running the target every step.

``spectool data features`` runs the frozen target over the tokenized training data and writes, per example, the
concatenated feature layers a method reads (``target_hidden_states``) and the post-norm last hidden state
(``target_last_hidden_states``). Logits are NOT stored: a method that needs them gets ``lm_head(last hidden)``
at train time, which costs one matmul and saves V floats per token on disk.

Layout of a features directory::

    features.json             what was computed: target, method, layer ids, tokenization options, example count,
                              a fingerprint of the tokens, the shards
    shard-00000.safetensors   `shard_size` examples, flattened: input_ids, loss_mask, position_ids, document_ids
                              [T] (int64), offsets [n+1], target_hidden_states [T, K*H], target_last_hidden_states [T, H]

Each shard is written to a temporary name and renamed, so a rerun skips the shards that exist (resumable) and a kill
never leaves half a shard. Under torchrun, shard i is written by rank ``i % world_size``.
`FeatureStore` reads a directory back (memory-mapped slices) for ``spectool train --features``.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from spectool.chat_format import AssistantTurns, TokenizedExample
from spectool.errors import SpectoolError, UsageError
from spectool.paths import FEATURES_MANIFEST, file_mode, fsync_dir
from spectool.target import FrozenTarget, TargetBatch
from spectool.training.batches import Batch, ShuffledBatches, collate
from spectool.training.capture import PreparedExamples, capture_batch, examples_fingerprint, prepare_examples

MANIFEST = FEATURES_MANIFEST
FORMAT = "spectool-features"
FORMAT_VERSION = 1
#: Manifest entries that must agree for a rerun to continue writing into an existing directory.
_IDENTITY_KEYS = (
    "method",
    "target",
    "target_layer_ids",
    "max_length",
    "pack",
    "assistant_turns",
    "chat_template_sha256",
    "num_examples",
    "fingerprint",
    "shard_size",
    "feature_dtype",
)


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------


@dataclass
class FeaturesProgress:
    """How far `extract_features` is: shards done of all, and tokens run through the target so far."""

    shards_total: int
    shards_done: int  # finished, counting the ones found on disk
    tokens: int  # tokens run through the target by this process
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class FeaturesSummary:
    """What `extract_features` wrote: where, how many examples, shards, tokens and bytes, and its notes."""

    out: str
    num_examples: int
    num_shards: int
    shards_written: int  # by this process in this run
    shards_skipped: int  # found complete on disk
    tokens: int
    bytes_written: int
    seconds: float
    target_layer_ids: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def prepare_features_dir(out: Path, manifest: dict[str, Any]) -> None:
    """Create ``out`` with its manifest, or check that an existing one describes the same features."""
    path = out / MANIFEST
    if path.is_file():
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            raise UsageError(f"{path} is unreadable; choose another --out") from None
        differing = [key for key in _IDENTITY_KEYS if existing.get(key) != manifest.get(key)]
        if differing:
            detail = ", ".join(f"{key} {existing.get(key)!r} != {manifest.get(key)!r}" for key in differing)
            raise UsageError(f"{out} holds features made with other settings ({detail}); choose another --out")
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists, is not empty and holds no {MANIFEST}; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_features(
    target: FrozenTarget,
    examples: Sequence[TokenizedExample],
    out: Path,
    manifest: dict[str, Any],
    *,
    batch_size: int = 8,
    pad_token_id: int = 0,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    progress: Callable[[FeaturesProgress], None] | None = None,
) -> FeaturesSummary:
    """Write the shards of ``examples`` that this process owns and that are not on disk yet.

    ``manifest`` must already be in ``out`` (see `prepare_features_dir`); its ``shard_size`` cuts the examples into
    shards. Features are stored in the target's dtype.
    """
    shard_size = int(manifest["shard_size"])
    num_shards = -(-len(examples) // shard_size)
    started = time.perf_counter()
    written = skipped = tokens = size = 0
    mine = [index for index in range(num_shards) if index % world_size == rank]
    done = sum(1 for index in range(num_shards) if (out / shard_name(index)).is_file())
    if progress is not None:
        progress(FeaturesProgress(num_shards, done, 0, 0.0))
    for index in mine:
        path = out / shard_name(index)
        if path.is_file():
            skipped += 1
            continue
        chunk = examples[index * shard_size : (index + 1) * shard_size]
        tensors = _shard_tensors(target, chunk, batch_size, pad_token_id, device)
        tmp = out / f".{path.name}.tmp-{os.getpid()}"
        try:
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "first_example": str(index * shard_size)})
            os.chmod(tmp, file_mode())  # safetensors writes 0600 whatever the umask
            os.replace(tmp, path)
            fsync_dir(out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        written += 1
        done += 1
        tokens += int(tensors["input_ids"].numel())
        size += path.stat().st_size
        if progress is not None:
            progress(FeaturesProgress(num_shards, done, tokens, time.perf_counter() - started))
    return FeaturesSummary(
        out=str(out),
        num_examples=len(examples),
        num_shards=num_shards,
        shards_written=written,
        shards_skipped=skipped,
        tokens=tokens,
        bytes_written=size,
        seconds=time.perf_counter() - started,
        target_layer_ids=list(manifest["target_layer_ids"]),
    )


def _shard_tensors(
    target: FrozenTarget,
    chunk: Sequence[TokenizedExample],
    batch_size: int,
    pad_token_id: int,
    device: torch.device | str,
) -> dict[str, torch.Tensor]:
    hidden, last = [], []
    for first in range(0, len(chunk), batch_size):
        group = chunk[first : first + batch_size]
        batch = collate(group, pad_token_id).to(device)
        features = capture_batch(target, batch)
        for row, example in enumerate(group):
            hidden.append(features.target_hidden_states[row, : len(example)].cpu())
            last.append(features.target_last_hidden_states[row, : len(example)].cpu())
    lengths = torch.tensor([len(example) for example in chunk], dtype=torch.long)

    def flat(name: str) -> torch.Tensor:
        return torch.tensor([value for example in chunk for value in getattr(example, name)], dtype=torch.long)

    return {
        "input_ids": flat("input_ids"),
        "loss_mask": flat("loss_mask"),
        "position_ids": flat("position_ids"),
        "document_ids": flat("document_ids"),
        "offsets": torch.cat((torch.zeros(1, dtype=torch.long), lengths.cumsum(0))),
        "target_hidden_states": torch.cat(hidden).contiguous(),
        "target_last_hidden_states": torch.cat(last).contiguous(),
    }


@dataclass
class FeaturesConfig:
    """What `extract_features` computes: the target's features for a method, over tokenized training data."""

    target: str
    method: str
    data: str
    out: str
    target_layer_ids: list[int] | None = None
    num_feature_layers: int | None = None
    num_draft_layers: int | None = None  # only moves the DFlash default ids (one feature layer per draft layer)
    max_length: int = 2048
    pack: bool = False
    assistant_turns: AssistantTurns = "all"
    chat_template: str | None = None
    skip_bad_rows: bool = False
    shard_size: int = 1000  # examples per shard file
    batch_size: int = 8  # rows per target forward
    device: str | None = None
    dtype: str | None = (
        None  # the target's dtype (default: `spectool.hardware.target_dtype`); features are stored in it
    )

    def validate(self) -> None:
        for name in ("shard_size", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")


def feature_layer_ids(method: str, spec_ids: Sequence[int]) -> list[int]:
    """The ids whose features a method's draft reads (none for a draft that reads only the last hidden state,
    which is stored anyway)."""
    from spectool.registry import get

    return list(spec_ids) if get(method).reads_feature_layers else []


def _manifest(
    config: FeaturesConfig, metadata: Any, arch: Any, model: Any, tokenizer: Any, prepared: Any, ids: list[int]
) -> dict[str, Any]:
    """features.json: what was computed, from which target and data, so a run can check it reads what it needs."""
    from spectool.training.batches import pad_token_id

    examples = prepared.examples
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "method": config.method,
        "target": metadata.target,
        "target_metadata": metadata.to_json(),
        "target_layer_ids": ids,
        "num_target_layers": arch.num_hidden_layers,
        "hidden_size": arch.hidden_size,
        "feature_dtype": str(model.dtype).removeprefix("torch."),
        "stored": ["target_hidden_states", "target_last_hidden_states"],
        "logits": "not stored: recomputed at train time as lm_head(target_last_hidden_states)",
        "data": [str(Path(f).resolve()) for f in prepared.load_report.files],
        "max_length": config.max_length,
        "pack": config.pack,
        "assistant_turns": config.assistant_turns,
        "chat_template_sha256": prepared.chat_template_sha256,
        "pad_token_id": pad_token_id(tokenizer),
        "num_examples": len(examples),
        "num_tokens": sum(len(example) for example in examples),
        "num_supervised_tokens": sum(example.num_supervised for example in examples),
        "fingerprint": examples_fingerprint(examples),
        "shard_size": config.shard_size,
        "num_shards": -(-len(examples) // config.shard_size),
    }


def extract_features(
    config: FeaturesConfig, *, progress: Callable[[FeaturesProgress], None] | None = None
) -> tuple[FeaturesSummary, PreparedExamples]:
    """Compute and store the target features of ``config.data`` for ``config.method`` (see the module docstring).

    Under torchrun every process tokenizes the data the same way and writes its share of the shards.
    """
    from spectool.drafts.from_target import target_metadata
    from spectool.hardware import target_dtype
    from spectool.hub import load_model_and_tokenizer, resolve_model
    from spectool.layers import LayerIdWarning
    from spectool.registry import resolve
    from spectool.training.distributed import init_distributed, shutdown

    config.validate()
    context = init_distributed(config.device)
    try:
        info = resolve_model(config.target)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", LayerIdWarning)
            spec = resolve(
                config.method,
                info.arch,
                tokenizer_length=info.tokenizer_length,
                unused_token_id=info.unused_token_id,
                target_layer_ids=config.target_layer_ids,
                num_feature_layers=config.num_feature_layers,
                num_draft_layers=config.num_draft_layers,
            )
        dtype = target_dtype(context.device, config.dtype)
        model, tokenizer = load_model_and_tokenizer(info, dtype=dtype, device=str(context.device))
        prepared = prepare_examples(config, tokenizer)
        examples = prepared.examples
        ids = feature_layer_ids(config.method, spec.target_layer_ids)
        manifest = _manifest(config, target_metadata(info, spec), info.arch, model, tokenizer, prepared, ids)
        out = Path(config.out).expanduser()
        problem = None
        if context.is_main:
            try:
                prepare_features_dir(out, manifest)
            except SpectoolError as exc:
                problem = exc
        problem = context.broadcast_object(problem)
        if problem is not None:
            raise problem
        summary = write_features(
            FrozenTarget(model, ids),
            examples,
            out,
            manifest,
            batch_size=config.batch_size,
            pad_token_id=manifest["pad_token_id"],
            device=context.device,
            rank=context.rank,
            world_size=context.world_size,
            progress=progress if context.is_main else None,
        )
        summary.notes = [str(w.message) for w in caught if issubclass(w.category, LayerIdWarning)]
        if context.enabled:  # the counts of all processes together
            counts = [summary.shards_written, summary.shards_skipped, summary.tokens, summary.bytes_written]
            totals = context.all_reduce_sum(torch.tensor(counts, dtype=torch.float64)).long().tolist()
            summary.shards_written, summary.shards_skipped, summary.tokens, summary.bytes_written = totals
        shutdown(context)
        return summary, prepared
    except BaseException:
        shutdown(context, clean=False)
        raise


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------


class FeatureStore:
    """A features directory opened for training: its manifest, its examples (tokens and masks), and the stored
    features of any examples, read as slices of the memory-mapped shards."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser()
        path = self.directory / MANIFEST
        if not path.is_file():
            raise UsageError(
                f"{self.directory} is not a features directory (no {MANIFEST}); make one with `spectool data features`"
            )
        try:
            self.manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise SpectoolError(f"{path}: not valid JSON ({exc.msg})") from None
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != FORMAT_VERSION:
            raise SpectoolError(f"{path}: not a spectool features manifest (version {FORMAT_VERSION})")
        self.shard_size = int(self.manifest["shard_size"])
        num_shards = int(self.manifest["num_shards"])
        missing = [shard_name(i) for i in range(num_shards) if not (self.directory / shard_name(i)).is_file()]
        if missing:
            raise UsageError(
                f"{self.directory} is incomplete: {len(missing)} of {num_shards} shards missing (e.g. {missing[0]}); "
                "rerun the same `spectool data features` command to finish it"
            )
        self._handles: dict[int, Any] = {}
        self._offsets: list[list[int]] = []
        self.examples: list[TokenizedExample] = []
        for index in range(num_shards):
            handle = self._handle(index)
            offsets = handle.get_tensor("offsets").tolist()
            columns = {name: handle.get_tensor(name).tolist() for name in _TOKEN_COLUMNS}
            for start, end in zip(offsets, offsets[1:], strict=False):
                self.examples.append(TokenizedExample(*(columns[name][start:end] for name in _TOKEN_COLUMNS)))
            self._offsets.append(offsets)
        if len(self.examples) != int(self.manifest["num_examples"]):
            raise SpectoolError(
                f"{self.directory}: the shards hold {len(self.examples)} examples, the manifest says "
                f"{self.manifest['num_examples']}"
            )

    @property
    def target_layer_ids(self) -> list[int]:
        return list(self.manifest["target_layer_ids"])

    def _handle(self, shard: int) -> Any:
        if shard not in self._handles:
            try:
                self._handles[shard] = safe_open(str(self.directory / shard_name(shard)), framework="pt")
            except Exception as exc:  # safetensors' SafetensorError derives from Exception only
                raise SpectoolError(f"{self.directory / shard_name(shard)}: unreadable shard ({exc})") from None
        return self._handles[shard]

    def features(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(target_hidden_states [L, K*H], target_last_hidden_states [L, H]) of example ``index``."""
        shard, local = divmod(index, self.shard_size)
        start, end = self._offsets[shard][local], self._offsets[shard][local + 1]
        handle = self._handle(shard)
        return (
            handle.get_slice("target_hidden_states")[start:end],
            handle.get_slice("target_last_hidden_states")[start:end],
        )

    def target_batch(
        self,
        indices: Sequence[int],
        batch: Batch,
        *,
        lm_head: nn.Module | None = None,
        device: torch.device | str = "cpu",
    ) -> TargetBatch:
        """The stored features of the examples ``indices`` (the rows of ``batch``, in order), zero-padded to the
        batch length; with ``lm_head``, the target logits recomputed from the last hidden state."""
        rows, length = batch.input_ids.shape
        if len(indices) != rows:
            raise ValueError(f"{len(indices)} indices for a batch of {rows} rows")
        hidden_rows, last_rows = zip(*(self.features(index) for index in indices), strict=True)
        hidden = _pad_stack(hidden_rows, length).to(device)
        last = _pad_stack(last_rows, length).to(device)
        logits = None
        if lm_head is not None:
            with torch.no_grad():
                logits = lm_head(last.to(lm_head.weight.dtype))
        return TargetBatch(
            input_ids=batch.input_ids,
            loss_mask=batch.loss_mask,
            target_hidden_states=hidden,
            target_last_hidden_states=last,
            attention_mask=batch.attention_mask,
            target_logits=logits,
        )


_TOKEN_COLUMNS = ("input_ids", "loss_mask", "position_ids", "document_ids")


def _pad_stack(rows: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    out = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
    for row, tensor in enumerate(rows):
        out[row, : tensor.shape[0]] = tensor
    return out


class IndexedBatches(ShuffledBatches):
    """`ShuffledBatches` that also says which examples each batch holds (``last_indices``), so stored features
    can be looked up; the batches and the saved position are exactly those of `ShuffledBatches`."""

    last_indices: list[int]

    def __next__(self) -> Batch:
        batch = super().__next__()
        rows = batch.input_ids.shape[0]
        # The order is the parent's seeded permutation of this epoch; the batch is the slice just served.
        self.last_indices = self._epoch_order()[self.position - rows : self.position]
        return batch
