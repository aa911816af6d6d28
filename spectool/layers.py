"""Which target layers feed a draft: the default feature-layer ids of each method, validation, and which engines
can serve them.

Convention (the most common silent bug in this field): "layer id i" is the OUTPUT of decoder layer i,
0-based, i.e. Hugging Face `hidden_states[i + 1]`; id -1 is the embedding output (`hidden_states[0]`) and
id N-1 is the post-final-norm last hidden state. SGLang and vLLM capture the stream ENTERING a layer, so an
engine config names the same tensor `i + 1` (`engine_ids`).

What each engine can capture (read from their code; see `serving`):

* SGLang and vLLM capture `hidden_states + residual` at the top of their decoder-layer loop, i.e. the input of
  decoder layer j (engine id j, spectool id j - 1), before the final norm. Their ids therefore reach spectool id N-2
  at most: the post-final-norm tensor N-1 is captured by neither. Engine id 0 (spectool -1, the embedding output)
  needs the loop to handle the residual that does not exist before the first layer: vLLM's Llama / Qwen loops add
  it unconditionally, so vLLM cannot; SGLang's Llama loop handles it, not every SGLang model does.
* spectool, DeepSpec and the z-lab `dflash` package read Hugging Face `hidden_states` (id i = `hidden_states[i + 1]`),
  which hold every id in [-1, N-1], N-1 being already normed.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from spectool.errors import UsageError


class LayerIdWarning(UserWarning):
    """Valid ids that vLLM / SGLang cannot capture (-1, N-1); spectool serves them."""


def check_depth(num_target_layers: int) -> None:
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
    check_depth(num_target_layers)
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
    check_depth(num_target_layers)
    _check_count(num_feature_layers, num_target_layers, max(1, num_target_layers - 3))
    # With K <= N-3 the step (N-4)/(K-1) is at least 1, so the rounded ids never repeat.
    return zlab_dflash_layer_ids(num_target_layers, num_feature_layers)


def zlab_dflash_layer_ids(num_target_layers: int, num_feature_layers: int) -> list[int]:
    """The z-lab dflash package's formula itself (its build_target_layer_ids), unchecked: what it computes for a
    published config that names no feature layers, whatever its counts."""
    n, k = num_target_layers, num_feature_layers
    if k == 1:
        return [n // 2]
    return [round(1 + i * (n - 4) / (k - 1)) for i in range(k)]


def dspark_layer_ids(num_target_layers: int, num_feature_layers: int) -> list[int]:
    """DSpark: K == 1 -> `[N-1]`; else `sorted(set(round(1 + i*(N-2)/(K-1))))`, strictly increasing in [1, N-1].

    The set may hold fewer than K ids when K is close to N (nearby values round together); the reference
    registry accepts that, and so does spectool, but it must not exceed the N-1 layers available.
    """
    check_depth(num_target_layers)
    n, k = num_target_layers, num_feature_layers
    _check_count(k, n, max(1, n - 1))
    if k == 1:
        return [n - 1]
    return sorted({round(1 + i * (n - 2) / (k - 1)) for i in range(k)})


def parse_layer_ids(text: str) -> list[int]:
    """Parse `--target-layer-ids` text such as "1,9,17" or "[1, 9, 17]"."""
    body = text.strip().strip("[]")
    try:
        return [int(part) for part in body.replace(" ", ",").split(",") if part]
    except ValueError:
        raise UsageError(f"--target-layer-ids must be comma-separated integers, got {text!r}") from None


def validate_layer_ids(
    ids: Sequence[int],
    num_target_layers: int,
    *,
    expected_count: int | None = None,
    method: str | None = None,
    readers: Sequence[str] = ("spectool",),
) -> list[int]:
    """Check user-given ids: integers, strictly increasing, in [-1, N-1], and as many as the method needs.

    Returns them as a list. Warns (LayerIdWarning) for -1 or N-1, which SGLang's capture cannot produce.
    """
    check_depth(num_target_layers)
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
    if unportable_ids(ids, n):
        warnings.warn(serving(readers, ids, n).message(), LayerIdWarning, stacklevel=2)
    return list(ids)


# ------------------------------------------------------------------------------------------------------------
# Engine numbering and which engines can serve a choice of ids
# ------------------------------------------------------------------------------------------------------------


def engine_ids(ids: Sequence[int]) -> list[int]:
    """spectool ids -> the numbering of vLLM / SGLang capture (the input of layer j): id + 1.

    This is what vLLM reads from a draft config's top-level `eagle_aux_hidden_state_layer_ids`. SGLang reads
    `eagle_config.eagle_aux_hidden_state_layer_ids` in spectool's numbering and adds the 1 itself.
    """
    return [int(i) + 1 for i in ids]


def from_engine_ids(ids: Sequence[int]) -> list[int]:
    """vLLM / SGLang capture numbering -> spectool ids: id - 1."""
    return [int(i) - 1 for i in ids]


def engine_default_eagle3_ids(num_target_layers: int) -> list[int]:
    """The EAGLE-3 layers SGLang and vLLM capture when a draft config names none: engine ids
    `(2, N//2, N-3)`, i.e. spectool ids `[1, N//2 - 1, N - 4]` (SpecForge and NeMo AutoModel train with the same)."""
    return eagle3_layer_ids(num_target_layers)


def unportable_ids(ids: Sequence[int], num_target_layers: int) -> list[int]:
    """The ids vLLM / SGLang cannot capture: -1 (the embedding output) and N-1 (the post-final-norm state)."""
    return [i for i in ids if i in (-1, num_target_layers - 1)]


def portable_layer_ids(ids: Sequence[int], num_target_layers: int) -> list[int] | None:
    """The nearest strictly increasing ids in [0, N-2] (what every engine captures): -1 -> 0 and N-1 -> N-2, the
    neighbours moved aside as little as needed; None when there are more ids than portable layers."""
    n = num_target_layers
    out = [min(max(int(i), 0), n - 2) for i in ids]
    if len(out) > n - 1 or not out:
        return None
    for k in range(1, len(out)):  # from the bottom: each above the previous
        out[k] = max(out[k], out[k - 1] + 1)
    out[-1] = min(out[-1], n - 2)
    for k in range(len(out) - 2, -1, -1):  # then from the top: each below the next (stays >= 0 as K <= N-1)
        out[k] = min(out[k], out[k + 1] - 1)
    return out


@dataclass(frozen=True)
class Serving:
    """Which engines can serve a draft reading `ids` of an N-layer target."""

    ids: tuple[int, ...]
    num_target_layers: int
    served_by: tuple[str, ...]
    not_served_by: tuple[str, ...]
    unportable: tuple[int, ...]
    portable_ids: tuple[int, ...] | None

    @property
    def portable(self) -> bool:
        return not self.unportable

    def to_json(self) -> dict:
        return {
            "engine_ids": engine_ids(self.ids),
            "served_by": list(self.served_by),
            "not_served_by": list(self.not_served_by),
            "portable_ids": list(self.portable_ids) if self.portable_ids is not None and self.unportable else None,
        }

    def message(self) -> str:
        """One line: which engines serve these ids and which cannot, with the nearest portable choice."""
        if self.portable:
            return f"layer ids {list(self.ids)} are captured by {_join(self.served_by)} alike"
        n = self.num_target_layers
        parts = []
        if n - 1 in self.unportable:
            parts.append(f"layer id {n - 1} (the post-final-norm hidden state)")
        if -1 in self.unportable:
            parts.append("layer id -1 (the embedding output)")
        why = (
            f"vLLM and SGLang capture the stream entering a decoder layer, before the final norm, so they reach id "
            f"{n - 2} at most"
        )
        if -1 in self.unportable:
            why += (
                " (and the embedding output only on some SGLang models: vLLM's Llama loop adds a residual absent there)"
            )
        text = f"{' and '.join(parts)}: captured by {_join(self.served_by)} only; {why}"
        if self.portable_ids is not None:
            text += f"; nearest portable choice: --target-layer-ids {','.join(str(i) for i in self.portable_ids)}"
        return text


def _join(names: Sequence[str]) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def serving(hf_readers: Sequence[str], ids: Sequence[int], num_target_layers: int) -> Serving:
    """Which engines can serve a draft reading `ids` (spectool's numbering) of an N-layer target, given who reads
    Hugging Face `hidden_states` for that method (`DraftMethod.hf_readers`; vLLM and SGLang capture layer inputs)."""
    hf_readers = tuple(hf_readers)
    engines = ("vLLM", "SGLang")
    bad = unportable_ids(ids, num_target_layers)
    return Serving(
        ids=tuple(int(i) for i in ids),
        num_target_layers=num_target_layers,
        served_by=hf_readers if bad else (*hf_readers, *engines),
        not_served_by=engines if bad else (),
        unportable=tuple(bad),
        portable_ids=tuple(p) if bad and (p := portable_layer_ids(ids, num_target_layers)) is not None else None,
    )
