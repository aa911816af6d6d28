"""The frozen target's hook capture against ``output_hidden_states`` (SPEC §3), for the three layer layouts."""

import pytest
import torch
from torch import nn

from spectool.errors import SpectoolError, UsageError
from spectool.target import FrozenTarget, TargetBatch


class FakeMultimodalBody(nn.Module):
    """``model.model.language_model.layers`` nesting, as in vision-language models."""

    def __init__(self, language_model: nn.Module) -> None:
        super().__init__()
        self.language_model = language_model
        self.visual = nn.Linear(2, 2)

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        return self.language_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


class FakeMultimodal(nn.Module):
    def __init__(self, causal_lm: nn.Module) -> None:
        super().__init__()
        self.model = FakeMultimodalBody(causal_lm.model)
        self.lm_head = causal_lm.lm_head

    def get_input_embeddings(self) -> nn.Module:
        return self.model.language_model.embed_tokens


def reference_hidden_states(causal_lm, input_ids):
    with torch.no_grad():
        out = causal_lm(input_ids, output_hidden_states=True)
    return out.hidden_states, out.logits


def hooks_left(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("layout", ["causal_lm", "bare_decoder", "multimodal"])
def test_capture_equals_output_hidden_states(layout, qwen3_target, token_ids):
    n = qwen3_target.config.num_hidden_layers
    hidden_states, logits = reference_hidden_states(qwen3_target, token_ids)
    model = {
        "causal_lm": qwen3_target,
        "bare_decoder": qwen3_target.model,
        "multimodal": FakeMultimodal(qwen3_target),
    }[layout]
    ids = [-1, 0, 1, n - 1]
    hooks_before = hooks_left(model)  # transformers keeps its own output-recording hooks
    target = FrozenTarget(model, ids)
    batch = target.capture(token_ids, return_logits=layout != "bare_decoder")
    assert isinstance(batch, TargetBatch)
    # id i is the OUTPUT of layer i = hidden_states[i + 1]; id -1 = hidden_states[0]; id N-1 is post-norm
    expected = torch.cat([hidden_states[i + 1] for i in ids], dim=-1)
    assert batch.target_hidden_states.shape == (2, 12, len(ids) * 64)
    torch.testing.assert_close(batch.target_hidden_states, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(batch.target_last_hidden_states, hidden_states[n], atol=1e-6, rtol=1e-6)
    if layout != "bare_decoder":
        torch.testing.assert_close(batch.target_logits, logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(batch.input_ids, token_ids) and batch.loss_mask.sum() == token_ids.numel()
    assert hooks_left(model) == hooks_before


def test_llama_target_and_padding(llama_target, token_ids):
    hidden_states, _ = reference_hidden_states(llama_target, token_ids)
    target = FrozenTarget(llama_target, [-1, 2])
    attention_mask = torch.ones_like(token_ids)
    attention_mask[1, -3:] = 0
    loss_mask = attention_mask.clone()
    loss_mask[:, :4] = 0
    batch = target(token_ids, attention_mask=attention_mask, loss_mask=loss_mask)
    assert batch.target_logits is None and torch.equal(batch.loss_mask, loss_mask)
    torch.testing.assert_close(batch.target_hidden_states[0], torch.cat([hidden_states[0][0], hidden_states[3][0]], -1))
    # only the last hidden state (EAGLE-1)
    assert FrozenTarget(llama_target, []).capture(token_ids).target_hidden_states.shape == (2, 12, 0)


def test_target_is_frozen_and_hooks_go_away_on_error(qwen3_target, token_ids):
    hooks_before = hooks_left(qwen3_target)
    target = FrozenTarget(qwen3_target, [-1, 0])
    assert not qwen3_target.training and not any(p.requires_grad for p in qwen3_target.parameters())
    with pytest.raises(Exception):  # noqa: B017 - any failure inside the forward
        target.capture(token_ids.float())
    assert hooks_left(qwen3_target) == hooks_before


def test_layer_errors(qwen3_target):
    with pytest.raises(UsageError, match=r"\[-1, 3\]"):
        FrozenTarget(qwen3_target, [4])
    with pytest.raises(SpectoolError, match="decoder layers"):
        FrozenTarget(nn.Linear(2, 2), [0])
