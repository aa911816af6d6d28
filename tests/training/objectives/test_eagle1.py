"""EAGLE-1 objective: loss terms and the simulated chain against a plain per-document loop, noise, alignment."""

import math

import pytest
import torch

from tests.training.objectives.conftest import packed_batch, run

CHAIN_STEPS = 3


def log_softmax(values):
    top = max(values)
    log_total = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - log_total for v in values]


def argmax(values):
    return max(range(len(values)), key=values.__getitem__)


def smooth_l1(a, b):
    terms = [0.5 * (x - y) ** 2 if abs(x - y) < 1 else abs(x - y) - 0.5 for x, y in zip(a, b, strict=True)]
    return sum(terms) / len(terms)


@torch.no_grad()
def reference(draft, target, documents, lm_head, prompt=4):
    """Each document alone: the draft's own causal forward, plain-Python SmoothL1 / soft CE, and decode-style chains
    (a KV cache over the teacher-forced prefix, then the draft fed its own predictions)."""
    l1s, ces = [], []
    valid, hits, prefix = [0] * CHAIN_STEPS, [0] * CHAIN_STEPS, [0] * CHAIN_STEPS
    for tokens in documents:
        features = target.model(tokens[None]).last_hidden_state[0]
        length = len(tokens)
        labels = [i >= prompt for i in range(length)]
        shifted = torch.cat((tokens[1:], tokens.new_zeros(1)))[None]
        predicted = draft(shifted, hidden_states=features[None])[0]
        for t in range(length - 2):
            if not labels[t + 2]:
                continue
            l1s.append(smooth_l1(predicted[t].tolist(), features[t + 1].tolist()))
            teacher, drafted = lm_head(features[t + 1]).tolist(), lm_head(predicted[t]).tolist()
            probs = [math.exp(v) for v in log_softmax(teacher)]
            ces.append(-sum(p * q for p, q in zip(probs, log_softmax(drafted), strict=True)))
            cache = draft.new_cache()
            state = draft(shifted[:, : t + 1], hidden_states=features[None, : t + 1], past_key_values=cache)[:, -1:]
            all_hit = True
            for step in range(CHAIN_STEPS):
                if t + 2 + step >= length or not labels[t + 2 + step]:
                    break
                if step:
                    token = tokens[t + 1 + step].view(1, 1)
                    state = draft(token, hidden_states=state, past_key_values=cache)
                hit = argmax(lm_head(state[0, 0]).tolist()) == argmax(lm_head(features[t + 1 + step]).tolist())
                all_hit = all_hit and hit
                valid[step] += 1
                hits[step] += hit
                prefix[step] += all_hit
    return {
        "smooth_l1": sum(l1s) / len(l1s),
        "soft_ce": sum(ces) / len(ces),
        "num_supervised": len(l1s),
        "acc": [h / v for h, v in zip(hits, valid, strict=True)],
        "prefix": [p / v for p, v in zip(prefix, valid, strict=True)],
        "acceptance_length": 1 + sum(p / v for p, v in zip(prefix, valid, strict=True)),
    }


@pytest.fixture
def documents(greedy_data):
    ids = greedy_data[0]
    return [[ids[0, :14], ids[1, :10]], [ids[1, :16]]]


def test_loss_and_chain_match_a_per_document_loop(objective_for, qwen3_target, documents):
    objective = objective_for("eagle1", chain_steps=CHAIN_STEPS, distill_weight=0.3)
    objective.draft.eval()
    batch, position_ids, document_ids = packed_batch(qwen3_target, objective, documents, length=28)
    torch.manual_seed(3)
    lm_head = torch.nn.Linear(64, 3)  # three classes: the chain's hits are neither all 0 nor all 1
    out = objective(
        batch, target_lm_head=lm_head, target_embed=None, position_ids=position_ids, document_ids=document_ids
    )
    expected = reference(objective.draft, qwen3_target, [d for row in documents for d in row], lm_head)
    metrics = out.metrics
    assert out.num_supervised == expected["num_supervised"] == (14 - 4) + (10 - 4) + (16 - 4)
    assert metrics["smooth_l1"] == pytest.approx(expected["smooth_l1"], rel=1e-4)
    assert metrics["soft_ce"] == pytest.approx(expected["soft_ce"], rel=1e-4)
    assert out.loss.item() == pytest.approx(expected["smooth_l1"] + 0.3 * expected["soft_ce"], rel=1e-4)
    assert [metrics[f"acc@{k}"] for k in (1, 2, 3)] == pytest.approx(expected["acc"], abs=1e-6)
    assert [metrics[f"prefix@{k}"] for k in (1, 2, 3)] == pytest.approx(expected["prefix"], abs=1e-6)
    assert 0 < expected["acc"][0] < 1 and 1 < expected["acceptance_length"] < 2
    assert metrics["acceptance_length"] == pytest.approx(expected["acceptance_length"], abs=1e-6)


def test_feature_noise_only_in_training_and_drawn_from_the_generator(objective_for, qwen3_target, greedy_data):
    objective = objective_for("eagle1")
    batch = packed_batch(qwen3_target, objective, [[greedy_data[0][0]]], length=24)[0]

    def loss(seed):
        return run(objective, batch, qwen3_target, generator=torch.Generator().manual_seed(seed)).loss.item()

    objective.draft.train()
    noisy = loss(seed=1)
    assert loss(seed=1) == noisy and loss(seed=2) != noisy
    objective.feature_noise = 0.0
    clean = loss(seed=1)
    objective.draft.eval()
    objective.feature_noise = 0.1
    assert loss(seed=1) == loss(seed=2) == pytest.approx(clean, rel=1e-6)


def test_chain_steps_one_reports_one_plus_accuracy(objective_for, qwen3_target, greedy_data):
    objective = objective_for("eagle1", chain_steps=1)
    objective.draft.eval()
    batch = packed_batch(qwen3_target, objective, [[greedy_data[0][0]]], length=24)[0]
    metrics = run(objective, batch, qwen3_target).metrics
    assert set(metrics) == {"loss", "smooth_l1", "soft_ce", "acc@1", "prefix@1", "acceptance_length"}
    assert (
        metrics["acceptance_length"] == pytest.approx(1 + metrics["acc@1"]) and metrics["prefix@1"] == metrics["acc@1"]
    )
