"""What `spectool inspect` reports: the target's facts and, per method, the draft it would get.

Plain data built from a `TargetInfo`; the command renders it with Rich or prints it as JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from spectool.errors import UsageError
from spectool.hub import TargetInfo
from spectool.layers import unportable_ids
from spectool.layout import DraftLayout
from spectool.registry import (
    DraftSpec,
    UnsupportedArchitecture,
    declared_options,
    draft_layout,
    get,
    method_names,
    resolve,
    serving,
)


@dataclass
class MethodReport:
    """One method resolved against the target: supported or why not, its draft spec, layout and notes."""

    method: str
    supported: bool
    spec: DraftSpec | None = None
    layout: DraftLayout | None = None
    reason: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        return get(self.method).title

    def to_json(self) -> dict[str, Any]:
        spec, layout = self.spec, self.layout
        return {
            "supported": self.supported,
            "reason": self.reason,
            "draft_class": spec.draft_class if spec else None,
            "architecture": spec.architecture if spec else None,
            "target_layer_ids": list(spec.target_layer_ids) if spec else None,
            "serving": (
                serving(self.method, spec.target_layer_ids, spec.num_target_layers).to_json()
                if spec and get(self.method).reads_feature_layers
                else None
            ),
            "num_draft_layers": spec.num_draft_layers if spec else None,
            # every method's shape options, each method's own resolved (None: not one of its options)
            **{name: spec.option(name) if spec else None for name in declared_options("shape")},
            "checkpoint_format": spec.checkpoint_format if spec else None,
            "trainable_params": layout.trainable_params if layout else None,
            "frozen_params": layout.frozen_params if layout else None,
            "checkpoint_bytes_bf16": layout.stored_bytes_bf16 if layout else None,
            "modules": (
                [{"name": t.name, "shape": list(t.shape), "role": t.role, "params": t.numel} for t in layout.tensors]
                if layout
                else None
            ),
            "notes": self.notes,
        }


def target_json(info: TargetInfo) -> dict[str, Any]:
    a = info.arch
    total, active = a.parameter_counts()
    return {
        "ref": info.ref,
        "source": info.source,
        "revision": info.revision,
        "architectures": list(a.architectures),
        "model_type": a.model_type,
        "num_hidden_layers": a.num_hidden_layers,
        "hidden_size": a.hidden_size,
        "intermediate_size": a.intermediate_size,
        "num_attention_heads": a.num_attention_heads,
        "num_key_value_heads": a.num_key_value_heads,
        "head_dim": a.head_dim,
        "vocab_size": a.vocab_size,
        "tokenizer_length": info.tokenizer_length,
        "num_experts": a.num_experts,
        "num_experts_per_tok": a.num_experts_per_tok,
        "moe_intermediate_size": a.moe_intermediate_size,
        "rope_type": a.rope_type,
        "rope_theta": a.rope_theta,
        "max_position_embeddings": a.max_position_embeddings,
        "tie_word_embeddings": a.tie_word_embeddings,
        "dtype": a.dtype,
        "parameters_total": total,
        "parameters_active": active,
        "notes": list(info.notes),
        "gguf": asdict(info.gguf) if info.gguf is not None else None,
    }


def method_report(info: TargetInfo, method: str, **options: Any) -> MethodReport:
    """Resolve one method against the target. Options the user gave that are invalid raise UsageError;
    a method that cannot serve this target (architecture, or defaults that do not fit) is reported, not raised.
    """
    found = get(method)
    given = {k: v for k, v in options.items() if v is not None and _applies(found, k)}
    try:
        spec = resolve(
            method, info.arch, tokenizer_length=info.tokenizer_length, unused_token_id=info.unused_token_id, **given
        )
    except UnsupportedArchitecture as exc:
        return MethodReport(method, supported=False, reason=str(exc))
    except UsageError as exc:
        if given:
            raise
        return MethodReport(method, supported=False, reason=str(exc))
    report = MethodReport(method, supported=True, spec=spec, layout=draft_layout(spec, info.arch))
    n = info.arch.num_hidden_layers
    if found.reads_feature_layers and unportable_ids(spec.target_layer_ids, n):
        report.notes.append(serving(method, spec.target_layer_ids, n).message())
    report.notes += found.notes(spec, initialised=False)
    return report


def _applies(method: Any, option: str) -> bool:
    """Whether an inspect option (given for every method at once) is one `method` takes."""
    if option == "num_feature_layers":
        return method.fixed_feature_count is None
    if option in ("num_draft_layers", "target_layer_ids"):
        return True
    return option in method.option_names("shape")


def inspect_report(info: TargetInfo, methods: list[str] | None = None, **options: Any) -> dict[str, MethodReport]:
    return {m: method_report(info, m, **options) for m in (methods or method_names())}
