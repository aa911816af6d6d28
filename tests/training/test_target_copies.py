"""One copy of the target's embedding / lm_head per run: a tied target's heads read from its weights are one
tensor, and a draft's frozen copies of them share the target's tensors."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from spectool.hub import resolve_model
from spectool.training.inputs import _target_heads, share_target_copies
from spectool.training.trainer import Trainer
from tests.training.conftest import write_jsonl
from tests.training.test_trainer import conversations, make_config


@pytest.fixture
def tied_target_dir(tmp_path, chatml_tokenizer):
    config = Qwen3Config(
        vocab_size=len(chatml_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        tie_word_embeddings=True,
        architectures=["Qwen3ForCausalLM"],
    )
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "tied")
    chatml_tokenizer.save_pretrained(tmp_path / "tied")
    return tmp_path / "tied"


def test_a_tied_targets_heads_are_one_tensor_cast_once(tied_target_dir, monkeypatch):
    built = []
    original = torch.nn.Linear.reset_parameters
    monkeypatch.setattr(
        torch.nn.Linear, "reset_parameters", lambda self: built.append(self.weight.device.type) or original(self)
    )
    head, embed = _target_heads(resolve_model(str(tied_target_dir)), "float32", torch.device("cpu"))
    assert head.weight.dtype == embed.weight.dtype == torch.float32
    assert head.weight.data_ptr() == embed.weight.data_ptr()  # not two float32 copies of the vocabulary
    assert set(built) <= {"meta"}  # and no randomly initialised [vocab, hidden] matrix on the way
    assert not head.weight.requires_grad and not embed.weight.requires_grad
    model = Qwen3ForCausalLM.from_pretrained(tied_target_dir, dtype=torch.float32)
    assert torch.equal(embed.weight, model.get_input_embeddings().weight)


def test_dspark_training_shares_the_targets_embedding_and_lm_head(tiny_target_dir, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", conversations(8))
    config = make_config(
        tiny_target_dir, data, tmp_path / "run", method="dspark", markov_rank=8, max_steps=1, dtype="float32"
    )  # float32 target: --dtype auto picks bf16 on AMX CPUs, and a bf16 target's tensors are not the draft's fp32
    trainer = Trainer(config)
    try:
        draft, inputs = trainer.draft, trainer.inputs
        assert draft.embed_tokens.weight.data_ptr() == inputs.target_embed.weight.data_ptr()
        assert draft.lm_head.weight.data_ptr() == inputs.target_lm_head.weight.data_ptr()
        assert not draft.embed_tokens.weight.requires_grad and not draft.lm_head.weight.requires_grad
        trainer.run()
    finally:
        trainer.close(clean=True)
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_copies_that_differ_or_would_alias_are_kept():
    from spectool.drafts.dspark import DSparkDraftConfig, Qwen3DSparkModel

    config = DSparkDraftConfig(
        vocab_size=16,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
        target_layer_ids=[0],
        num_target_layers=2,
        markov_rank=2,
        mask_token_id=15,
    )
    draft = Qwen3DSparkModel(config)
    tied = torch.nn.Embedding(16, 8)
    head = torch.nn.Linear(8, 16, bias=False)
    head.weight = tied.weight
    with torch.no_grad():
        draft.embed_tokens.weight.copy_(tied.weight)
        draft.lm_head.weight.copy_(tied.weight)
    freed = share_target_copies(draft, head, tied)
    assert freed == 16 * 8 * 4
    assert draft.embed_tokens.weight.data_ptr() == tied.weight.data_ptr()
    assert draft.lm_head.weight.data_ptr() != tied.weight.data_ptr()  # two draft names for one tensor: kept apart
    other = torch.nn.Embedding(16, 8)
    fresh = Qwen3DSparkModel(config)
    assert share_target_copies(fresh, head, other) == 0
