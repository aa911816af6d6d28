"""Which target layers feed a draft: the default feature-layer ids of each method, and validation.

Convention (the most common silent bug in this field): "layer id i" is the OUTPUT of decoder layer i,
0-based, i.e. Hugging Face `hidden_states[i + 1]`; id -1 is the embedding output (`hidden_states[0]`) and
id N-1 is the post-final-norm last hidden state. SGLang and vLLM capture the stream ENTERING a layer, so an
engine config names the same tensor `i + 1`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from spectool.errors import UsageError

#: Methods that take feature layers from the target, in display order.
LAYER_METHODS = ("dspark", "dflash", "eagle3")

EAGLE3_NUM_FEATURE_LAYERS = 3


class LayerIdWarning(UserWarning):
    """Valid ids that an engine cannot capture (-1 or N-1 under SGLang)."""


def _check_depth(num_target_layers: int) -> None:
    if not isinstance(num_target_layers, int) or isinstance(num_target_layers, bool) or num_target_layers < 1:
        raise UsageError(f"the target must have at least 1 layer, got num_target_layers={num_target_layers!r}")


def _check_count(num_feature_layers: int, num_target_layers: int, maximum: int) -> None:
    if not isinstance(num_feature_layers, int) or not 1 <= num_feature_layers <= maximum:
        raise UsageError(
            f"--num-feature-layers must be between 1 and {maximum} for a target with {num_target_layers} "
            f"layers, got {num_feature_layers}"
        )


def eagle3_layer_ids(num_target_layers: int) -> list[int]:
    """EAGLE-3's low / mid / high layers: `[1, N//2 - 1, N - 4]`."""
    _check_depth(num_target_layers)
    n = num_target_layers
    ids = [1, n // 2 - 1, n - 4]
    if not all(a < b for a, b in zip(ids, ids[1:], strict=False)):
        raise UsageError(
            f"EAGLE-3's default layers [1, N//2-1, N-4] = {ids} are not strictly increasing for a target with "
            f"{n} layers (it needs at least 7); pass --target-layer-ids with 3 ids in [-1, {n - 1}]"
        )
    return ids


def dflash_layer_ids(num_target_layers: int, num_feature_layers: int) -> list[int]:
    """DFlash: K == 1 -> `[N//2]`; else `round(1 + i*(N-4)/(K-1))` for i = 0..K-1 (Python's round)."""
    _check_depth(num_target_layers)
    n, k = num_target_layers, num_feature_layers
    _check_count(k, n, max(1, n - 3))
    if k == 1:
        return [n // 2]
    # With K <= N-3 the step (N-4)/(K-1) is at least 1, so the rounded ids never repeat.
    return [round(1 + i * (n - 4) / (k - 1)) for i in range(k)]


def dspark_layer_ids(num_target_layers: int, num_feature_layers: int) -> list[int]:
    """DSpark: K == 1 -> `[N-1]`; else `sorted(set(round(1 + i*(N-2)/(K-1))))`, strictly increasing in [1, N-1].

    The set may hold fewer than K ids when K is close to N (nearby values round together); the reference
    registry accepts that, and so does spectool, but it must not exceed the N-1 layers available.
    """
    _check_depth(num_target_layers)
    n, k = num_target_layers, num_feature_layers
    _check_count(k, n, max(1, n - 1))
    if k == 1:
        return [n - 1]
    return sorted({round(1 + i * (n - 2) / (k - 1)) for i in range(k)})


def build_target_layer_ids(method: str, num_target_layers: int, num_feature_layers: int | None = None) -> list[int]:
    """Default feature-layer ids of `method` (eagle1 / eagle3 / dflash / dspark) for an N-layer target.

    EAGLE-1/2 reads only the post-norm last hidden state, id N-1. EAGLE-3 always uses three layers.
    DFlash and DSpark spread `num_feature_layers` ids (default 5) across the depth.
    """
    if method == "eagle1":
        _check_depth(num_target_layers)
        return [num_target_layers - 1]
    if method == "eagle3":
        if num_feature_layers not in (None, EAGLE3_NUM_FEATURE_LAYERS):
            raise UsageError(f"EAGLE-3 fuses exactly 3 feature layers (low, mid, high), got {num_feature_layers}")
        return eagle3_layer_ids(num_target_layers)
    k = 5 if num_feature_layers is None else num_feature_layers
    if method == "dflash":
        return dflash_layer_ids(num_target_layers, k)
    if method == "dspark":
        return dspark_layer_ids(num_target_layers, k)
    raise UsageError(f"unknown method {method!r}; choose one of eagle1, eagle3, dflash, dspark")


def parse_layer_ids(text: str) -> list[int]:
    """Parse `--target-layer-ids` text such as "1,9,17" or "[1, 9, 17]"."""
    body = text.strip().strip("[]")
    try:
        return [int(part) for part in body.replace(" ", ",").split(",") if part]
    except ValueError:
        raise UsageError(f"--target-layer-ids must be comma-separated integers, got {text!r}") from None


def validate_layer_ids(
    ids: Sequence[int], num_target_layers: int, *, expected_count: int | None = None, method: str | None = None
) -> list[int]:
    """Check user-given ids: integers, strictly increasing, in [-1, N-1], and as many as the method needs.

    Returns them as a list. Warns (LayerIdWarning) for -1 or N-1, which SGLang's capture cannot produce.
    """
    _check_depth(num_target_layers)
    n = num_target_layers
    label = f"{method} " if method else ""
    if not ids:
        raise UsageError(f"{label}target layer ids are empty; give at least one id in [-1, {n - 1}]")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise UsageError(f"{label}target layer ids must be integers, got {list(ids)!r}")
    bad = [i for i in ids if not -1 <= i <= n - 1]
    if bad:
        raise UsageError(f"{label}target layer ids {bad} are outside [-1, {n - 1}] for a target with {n} layers")
    if any(a >= b for a, b in zip(ids, ids[1:], strict=False)):
        raise UsageError(f"{label}target layer ids must be strictly increasing, got {list(ids)}")
    if expected_count is not None and len(ids) != expected_count:
        raise UsageError(f"{label}needs exactly {expected_count} target layer ids, got {len(ids)}: {list(ids)}")
    edge = [i for i in ids if i in (-1, n - 1)]
    if edge:
        warnings.warn(
            f"target layer ids {edge} (embedding output / post-norm last layer) cannot be captured by SGLang; "
            "the draft will train and run in spectool and vLLM only",
            LayerIdWarning,
            stacklevel=2,
        )
    return list(ids)
