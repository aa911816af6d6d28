"""The config-only layout that `inspect` shows equals the real draft modules, tensor by tensor."""

import pytest

from spectool import catalog
from spectool.arch import TargetArch
from spectool.drafts import build_draft
from spectool.hub import TargetInfo, transformers_config
from spectool.registry import draft_layout, get, method_names, resolve

TARGETS = ["Qwen/Qwen3-8B", "Qwen/Qwen3-30B-A3B", "meta-llama/Llama-3.2-1B-Instruct", "openai/gpt-oss-20b"]
CASES = [
    (hub_id, method)
    for hub_id in TARGETS
    for method in method_names()
    if any(a in get(method).architectures for a in catalog.lookup(hub_id).config["architectures"])
]


def real_tensors(draft) -> dict[str, tuple[tuple[int, ...], str]]:
    frozen = set(draft.frozen_parameter_names())
    out = {name: (tuple(p.shape), "frozen" if name in frozen else "trainable") for name, p in draft.named_parameters()}
    out.update({name: (tuple(b.shape), "buffer") for name, b in draft.named_buffers() if name in draft.state_dict()})
    return out


@pytest.mark.parametrize(("hub_id", "method"), CASES)
def test_layout_matches_built_draft(hub_id, method):
    entry = catalog.lookup(hub_id)
    arch = TargetArch.from_config(entry.config)
    spec = resolve(method, arch, tokenizer_length=entry.tokenizer_length, mask_token_id=None)
    info = TargetInfo(ref=hub_id, source="catalog", config=entry.config, arch=arch)
    shape = dict(spec.options)
    if "mask_token_id" in shape and shape["mask_token_id"] is None:
        shape["mask_token_id"] = arch.vocab_size - 1
    draft = build_draft(
        method,
        transformers_config(info),
        target_layer_ids=list(spec.target_layer_ids),
        num_draft_layers=spec.num_draft_layers,
        device="meta",
        **shape,
    )
    layout = draft_layout(spec, arch)
    expected = {t.name: (t.shape, t.role) for t in layout.tensors if t.role != "borrowed"}
    assert real_tensors(draft) == expected
    trainable = sum(p.numel() for n, p in draft.named_parameters() if n not in set(draft.frozen_parameter_names()))
    assert trainable == layout.trainable_params
