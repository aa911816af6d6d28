"""The draft methods spectool knows, and what is computed from them: a draft resolved against a target
(`resolve` -> `DraftSpec`), its parameter layout, and which method a checkpoint holds.

Each method is declared once, in `spectool/methods/<name>.py` (see `spectool.methods.base.DraftMethod`); this module
collects them. Every table, `--method` choice, help list, layer report and JSON key is built from `methods()`.
Dispatch on a target is on its config's `architectures`: the first string the method knows wins.
Adding a target family whose draft fits the config-driven shape is a one-line append, e.g.
``get("dflash").architectures["Qwen3NextForCausalLM"] = "Qwen3DFlashDraftModel"``; adding a method is
``register(MyMethod())`` (ARCHITECTURE.md, "Adding a method").
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import spectool.methods
from spectool.arch import TargetArch
from spectool.errors import SpectoolError, UsageError
from spectool.layers import LayerIdWarning, Serving, validate_layer_ids
from spectool.layers import serving as engine_serving
from spectool.layout import DraftLayout
from spectool.methods.base import DraftMethod, DraftSpec
from spectool.methods.options import MethodOption, merged

_METHODS: dict[str, DraftMethod] = {}

#: The method the demo trains and `spectool chat` drafts with when no --draft is given.
DEFAULT_METHOD = "dspark"


class UnsupportedArchitecture(SpectoolError):
    """The target's architectures are not in the method's registry (exit code 1)."""


def register(method: DraftMethod) -> DraftMethod:
    """Add a method (its name must be new); returns it."""
    if method.name in _METHODS:
        raise ValueError(f"a draft method named {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a registered method (tests that register one of their own)."""
    _METHODS.pop(name, None)


def _shipped() -> list[DraftMethod]:
    """One instance of every `DraftMethod` class defined in a module of `spectool.methods`, in their `order`
    (abstract bases such as `BlockMethod` are not methods)."""
    found = []
    for info in pkgutil.iter_modules(spectool.methods.__path__, "spectool.methods."):
        module = importlib.import_module(info.name)
        found += [
            value()
            for value in vars(module).values()
            if isinstance(value, type) and issubclass(value, DraftMethod) and value.__module__ == module.__name__
            and not inspect.isabstract(value)
        ]  # fmt: skip
    return sorted(found, key=lambda method: method.order)


for _method in _shipped():
    register(_method)


def methods() -> list[DraftMethod]:
    """Every registered method: the shipped ones in their `order`, then any registered later."""
    return list(_METHODS.values())


def method_names() -> list[str]:
    """The `--method` choices."""
    return list(_METHODS)


def get(name: str) -> DraftMethod:
    """The method called `name`; a usage error listing the choices otherwise."""
    try:
        return _METHODS[name]
    except (KeyError, TypeError):
        raise UsageError(f"unknown method {name!r}; choose one of {', '.join(_METHODS)}") from None


def declared_options(part: str | None = None) -> dict[str, MethodOption]:
    """Every registered method's own options (of one part: "shape" or "objective"), each name once, in the
    methods' order: what `init` / `train` / `inspect` take on the command line and `TrainConfig` holds."""
    return merged([option for method in methods() for option in method.options if part in (None, option.part)])


def declaring_methods(name: str) -> list[DraftMethod]:
    """The registered methods that declare the option `name`."""
    return [method for method in methods() if name in method.option_names()]


def layer_methods() -> list[DraftMethod]:
    """Methods that read chosen target layers, in the order `spectool layers` shows them (DSpark first)."""
    return [m for m in reversed(methods()) if m.reads_feature_layers]


def match_architecture(method: str, architectures: Sequence[str]) -> tuple[str, str]:
    """(architecture, draft class) for the first of `architectures` the method's registry knows."""
    found = get(method)
    for arch in architectures:
        if arch in found.architectures:
            return arch, found.architectures[arch]
    given = ", ".join(architectures) if architectures else "none listed in config.json"
    raise UnsupportedArchitecture(
        f"{found.title} has no draft for architectures [{given}]; supported: {', '.join(found.architectures)}"
    )


def resolve(
    method: str,
    target: TargetArch | dict[str, Any],
    *,
    tokenizer_length: int | None = None,
    unused_token_id: int | None = None,
    num_feature_layers: int | None = None,
    num_draft_layers: int | None = None,
    target_layer_ids: Sequence[int] | None = None,
    **shape_options: Any,
) -> DraftSpec:
    """Resolve `method` against a target: registry match, default or validated layer ids, draft shape.

    Every option left as None takes the method's default scaled to the target (`spectool.methods.*`: e.g. DFlash /
    DSpark use fewer layers (depth // 4, at most 5)). `shape_options` are the method's own (`DraftMethod.options`
    of part "shape", checked against their ranges); another method's are refused when given.
    """
    found = get(method)
    arch = target if isinstance(target, TargetArch) else TargetArch.from_config(target)
    architecture, draft_class = match_architecture(method, arch.architectures)
    for option, value in shape_options.items():
        found.check_option(option, value)
    found.check_options(shape_options)
    n = arch.num_hidden_layers
    if num_draft_layers is None:
        num_draft_layers = found.default_num_draft_layers(n)
    elif num_draft_layers < 1:
        raise UsageError(f"--num-draft-layers must be at least 1, got {num_draft_layers}")
    if target_layer_ids is not None:
        expected = found.fixed_feature_count or num_feature_layers
        ids = validate_layer_ids(
            list(target_layer_ids), n, expected_count=expected, method=found.title, readers=found.hf_readers
        )
    else:
        if num_feature_layers is None:
            num_feature_layers = found.default_feature_count(n, num_draft_layers)
        ids = found.default_layer_ids(n, num_feature_layers)
    return DraftSpec(
        method=method,
        architecture=architecture,
        draft_class=draft_class,
        checkpoint_format=found.checkpoint_format,
        num_target_layers=n,
        target_layer_ids=tuple(ids),
        num_draft_layers=num_draft_layers,
        options=found.resolve_options(arch, tokenizer_length, shape_options, unused_token_id=unused_token_id),
    )


def resolve_quietly(method: str, target: TargetArch | dict[str, Any], **options: Any) -> DraftSpec:
    """`resolve` without the layer-id warning (callers that say it once themselves)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LayerIdWarning)
        return resolve(method, target, **options)


def default_layer_ids(method: str, num_target_layers: int, num_feature_layers: int | None = None) -> list[int]:
    """The feature-layer ids `method` picks for an N-layer target (its formula)."""
    return get(method).default_layer_ids(num_target_layers, num_feature_layers)


def serving(method: str, ids: Sequence[int], num_target_layers: int) -> Serving:
    """Which engines can serve a `method` draft reading `ids` (spectool's numbering) of an N-layer target."""
    return engine_serving(get(method).hf_readers, ids, num_target_layers)


def draft_layout(spec: DraftSpec, arch: TargetArch) -> DraftLayout:
    """Every tensor the draft of `spec` holds or borrows, with its shape and role."""
    return DraftLayout(spec.method, tuple(get(spec.method).layout(spec, arch)))


def detect_method(config: Mapping[str, Any], where: str = "config.json") -> DraftMethod:
    """The draft method of a config.json, from its architectures (or a method's own config blocks)."""
    archs = config.get("architectures") or []
    for method in methods():
        if any(a in method.checkpoint_architectures for a in archs):
            return method
    for method in methods():
        if method.claims(config):
            return method
    known = ", ".join(name for method in methods() for name in method.checkpoint_architectures)
    raise SpectoolError(f"{where}: architectures {archs} are not a draft format spectool knows ({known})")


def conversions() -> dict[str, list[str]]:
    """`spectool convert --to X`: which methods each destination layout holds."""
    out: dict[str, list[str]] = {}
    for method in methods():
        for destination in method.conversions:
            out.setdefault(destination, []).append(method.name)
    return out


def with_article(method: str) -> str:
    """'an eagle3' / 'a dspark': a method name with the article that reads right before it."""
    return f"{'an' if method[:1] in 'aeiou' else 'a'} {method}"


def check_conversion(method: str | None, to: str) -> None:
    """Refuse (a usage error) a layout `to` spectool does not write, or one that does not hold `method` drafts
    (None: not known yet)."""
    destinations = conversions()
    if to not in destinations:
        raise UsageError(f"--to must be one of {', '.join(destinations)}, got {to!r}")
    if method is not None and method not in destinations[to]:
        raise UsageError(
            f"{with_article(method)} draft has no {to} layout ({to} holds {', '.join(destinations[to])} drafts)"
        )
