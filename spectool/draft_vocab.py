"""A decode-time draft vocabulary for drafts that read a full-vocabulary head (EAGLE-1, DFlash, DSpark).

EAGLE-3 prunes its head to the most frequent supervised tokens (``d2t`` / ``t2d`` in its format). The other
methods read the target's lm_head (or a copy of it) over the whole vocabulary, and at the few rows a draft step
has, that product is the largest part of its cost: SmolLM2's 49,152 x 576 head takes 5-8 ms on a 2-core CPU,
about a fifth of a target step. ``draft_vocab.safetensors`` beside such a draft (one int64 tensor ``token_ids``:
the kept target ids, ascending, unique) makes the proposer score only those rows. Decoding stays lossless: the
target verifies every draft token, and a sampled draft's distribution is the one it drew from (zero outside the
kept ids). A draft token the target would pick outside the kept ids is simply never proposed.

The file is spectool's own: vLLM, SGLang and the z-lab / DeepSpec loaders ignore it. ``spectool data vocab``
writes it from data (the most frequent supervised tokens, as EAGLE-3's trainer picks its vocabulary).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from spectool.errors import SpectoolError

VOCAB_FILE = "draft_vocab.safetensors"
VOCAB_KEY = "token_ids"


def read_draft_vocab(directory: Path) -> torch.Tensor | None:
    """The kept target ids of ``directory/draft_vocab.safetensors`` (int64, ascending), or None without the file."""
    path = Path(directory) / VOCAB_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            if VOCAB_KEY not in handle.keys():
                raise SpectoolError(f"{path}: holds no {VOCAB_KEY!r} tensor; rewrite it with `spectool data vocab`")
            ids = handle.get_tensor(VOCAB_KEY)
    except (SafetensorError, OSError, ValueError) as exc:
        raise SpectoolError(
            f"{path}: not a readable safetensors file ({exc}); rewrite it with `spectool data vocab`"
        ) from None
    return _checked(ids, str(path))


def check_draft_vocab(ids: torch.Tensor, vocab_size: int, where: str) -> None:
    """A one-line error unless every kept id is a token of a ``vocab_size`` vocabulary."""
    if int(ids[-1]) >= vocab_size:
        raise SpectoolError(
            f"{where}: keeps token id {int(ids[-1])}, but the target's vocabulary has {vocab_size} tokens; the file was "
            "written for another target: rewrite it with `spectool data vocab`"
        )


def write_draft_vocab(directory: Path, ids: torch.Tensor) -> Path:
    """Write the kept ids (sorted here) as ``directory/draft_vocab.safetensors``, atomically."""
    ids = _checked(torch.as_tensor(ids, dtype=torch.long).flatten().sort().values, "the draft vocabulary")
    path = Path(directory) / VOCAB_FILE
    tmp = path.with_name(f".{VOCAB_FILE}.tmp-{os.getpid()}")
    try:
        save_file({VOCAB_KEY: ids.contiguous()}, str(tmp))
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SpectoolError(f"could not write {path}: {exc.strerror or exc}") from None
    return path


def _checked(ids: torch.Tensor, where: str) -> torch.Tensor:
    if ids.dim() != 1 or ids.numel() == 0 or ids.dtype != torch.long:
        raise SpectoolError(
            f"{where}: expected a non-empty 1-D int64 tensor of token ids, got {ids.dtype} {list(ids.shape)}"
        )
    if int(ids[0]) < 0 or not bool((ids[1:] > ids[:-1]).all()):
        raise SpectoolError(f"{where}: token ids must be distinct, non-negative and ascending")
    return ids
