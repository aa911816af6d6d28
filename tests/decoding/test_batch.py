"""Batched decoding: ragged rows through one target forward give each row exactly what it gets alone, drafts
included, and every row's answer is the target's own greedy decoding."""

import pytest
import torch

from spectool.decoding.accept import SamplingParams
from spectool.decoding.batch import BatchEngine
from spectool.decoding.engine import Engine, GenerationStats
from spectool.decoding.fast_target import FastTargetSession
from spectool.decoding.proposers import make_proposer
from spectool.decoding.stops import StopStrings
from spectool.drafts import build_draft
from spectool.errors import UsageError
from spectool.target import FrozenTarget
from tests.decoding.test_accept import CHI2_CRIT_001, chi_square
from tests.decoding.test_draft_length import first_two_tokens_joint
from tests.decoding.test_engine import LAYER_IDS, PROMPTS, reference_greedy

# no token 0 in prompts: the reference (HF generate with pad_token_id=0) would mask it out
RAGGED = [*PROMPTS, [9, 8, 7, 6, 5, 4, 3, 2, 1, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]


def block_draft(method, target, config):
    torch.manual_seed(1)
    options = {"block_size": 4, "mask_token_id": 255} if method in ("dflash", "dspark") else {}
    draft = build_draft(method, config, target_layer_ids=LAYER_IDS[method], **options).eval()
    if method == "dspark":
        draft.copy_target_weights(target)
    if method == "eagle1":
        draft.copy_target_embeddings(target)
    return draft


def test_ragged_rows_match_each_row_alone(qwen3_target):
    frozen = FrozenTarget(qwen3_target, [0, 3])
    batch = FastTargetSession(frozen, batch_size=len(RAGGED))
    width = max(map(len, RAGGED))
    padded = torch.zeros(len(RAGGED), width, dtype=torch.long)
    for row, prompt in enumerate(RAGGED):
        padded[row, : len(prompt)] = torch.tensor(prompt)
    logits, features = batch.forward_rows(padded)
    batch.lengths = [len(p) for p in RAGGED]
    step = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]])
    step_logits, step_features = batch.forward_rows(step)
    for row, prompt in enumerate(RAGGED):
        alone = FastTargetSession(frozen)
        ref_logits, ref_features = alone.forward(torch.tensor([prompt]))
        n = len(prompt)
        torch.testing.assert_close(logits[row, :n], ref_logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(features[row, :n], ref_features[0], rtol=1e-4, atol=1e-4)
        ref_logits, ref_features = alone.forward(step[row : row + 1])
        torch.testing.assert_close(step_logits[row], ref_logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(step_features[row], ref_features[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["dflash", "dspark", "eagle1", "eagle3"])
def test_batched_drafts_equal_single_row_drafts(method, qwen3_target, qwen3_config):
    """Two rounds of context of different lengths per row: each row's drafts equal the same proposer's for that row
    alone (a batch of one, as the single-prompt engine runs it)."""
    draft = block_draft(method, qwen3_target, qwen3_config)
    frozen = FrozenTarget(qwen3_target, LAYER_IDS[method])
    batched = make_proposer(method, draft, qwen3_target, num_steps=4)
    batched.reset(len(RAGGED))
    single = make_proposer(method, draft, qwen3_target, num_steps=4)
    greedy, generator = SamplingParams(), torch.Generator()
    # Each row: its prompt and a 2-token answer. Round 1 commits all but the last `extra` positions, round 2 the
    # rest; the history a round reads ends with the token after the committed ones.
    sequences = [[*p, 7, 8] for p in RAGGED]
    contexts = [frozen.capture(torch.tensor([s])).target_hidden_states[0] for s in sequences]
    extra = [2, 1, 3, 1]
    cut = [len(s) - e for s, e in zip(sequences, extra, strict=True)]
    for row, context in enumerate(contexts):
        batched.extend_context(row, context[: cut[row]])
    first_histories = [s[: c + 1] for s, c in zip(sequences, cut, strict=True)]
    first = batched.propose(first_histories, [9] * 4, greedy, generator)
    for row, context in enumerate(contexts):
        batched.extend_context(row, context[cut[row] :])
    histories = [[*s, 9] for s in sequences]
    second = batched.propose(histories, [2, 9, 1, 3], greedy, generator)
    for row, context in enumerate(contexts):
        single.reset()
        single.extend_context(0, context[: cut[row]])
        expected = single.propose([first_histories[row]], [9], greedy, generator)[0].tokens
        torch.testing.assert_close(first[row].tokens, expected)
        single.extend_context(0, context[cut[row] :])
        expected = single.propose([histories[row]], [[2, 9, 1, 3][row]], greedy, generator)[0].tokens
        torch.testing.assert_close(second[row].tokens, expected)


@pytest.mark.parametrize("method", [None, "dflash", "dspark", "eagle1", "eagle3"])
def test_every_row_is_the_targets_greedy_answer(method, qwen3_target, qwen3_config):
    proposer = None
    if method:
        draft = block_draft(method, qwen3_target, qwen3_config)
        proposer = make_proposer(method, draft, qwen3_target, num_steps=3)
    engine = BatchEngine(FrozenTarget(qwen3_target, LAYER_IDS.get(method, [])), proposer)
    rows = engine.generate(RAGGED, max_new_tokens=17)
    for prompt, row in zip(RAGGED, rows, strict=True):
        assert row.tokens == reference_greedy(qwen3_target, prompt, 17)
        assert row.finish_reason == "length"
        assert sum(len(r.tokens) for r in row.rounds) == 17
    if method:  # drafts were proposed and some accepted: the rows really ran speculatively
        stats = GenerationStats([r for row in rows for r in row.rounds])
        assert max(r.num_drafted for r in stats.rounds) == (4 if method == "dspark" else 3)


def test_rows_finish_at_their_own_stops(qwen3_target, qwen3_config):
    """A stop token in one row's answer ends that row only (it leaves the batch); the others go on."""
    references = [reference_greedy(qwen3_target, p, 12) for p in RAGGED]
    stop = references[1][4]  # row 1 ends at its 5th token (or earlier, if that token came sooner)
    proposer = make_proposer("dflash", block_draft("dflash", qwen3_target, qwen3_config), qwen3_target)
    engine = BatchEngine(FrozenTarget(qwen3_target, LAYER_IDS["dflash"]), proposer)
    rows = engine.generate(RAGGED, max_new_tokens=12, stop_token_ids=[stop], max_drafts=2)
    for reference, row in zip(references, rows, strict=True):
        end = reference.index(stop) + 1 if stop in reference else 12
        assert row.tokens == reference[:end]
        assert row.finish_reason == ("eos" if stop in reference else "length")
        assert all(r.num_drafted <= 2 for r in row.rounds)
    assert rows[1].finish_reason == "eos" and len(rows[1].tokens) <= 5


def test_stop_strings_cut_each_row(qwen3_target):
    text = {i: chr(ord("a") + i % 26) for i in range(256)}
    stops = StopStrings(lambda ids: "".join(text[i] for i in ids), ["k"])
    engine = BatchEngine(FrozenTarget(qwen3_target, []))
    rows = engine.generate(RAGGED, max_new_tokens=30, stop_strings=stops)
    for prompt, row in zip(RAGGED, rows, strict=True):
        alone = [t for r in Engine(FrozenTarget(qwen3_target, [])).generate(prompt, max_new_tokens=30,
                                                                            stop_strings=stops) for t in r.tokens]  # fmt: skip
        assert row.tokens == alone


def test_sampling_rows_are_reproducible_and_valid(qwen3_target, qwen3_config):
    proposer = make_proposer("dspark", block_draft("dspark", qwen3_target, qwen3_config), qwen3_target)
    engine = BatchEngine(FrozenTarget(qwen3_target, LAYER_IDS["dspark"]), proposer)
    sampling = SamplingParams(temperature=0.8, top_k=20)
    first = [r.tokens for r in engine.generate(RAGGED, max_new_tokens=10, sampling=sampling, seed=5)]
    again = [r.tokens for r in engine.generate(RAGGED, max_new_tokens=10, sampling=sampling, seed=5)]
    assert first == again and all(len(t) == 10 for t in first)
    greedy = [reference_greedy(qwen3_target, p, 10) for p in RAGGED]
    assert first != greedy  # it really sampled


@pytest.mark.parametrize("method", ["dspark", "eagle1"])
def test_batched_sampling_follows_the_target_distribution(method, qwen3_target, qwen3_config):
    """Every row of a sampled batch (drafted, verified by rejection sampling) draws its first two tokens from the
    target's exact joint distribution (top-k 3, so 9 outcomes)."""
    sampling = SamplingParams(temperature=1.0, top_k=3)
    prompt = PROMPTS[0]
    joint = first_two_tokens_joint(qwen3_target, prompt, sampling)
    outcomes = sorted(joint)
    proposer = make_proposer(method, block_draft(method, qwen3_target, qwen3_config), qwen3_target, num_steps=3)
    engine = BatchEngine(FrozenTarget(qwen3_target, LAYER_IDS[method]), proposer)
    counts = torch.zeros(len(outcomes))
    for seed in range(150):
        for row in engine.generate([prompt] * 6, max_new_tokens=3, sampling=sampling, seed=seed):
            counts[outcomes.index(tuple(row.tokens[:2]))] += 1  # the second comes from a round that drafted one
            assert row.rounds[1].num_drafted == 1
    assert chi_square(counts, torch.tensor([joint[o] for o in outcomes])) < CHI2_CRIT_001[8]


def test_unknown_methods_are_refused(qwen3_target, qwen3_config):
    draft = build_draft("eagle3", qwen3_config, target_layer_ids=LAYER_IDS["eagle3"])
    with pytest.raises(UsageError, match="unknown method .medusa."):
        make_proposer("medusa", draft, qwen3_target)
