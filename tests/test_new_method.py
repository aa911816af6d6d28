"""A fifth method added from outside spectool/, as ARCHITECTURE.md's checklist says: a Medusa-style draft (independent
heads on the target's last hidden state, head k guessing the token k+1 places after the last committed one), its
objective and its proposer, declared and registered here. `init`, `train`, `chat` and `bench` then run it through
the command line with nothing in spectool/ changed, and its greedy answers equal the target's. Its one option
(`--num-heads`, declared with the method) reaches `init`, `train` and `inspect` the same way."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from spectool import registry
from spectool.decoding.proposers import Proposal, Proposer, draw
from spectool.drafts.common import DraftModelMixin, text_config
from spectool.layout import Tensor
from spectool.methods.base import DraftMethod, DraftSpec
from spectool.methods.options import MethodOption
from spectool.training.objectives.base import Documents, Objective, chain_statistics, finish, rate_metrics
from tests.cli.conftest import data_file, invoke  # noqa: F401 (data_file is a fixture)

NUM_HEADS = 3


class MedusaConfig(PretrainedConfig):
    """Heads on a target's last hidden state: its width, vocabulary and depth, and how many heads."""

    model_type = "spectool-test-medusa"

    def __init__(self, hidden_size=64, vocab_size=256, num_heads=NUM_HEADS, num_target_layers=1, **kwargs):
        self.hidden_size, self.vocab_size, self.num_heads = hidden_size, vocab_size, num_heads
        self.num_target_layers = num_target_layers
        self.target_layer_ids = [num_target_layers - 1]  # the post-final-norm last hidden state
        super().__init__(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "architectures": ["MedusaDraftModel"]}


class MedusaHead(nn.Module):
    """One residual SiLU block and a vocabulary projection."""

    def __init__(self, hidden: int, vocab: int) -> None:
        super().__init__()
        self.block = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x + F.silu(self.block(x)))


class MedusaDraft(DraftModelMixin, PreTrainedModel):
    """Logits [..., heads, V] from target hidden states [..., H]."""

    config_class = MedusaConfig

    def __init__(self, config: MedusaConfig) -> None:
        super().__init__(config)
        self.heads = nn.ModuleList(MedusaHead(config.hidden_size, config.vocab_size) for _ in range(config.num_heads))
        self.post_init()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.to(self.heads[0].block.weight.dtype)
        return torch.stack([head(hidden) for head in self.heads], dim=-2)


class MedusaObjective(Objective):
    """Cross entropy of head k against the token k+2 places after each supervised position's feature."""

    method = "medusa"
    draft_class = MedusaDraft

    def __call__(self, batch, *, target_lm_head, target_embed, generator=None, position_ids=None, document_ids=None):
        documents = Documents.of(batch, document_ids)
        logits = self.draft(batch.target_hidden_states).float()  # [B, S, K, V]
        losses, hits, valid = [], [], []
        for k in range(self.draft.config.num_heads):
            shift = k + 2
            labels = torch.roll(batch.input_ids, -shift, dims=1)
            mask = documents.within(shift) & torch.roll(batch.loss_mask.bool(), -shift, dims=1)
            ce = F.cross_entropy(logits[:, :, k].flatten(0, 1), labels.flatten(), reduction="none")
            losses.append((ce * mask.flatten()).sum() / mask.sum().clamp_min(1))
            hits.append(logits[:, :, k].argmax(-1) == labels)
            valid.append(mask)
        rows = valid[0]  # positions whose first head has a label
        accuracy, prefix, _ = chain_statistics(torch.stack(hits, -1)[rows], torch.stack(valid, -1)[rows])
        metrics = {**rate_metrics("acc", accuracy), "acceptance_length": 1 + prefix.sum()}
        return finish(torch.stack(losses).mean(), metrics, rows.sum())


class MedusaProposer(Proposer):
    """Every head's guess from the last committed position's feature, for each row."""

    def __init__(self, draft: MedusaDraft) -> None:
        self.draft, self.max_drafts = draft, draft.config.num_heads
        self.reset()

    @classmethod
    def for_target(cls, draft: MedusaDraft, target_model: nn.Module, *, num_steps: int) -> MedusaProposer:
        return cls(draft)

    def reset(self, rows: int = 1) -> None:
        self.last: list[torch.Tensor | None] = [None] * rows

    def keep_rows(self, rows: list[int]) -> None:
        self.last = [self.last[r] for r in rows]

    def extend_context(self, row: int, features: torch.Tensor) -> None:
        self.last[row] = features.reshape(-1, features.shape[-1])[-1]

    @torch.no_grad()
    def propose(self, histories, limits, sampling, generator) -> list[Proposal]:
        logits = self.draft(torch.stack(self.last))  # [B, K, V]
        tokens, probs = draw(logits, sampling, generator)
        return [
            Proposal(tokens[row, :limit], None if probs is None else probs[row, :limit])
            for row, limit in enumerate(limits)
        ]


class Medusa(DraftMethod):
    """The test's Medusa-style method, declared once."""

    name = "medusa"
    title = "Medusa (test)"
    order = 90
    supported = {"Qwen3ForCausalLM": "MedusaDraftModel"}
    checkpoint_architectures = ("MedusaDraftModel",)
    checkpoint_format = "MedusaDraftModel: heads.{k}.block, heads.{k}.out"
    required_keys = ("heads.0.out.weight",)
    loaders = "spectool"
    default_lr = 3e-3
    reads_feature_layers = False
    fixed_feature_count = 1
    draft_model = MedusaDraft
    draft_config = MedusaConfig
    objective = MedusaObjective
    proposer = MedusaProposer
    options = (
        MethodOption(
            "num_heads", int, f"heads, head k guessing the token k+1 places on [{NUM_HEADS}].", "shape", minimum=1
        ),
    )

    def resolve_options(self, arch: Any, tokenizer_length: Any, options: dict[str, Any], **unused: Any) -> dict:
        return {"num_heads": options.get("num_heads") or NUM_HEADS}

    def shape_phrases(self, spec: DraftSpec, arch: Any) -> list[str]:
        return [f"{spec.option('num_heads')} heads"]

    def layout(self, spec: DraftSpec, arch: Any) -> list[Tensor]:
        h, v = arch.hidden_size, arch.vocab_size
        tensors = []
        for k in range(spec.option("num_heads")):
            tensors += [
                Tensor(f"heads.{k}.block.weight", (h, h), "trainable"),
                Tensor(f"heads.{k}.block.bias", (h,), "trainable"),
                Tensor(f"heads.{k}.out.weight", (v, h), "trainable"),
            ]
        return tensors

    def build_config(self, target_config: Any, ids: list[int] | None, options: dict[str, Any]) -> MedusaConfig:
        cfg = text_config(target_config)
        return MedusaConfig(
            cfg.hidden_size, cfg.vocab_size, options.get("num_heads") or NUM_HEADS, cfg.num_hidden_layers
        )

    def check_config(self, config: Any) -> None:
        if config.num_heads < 1:
            raise ValueError(f"num_heads must be positive, got {config.num_heads}")


@pytest.fixture
def medusa():
    method = registry.register(Medusa())
    yield method
    registry.unregister(method.name)


def greedy_answers(prompts: Sequence[str], runtime: Any, tokens: int) -> list[list[int]]:
    ids = [runtime.prompt_ids([{"role": "user", "content": p}]) for p in prompts]
    return [
        [t for event in runtime.target_engine.generate(i, max_new_tokens=tokens) for t in event.tokens] for i in ids
    ]


def test_a_fifth_method_runs_init_train_chat_and_bench(medusa, chat_target_dir, data_file, tmp_path):  # noqa: F811
    assert "medusa" in registry.method_names()
    result = invoke("inspect", str(chat_target_dir), "--method", "medusa", "--num-heads", "4", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["methods"]["medusa"]
    assert report["supported"] is True and report["num_heads"] == 4 and len(report["modules"]) == 4 * 3
    assert "--num-heads" in invoke("init", "--help").stdout
    result = invoke(
        "init", str(chat_target_dir), "--method", "medusa", "--num-heads", "0", "--out", str(tmp_path / "x")
    )
    assert result.exit_code == 2 and "--num-heads must be at least 1, got 0" in result.output
    result = invoke(
        "init", str(chat_target_dir), "--method", "eagle3", "--num-heads", "2", "--out", str(tmp_path / "x")
    )
    assert result.exit_code == 2 and "--num-heads does not apply to EAGLE-3 drafts" in result.output

    draft = tmp_path / "medusa-init"
    result = invoke("init", str(chat_target_dir), "--method", "medusa", "--num-heads", "2", "--out", str(draft))
    assert result.exit_code == 0, result.output
    config = json.loads((draft / "config.json").read_text())
    assert config["architectures"] == ["MedusaDraftModel"] and config["num_heads"] == 2

    run = tmp_path / "medusa-run"
    args = ["--target", str(chat_target_dir), "--method", "medusa", "--data", str(data_file), "--out", str(run)]
    result = invoke("train", *args, "--max-steps", "2", "--batch-size", "2", "--max-length", "48", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == 2 and summary["metrics"]["loss"] > 0 and "acceptance_length" in summary["metrics"]
    assert json.loads((run / "train_config.json").read_text())["num_heads"] == NUM_HEADS  # resolved, at the top
    two = tmp_path / "medusa-two"
    result = invoke("train", *args[:-1], str(two), "--num-heads", "2", "--max-steps", "1", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    assert json.loads((two / "config.json").read_text())["num_heads"] == 2

    result = invoke("chat", "--draft", str(run), "--prompt", "hi there", "-n", "12", "--verify", "full")
    assert result.exit_code == 0, result.output
    assert "acceptance length" in result.stdout and "12 tokens in" in result.stdout

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ("hi there", "what is the time")) + "\n")
    for verify in ("full", "auto"):
        result = invoke("bench", "--draft", str(run), "-p", str(prompts), "-n", "10", "--verify", verify, "--json")
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["method"] == "medusa" and report["lossless"] is True and report["mismatched_prompts"] == []


def test_the_fifth_method_is_lossless_against_the_target(medusa, chat_target_dir, tmp_path):
    """Greedy speculative answers with the (untrained, so mostly wrong) heads equal the target's own."""
    from spectool.draft_init import init_draft
    from spectool.runtime import load_runtime

    path = init_draft(str(chat_target_dir), "medusa", tmp_path / "m", dtype="float32").path
    runtime = load_runtime(path)
    prompts = ["hi there", "how is it going", "one two three"]
    expected = greedy_answers(prompts, runtime, 16)
    for prompt, answer in zip(prompts, expected, strict=True):
        ids = runtime.prompt_ids([{"role": "user", "content": prompt}])
        events = list(runtime.engine.generate(ids, max_new_tokens=16))
        assert [t for e in events for t in e.tokens] == answer
        assert any(e.num_drafted for e in events)  # the heads did draft


def test_unregistered_it_is_gone(medusa):
    registry.unregister("medusa")
    assert "medusa" not in registry.method_names()
    assert "--num-heads" not in invoke("init", "--help").stdout
    registry.register(medusa)  # the fixture removes it again
