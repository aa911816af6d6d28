"""Stored target features: packed capture, resumable shards, and offline training equal to online training."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from spectool.chat_format import TokenizedExample
from spectool.errors import UsageError
from spectool.target import FrozenTarget
from spectool.training.batches import ShuffledBatches, collate, pack_examples
from spectool.training.capture import capture_batch
from spectool.training.features import (
    FeaturesConfig,
    FeatureStore,
    IndexedBatches,
    extract_features,
    shard_name,
)
from spectool.training.trainer import Trainer
from tests.training.conftest import write_jsonl
from tests.training.test_trainer import conversations, make_config, rows


@pytest.fixture
def data_file(tmp_path):
    return write_jsonl(tmp_path / "data.jsonl", conversations(16))


def features_config(target, data, out, **overrides) -> FeaturesConfig:
    fields = dict(target=str(target), method="dflash", data=str(data), out=str(out), max_length=48, shard_size=5)
    fields.update(batch_size=3, device="cpu", **overrides)
    return FeaturesConfig(**fields)


def test_packed_rows_capture_each_document_as_if_alone(tiny_target_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_target_dir, dtype=torch.float32)
    target = FrozenTarget(model, [0, 1])
    docs = [TokenizedExample(list(range(10, 10 + n)), [1] * n) for n in (5, 7, 3)]
    packed = collate(pack_examples(docs, 16), pad_token_id=0)
    assert packed.input_ids.shape[0] == 1 and int(packed.document_ids.max()) == 2
    together = capture_batch(target, packed, return_logits=True)
    start = 0
    for doc in docs:
        alone = capture_batch(target, collate([doc], 0), return_logits=True)
        span = slice(start, start + len(doc))
        assert torch.allclose(together.target_hidden_states[0, span], alone.target_hidden_states[0], atol=1e-5)
        assert torch.allclose(together.target_logits[0, span], alone.target_logits[0], atol=1e-4)
        start += len(doc)


def test_indexed_batches_are_shuffled_batches_with_indices():
    examples = [TokenizedExample([i, i + 1], [0, 1]) for i in range(7)]
    plain, indexed = ShuffledBatches(examples, 3, 0, seed=4), IndexedBatches(examples, 3, 0, seed=4)
    for _ in range(6):  # crosses two epoch boundaries
        a, b = next(plain), next(indexed)
        assert torch.equal(a.input_ids, b.input_ids)
        assert torch.equal(b.input_ids[:, 0], torch.tensor(indexed.last_indices))
    assert plain.state_dict() == indexed.state_dict()


def test_extraction_is_sharded_and_resumable(tiny_target_dir, data_file, tmp_path):
    out = tmp_path / "features"
    summary, prepared = extract_features(features_config(tiny_target_dir, data_file, out))
    assert (summary.num_examples, summary.num_shards, summary.shards_written) == (16, 4, 4)
    manifest = json.loads((out / "features.json").read_text())
    assert manifest["target_layer_ids"] == [1] and manifest["num_examples"] == 16
    store = FeatureStore(out)
    assert [e.input_ids for e in store.examples] == [e.input_ids for e in prepared.examples]
    hidden, last = store.features(7)
    assert hidden.shape == (len(prepared.examples[7]), 64) and last.shape == hidden.shape

    (out / shard_name(2)).unlink()
    with pytest.raises(UsageError, match="1 of 4 shards missing"):
        FeatureStore(out)
    again, _ = extract_features(features_config(tiny_target_dir, data_file, out))
    assert (again.shards_written, again.shards_skipped) == (1, 3)
    with pytest.raises(UsageError, match="other settings"):
        extract_features(features_config(tiny_target_dir, data_file, out, max_length=40))


def test_training_from_features_equals_training_online(tiny_target_dir, data_file, tmp_path):
    extract_features(features_config(tiny_target_dir, data_file, tmp_path / "features"))
    common = dict(max_steps=2, eval_fraction=0.25, eval_every=1)
    online = Trainer(make_config(tiny_target_dir, data_file, tmp_path / "online", **common))
    online.run()
    offline_config = make_config(tiny_target_dir, None, tmp_path / "offline", features=str(tmp_path / "features"))
    offline_config.target = None  # taken from the features
    for key, value in common.items():
        setattr(offline_config, key, value)
    offline = Trainer(offline_config)
    assert offline.target_model is None and offline.info.ref == str(tiny_target_dir.resolve())
    offline.run()
    for a, b in zip(rows(tmp_path / "online"), rows(tmp_path / "offline"), strict=True):
        for key in ("loss", "acc@1", "acceptance_length", "eval_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    a, b = online.draft.state_dict(), offline.draft.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_features_of_other_layers_are_refused(tiny_target_dir, data_file, tmp_path):
    extract_features(features_config(tiny_target_dir, data_file, tmp_path / "f", target_layer_ids=[0]))
    config = make_config(tiny_target_dir, None, tmp_path / "run", features=str(tmp_path / "f"), target_layer_ids=[1])
    with pytest.raises(UsageError, match="holds features of layers \\[0\\]"):
        Trainer(config)


@pytest.mark.slow
def test_two_processes_store_every_example_once_and_a_killed_rank_is_finished_on_restart(
    tiny_target_dir, data_file, tmp_path
):
    """`torchrun -m spectool data features`: each process writes its own shards (round robin). A store where one
    process died before writing anything (here: only rank 1's shards on disk) is finished by rerunning the same
    command, and it then holds every example exactly once, with the features one process stores."""
    from tests.training.test_distributed import torchrun

    single = tmp_path / "single"
    extract_features(features_config(tiny_target_dir, data_file, single))
    out = tmp_path / "parallel"
    config = features_config(tiny_target_dir, data_file, out)
    # what a killed rank 0 leaves: the manifest, and the shards rank 1 wrote
    summary, _ = extract_features(features_config(tiny_target_dir, data_file, tmp_path / "scratch"))
    out.mkdir()
    (out / "features.json").write_text((tmp_path / "scratch" / "features.json").read_text())
    for index in range(summary.num_shards):
        if index % 2 == 1:
            (out / shard_name(index)).write_bytes((tmp_path / "scratch" / shard_name(index)).read_bytes())
    assert sorted(p.name for p in out.glob("shard-*")) == [shard_name(1), shard_name(3)]
    args = ["data", "features", "--target", config.target, "--method", config.method, "--data", config.data]
    args += ["--out", str(out), "--max-length", "48", "--shard-size", "5", "--batch-size", "3", "--device", "cpu"]
    result = torchrun(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Stored features") == 1  # rank 0 reports, for both processes
    stored, reference = FeatureStore(out), FeatureStore(single)
    assert [e.input_ids for e in stored.examples] == [e.input_ids for e in reference.examples]
    for index in range(len(reference.examples)):
        for a, b in zip(stored.features(index), reference.features(index), strict=True):
            assert torch.equal(a, b), index
