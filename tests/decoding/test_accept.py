"""Acceptance rules: greedy against hand cases, sampling against the exact target distribution (chi-square)."""

import itertools

import pytest
import torch

from spectool.decoding.accept import (
    SamplingParams,
    accept_greedy,
    accept_sampling,
    probabilities,
    sample,
    walk_tree,
)
from spectool.errors import UsageError

# Critical values of the chi-square distribution at p = 0.001 (tables): a correct sampler fails 1 run in 1000,
# and the seeds are fixed, so the tests are deterministic.
CHI2_CRIT_001 = {3: 16.27, 8: 26.12, 26: 54.05}


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token the target gives probability 0 was emitted"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def one_hot_logits(ids, vocab=6):
    logits = torch.full((len(ids), vocab), -5.0)
    logits[torch.arange(len(ids)), torch.tensor(ids)] = 5.0
    return logits


@pytest.mark.parametrize(
    ("draft", "target", "expected"),
    [
        ([1, 2, 3], [1, 2, 3, 4], (3, 4)),  # full accept + bonus
        ([1, 2, 3], [1, 5, 3, 4], (1, 5)),  # mismatch at 1: correction 5; the later match does not count
        ([1, 2, 3], [0, 2, 3, 4], (0, 0)),  # nothing accepted: the target's own token
        ([], [4], (0, 4)),  # no drafts = plain decoding
    ],
)
def test_accept_greedy(draft, target, expected):
    verdict = accept_greedy(torch.tensor(draft, dtype=torch.long), one_hot_logits(target))
    assert (verdict.num_accepted, verdict.next_token) == expected
    assert verdict.emitted == expected[0] + 1


def test_probabilities_by_hand():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.allclose(probabilities(logits, SamplingParams(temperature=1.0)), torch.tensor([0.5, 0.3, 0.15, 0.05]))
    top2 = probabilities(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.allclose(top2, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    # top_p 0.8: 0.5 + 0.3 reaches 0.8, so the nucleus is the first two tokens.
    nucleus = probabilities(logits, SamplingParams(temperature=1.0, top_p=0.8))
    assert torch.allclose(nucleus, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    nucleus = probabilities(logits, SamplingParams(temperature=1.0, top_p=0.81))
    assert torch.allclose(nucleus, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)
    # T = 2 squares the root: p^(1/2) normalised.
    hot = probabilities(logits, SamplingParams(temperature=2.0))
    root = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
    assert torch.allclose(hot, root / root.sum())
    assert torch.equal(probabilities(logits, SamplingParams()), torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_sampling_params_validation():
    bad_values = (
        {"temperature": -1},
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"temperature": 1e-5},  # logits / T would overflow: 0 is greedy
        {"top_p": 0},
        {"top_p": 1.5},
        {"top_p": float("nan")},
        {"top_k": -2},
    )
    for bad in bad_values:
        with pytest.raises(ValueError):  # and a UsageError, so the command line exits 2
            SamplingParams(**bad)
    with pytest.raises(UsageError, match="--temperature"):
        SamplingParams(temperature=-1)
    assert SamplingParams(temperature=1e-3).temperature == 1e-3


def test_identical_draft_is_always_accepted():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(4, 7, generator=g), -1)
    for _ in range(50):
        drafts = sample(p[:3], g)
        assert accept_sampling(drafts, p[:3], p, g).num_accepted == 3


def test_zero_probability_token_is_never_emitted():
    g = torch.Generator().manual_seed(1)
    p = torch.tensor([[0.0, 0.5, 0.5], [0.2, 0.3, 0.5]])
    q = torch.tensor([[1.0, 0.0, 0.0]])
    for _ in range(200):
        verdict = accept_sampling(torch.tensor([0]), q, p, g)
        assert verdict.num_accepted == 0 and verdict.next_token in (1, 2)


@pytest.mark.parametrize(
    ("u", "p_x", "accepted"),
    [
        (0.0, 0.0, 0),  # u = 0 and p(x) = 0: rejected (`<=` would accept it)
        (0.0, 1e-6, 1),  # u = 0 and p(x) > 0: accepted
        (0.5, 0.5, 0),  # u * q(x) == p(x): rejected, so P(accept) = P(u < p/q) = p/q exactly
    ],
)
def test_acceptance_is_strict(monkeypatch, u, p_x, accepted):
    """A draft token x is accepted when u * q(x) < p(x), strictly. The uniform draw is forced to ``u``; q(x) = 1."""
    rand = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: torch.full_like(rand(*args, **kwargs), u))
    p = torch.tensor([[p_x, 0.5, 0.5 - p_x], [0.2, 0.3, 0.5]])
    q = torch.tensor([[1.0, 0.0, 0.0]])
    verdict = accept_sampling(torch.tensor([0]), q, p, torch.Generator().manual_seed(0))
    assert verdict.num_accepted == accepted
    if not accepted:
        assert verdict.next_token in (1, 2)  # the correction comes from normalize(max(p - q, 0))


def test_first_token_follows_the_target_distribution():
    """One position: emitted token ~ p whatever q is (and the accept rate is sum_v min(p, q))."""
    g = torch.Generator().manual_seed(2)
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    counts = torch.zeros(4)
    accepted = 0
    trials = 6000
    for _ in range(trials):
        drafted = sample(q, g)
        verdict = accept_sampling(drafted, q, p, g)
        first = int(drafted[0]) if verdict.num_accepted == 1 else verdict.next_token
        counts[first] += 1
        accepted += verdict.num_accepted
    assert chi_square(counts, p[0]) < CHI2_CRIT_001[3]
    expected_rate = float(torch.minimum(p[0], q[0]).sum())  # 0.1 + 0.2 + 0.2 + 0.1 = 0.6
    assert abs(accepted / trials - expected_rate) < 0.03


def test_markov_chain_output_matches_target_joint_distribution():
    """A toy target and a different draft, both first-order Markov over 3 tokens. Full speculative rounds of
    K = 2 drafts; the joint of the first three emitted tokens must equal the target's own chain."""
    vocab = 3
    target = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.3, 0.5, 0.2]])
    draft = torch.tensor([[0.3, 0.3, 0.4], [0.5, 0.25, 0.25], [0.1, 0.1, 0.8]])
    start = 0
    g = torch.Generator().manual_seed(3)
    counts = torch.zeros(vocab**3)
    for _ in range(3000):
        out: list[int] = []
        last = start
        while len(out) < 3:
            drafts, prev = [], last
            for _ in range(2):
                token = int(sample(draft[prev], g))
                drafts.append(token)
                prev = token
            contexts = [last, *drafts]  # the target's distribution at position i depends on the token before it
            verdict = accept_sampling(torch.tensor(drafts), draft[contexts[:2]], target[contexts], g)
            out += drafts[: verdict.num_accepted] + [verdict.next_token]
            last = out[-1]
        a, b, c = out[:3]
        counts[a * 9 + b * 3 + c] += 1
    exact = torch.tensor(
        [float(target[start, a] * target[a, b] * target[b, c]) for a, b, c in itertools.product(range(vocab), repeat=3)]
    )
    assert chi_square(counts, exact) < CHI2_CRIT_001[26]


def test_tree_walk_output_matches_target_joint_distribution():
    """A toy first-order Markov target over 3 tokens and a fixed draft tree (root children 0 and 2; 0's child 1;
    2's children 0 and 2): rounds of `walk_tree` with sampled choices; the joint of the first three emitted
    tokens must equal the target's own chain, whatever the tree holds."""
    vocab = 3
    target = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.3, 0.5, 0.2]])
    parents = [-1, 0, 0, 1, 2, 2]  # row -> parent row; row 0 is the last committed token
    shape = [None, 0, 2, 1, 0, 2]  # token of each tree row (row 0: filled per round)
    children: dict[int, list[int]] = {}
    for row, parent in enumerate(parents[1:], start=1):
        children.setdefault(parent, []).append(row)
    g = torch.Generator().manual_seed(5)
    counts = torch.zeros(vocab**3)
    accepted = 0
    for _ in range(4000):
        out: list[int] = []
        last = 1
        while len(out) < 3:
            tokens = [last, *shape[1:]]
            path, token = walk_tree(children, tokens, lambda row, tokens=tokens: int(sample(target[tokens[row]], g)))
            accepted += len(path)
            out += [tokens[r] for r in path] + [token]
            last = out[-1]
        a, b, c = out[:3]
        counts[a * 9 + b * 3 + c] += 1
    exact = torch.tensor(
        [float(target[1, a] * target[a, b] * target[b, c]) for a, b, c in itertools.product(range(vocab), repeat=3)]
    )
    assert accepted > 2000  # the tree really was walked into
    assert chi_square(counts, exact) < CHI2_CRIT_001[26]


def test_tree_walk_greedy_takes_the_matching_branch():
    children = {0: [1, 2], 2: [3]}
    best = {0: 7, 2: 8, 3: 4}  # the target's argmax after each row
    assert walk_tree(children, [5, 6, 7, 8], best.__getitem__) == ([2, 3], 4)
    assert walk_tree(children, [5, 6, 9, 8], best.__getitem__) == ([], 7)
