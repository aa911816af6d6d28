"""`DraftVocabHead`: the kept rows of a full-vocabulary head, drawn from in the kept ids."""

import torch
from torch import nn

from spectool.decoding.accept import SamplingParams
from spectool.decoding.vocab_head import DraftVocabHead


def make_head(vocab=50, hidden=8):
    torch.manual_seed(0)
    full = nn.Linear(hidden, vocab, bias=False)
    kept = torch.tensor([1, 4, 7, 20, 33, 49])
    return full, kept, DraftVocabHead(kept, vocab, lm_head=full.weight)


def test_kept_logits_equal_the_full_heads_at_the_kept_ids():
    full, kept, head = make_head()
    x = torch.randn(3, 8)
    assert torch.allclose(head.lm_head(x), full(x)[:, kept])
    scattered = head.scatter(head.lm_head(x))
    assert scattered.shape == (3, 50) and torch.allclose(scattered[:, kept], full(x)[:, kept])
    outside = torch.ones(50, dtype=torch.bool)
    outside[kept] = False
    assert bool(torch.isneginf(scattered[:, outside]).all())
    full.weight.data.zero_()  # a copy: later changes of the full head do not reach it
    assert not torch.allclose(head.lm_head(x), full(x)[:, kept])


def test_greedy_draws_the_best_kept_id():
    full, kept, head = make_head()
    x = torch.randn(5, 8)
    tokens, probs = head.draw(head.lm_head(x), SamplingParams(), torch.Generator())
    logits = full(x).detach()
    masked = torch.full_like(logits, float("-inf"))
    masked[:, kept] = logits[:, kept]
    assert probs is None and torch.equal(tokens, masked.argmax(-1))


def test_a_sample_comes_with_its_whole_vocabulary_distribution():
    _, kept, head = make_head()
    x = torch.randn(4, 8)
    tokens, probs = head.draw(
        head.lm_head(x), SamplingParams(temperature=0.7, top_k=3), torch.Generator().manual_seed(1)
    )
    assert probs.shape == (4, 50) and torch.allclose(probs.sum(-1), torch.ones(4))
    assert bool((probs[:, [i for i in range(50) if i not in kept.tolist()]] == 0).all())
    assert bool(((probs > 0).sum(-1) == 3).all())  # top-k within the kept ids
    assert all(probs[row, token] > 0 for row, token in enumerate(tokens.tolist()))
