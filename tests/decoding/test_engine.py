"""The engine: greedy output equals the target's own greedy decoding for every method, even with random
drafts (low acceptance); stop handling; KV crop; sampling stays lossless."""

import pytest
import torch
from transformers import Qwen3ForCausalLM

from spectool.decoding.accept import SamplingParams
from spectool.decoding.engine import Engine, GenerationStats, TargetSession, cache_keyword, tree_visibility
from spectool.decoding.proposers import Proposal, Proposer, make_proposer
from spectool.drafts import build_draft
from spectool.target import FrozenTarget

METHODS = ("eagle1", "eagle3", "dflash", "dspark")
LAYER_IDS = {"eagle1": [3], "eagle3": [0, 1, 2], "dflash": [1, 2], "dspark": [0, 2, 3]}


def make_engine(method, target, config, **draft_options):
    torch.manual_seed(1)
    options = {"block_size": 4, "mask_token_id": 255} if method in ("dflash", "dspark") else {}
    options.update(draft_options)
    draft = build_draft(method, config, target_layer_ids=LAYER_IDS[method], **options).eval()
    if method == "dspark":
        draft.copy_target_weights(target)
    if method == "eagle1":
        draft.copy_target_embeddings(target)
    proposer = make_proposer(method, draft, target, num_steps=3)
    return Engine(FrozenTarget(target, LAYER_IDS[method]), proposer)


def reference_greedy(target, prompt, n):
    out = target.generate(
        torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n, pad_token_id=0, eos_token_id=None
    )
    return out[0, len(prompt) :].tolist()


def run(engine, prompt, **kwargs):
    rounds = list(engine.generate(prompt, **kwargs))
    return [t for r in rounds for t in r.tokens], GenerationStats(rounds)


PROMPTS = [[5, 17, 42, 9, 100, 3], [7], [200, 201, 202, 203, 204, 205, 206, 207, 208, 209, 210, 211]]


class ScriptedProposer(Proposer):
    """A proposer whose drafts come from ``script(answer_so_far, limit) -> Proposal`` (no model, no context)."""

    def __init__(self, prompt, script, max_drafts):
        self.prompt, self.script, self.max_drafts = prompt, script, max_drafts

    def reset(self, rows=1):
        pass

    def extend_context(self, row, features):
        pass

    def propose(self, histories, limits, sampling, generator):
        return [self.script(len(histories[0]) - len(self.prompt), limits[0])]


def oracle(prompt, truth, k):
    """Drafts exactly the target's next ``k`` tokens: every round accepts them all."""
    return ScriptedProposer(prompt, lambda done, limit: Proposal(torch.tensor(truth[done : done + min(limit, k)])), k)


@pytest.mark.parametrize("method", METHODS)
def test_greedy_equals_target_greedy(method, qwen3_target, qwen3_config):
    engine = make_engine(method, qwen3_target, qwen3_config)
    for prompt in PROMPTS:
        tokens, stats = run(engine, prompt, max_new_tokens=24)
        assert tokens == reference_greedy(qwen3_target, prompt, 24)
        assert len(tokens) == 24 and stats.acceptance_length >= 1.0


def test_target_alone_equals_hf_generate(qwen3_target):
    engine = Engine(FrozenTarget(qwen3_target, []))
    tokens, stats = run(engine, PROMPTS[0], max_new_tokens=20)
    assert tokens == reference_greedy(qwen3_target, PROMPTS[0], 20)
    assert stats.acceptance_length == 1.0


def test_a_perfect_draft_is_fully_accepted(qwen3_target, qwen3_config):
    """A 'draft' that proposes exactly the target's continuation: every round accepts all and adds a bonus."""
    prompt = PROMPTS[0]
    truth = reference_greedy(qwen3_target, prompt, 30)
    tokens, stats = run(Engine(FrozenTarget(qwen3_target, []), oracle(prompt, truth, 4)), prompt, max_new_tokens=26)
    assert tokens == truth[:26]
    assert all(r.kind == "bonus" for r in stats.verify_rounds)
    assert stats.acceptance_length == 5.0  # 4 drafts + the bonus per verify forward
    accepted, drafted = stats.accepted_per_position()
    assert accepted == drafted


def test_kv_cache_is_cropped_to_the_committed_length(qwen3_target, qwen3_config):
    engine = make_engine("dflash", qwen3_target, qwen3_config)
    prompt = PROMPTS[0]
    produced = 0
    for event in engine.generate(prompt, max_new_tokens=15):
        produced += len(event.tokens)
        if event.finish_reason is None:
            # Every committed token except the newest has been through the target exactly once.
            assert engine.session.length == len(prompt) + produced - 1


def test_stop_token_ends_the_answer(qwen3_target, qwen3_config):
    truth = reference_greedy(qwen3_target, PROMPTS[0], 20)
    stop = truth[7]
    first = truth.index(stop)
    engine = make_engine("dspark", qwen3_target, qwen3_config)
    tokens, stats = run(engine, PROMPTS[0], max_new_tokens=20, stop_token_ids=[stop])
    assert tokens == truth[: first + 1]
    assert stats.rounds[-1].finish_reason == "eos"


def test_max_new_tokens_is_exact(qwen3_target, qwen3_config):
    engine = make_engine("dflash", qwen3_target, qwen3_config)
    for n in (1, 2, 5):
        tokens, stats = run(engine, PROMPTS[1], max_new_tokens=n)
        assert len(tokens) == n and stats.rounds[-1].finish_reason == "length"


@pytest.mark.parametrize("method", METHODS)
def test_sampling_runs_and_is_seeded(method, qwen3_target, qwen3_config):
    engine = make_engine(method, qwen3_target, qwen3_config)
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50)
    a, _ = run(engine, PROMPTS[0], max_new_tokens=16, sampling=params, seed=7)
    b, _ = run(engine, PROMPTS[0], max_new_tokens=16, sampling=params, seed=7)
    assert a == b and len(a) == 16


@pytest.mark.parametrize("method", ["eagle1", "eagle3"])
@pytest.mark.parametrize("tree", [(2, 3, 5), (3, 4, 10), (1, 4, 4)])
def test_eagle2_tree_is_lossless(method, tree, qwen3_target, qwen3_config):
    torch.manual_seed(1)
    draft = build_draft(method, qwen3_config, target_layer_ids=LAYER_IDS[method]).eval()
    if method == "eagle1":
        draft.copy_target_embeddings(qwen3_target)
    engine = Engine(
        FrozenTarget(qwen3_target, LAYER_IDS[method]), make_proposer(method, draft, qwen3_target, tree=tree)
    )
    for prompt in PROMPTS:
        tokens, stats = run(engine, prompt, max_new_tokens=20)
        assert tokens == reference_greedy(qwen3_target, prompt, 20)
        assert all(r.num_drafted <= tree[1] for r in stats.rounds)
        assert engine.session.length <= len(prompt) + 20


@pytest.mark.parametrize("method", ["eagle1", "eagle3"])
def test_eagle2_tree_samples_at_temperature(method, qwen3_target, qwen3_config):
    """At temperature > 0 the tree is still drafted and verified (not the chain), seeded and reproducible."""
    draft = make_engine(method, qwen3_target, qwen3_config).proposer.draft
    engine = Engine(
        FrozenTarget(qwen3_target, LAYER_IDS[method]), make_proposer(method, draft, qwen3_target, tree=(3, 3, 6))
    )
    params = SamplingParams(temperature=0.9, top_k=40)
    a, stats = run(engine, PROMPTS[0], max_new_tokens=20, sampling=params, seed=3)
    b, _ = run(engine, PROMPTS[0], max_new_tokens=20, sampling=params, seed=3)
    assert a == b and len(a) == 20
    assert all(0 < r.num_drafted <= 3 for r in stats.verify_rounds[:-1])  # tree depth, not a 6-token chain
    assert a != reference_greedy(qwen3_target, PROMPTS[0], 20)


def test_tree_walks_the_matching_branch(qwen3_target):
    """A hand-made tree whose second branch holds the target's continuation: the walk must take it."""
    prompt = PROMPTS[0]
    truth = reference_greedy(qwen3_target, prompt, 12)

    def fork(done, limit):
        a, b, c = truth[done : done + 3] + [0] * (3 - len(truth[done : done + 3]))
        wrong = (a + 1) % 256
        # row order: wrong(root child), a(root child), b(child of a), wrong-after-a, c(child of b)
        return Proposal(
            torch.tensor([wrong, a, b, (b + 1) % 256, c][: 2 + min(limit, 3)]),
            parents=[-1, -1, 1, 1, 2][: 2 + min(limit, 3)],
        )

    tokens, stats = run(
        Engine(FrozenTarget(qwen3_target, []), ScriptedProposer(prompt, fork, 3)), prompt, max_new_tokens=10
    )
    assert tokens == truth[:10]
    assert stats.verify_rounds[0].num_accepted == 3 and stats.verify_rounds[0].kind == "bonus"


def test_tree_visibility_is_each_row_and_its_ancestors():
    """Rows: 0 the root (the last committed token), 1 and 2 its children, 3 and 4 under 1, 5 under 4."""
    visible, depth = tree_visibility([-1, 0, 0, 1, 1, 4])
    expected = [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 1, 0, 0, 1, 1],
    ]
    assert visible == [[bool(v) for v in row] for row in expected]
    assert depth == [0, 1, 1, 2, 2, 3]
    with pytest.raises(ValueError, match="before its parent"):
        tree_visibility([-1, 2, 0])


@pytest.mark.parametrize("tree", [None, (3, 3, 8)])
def test_pruned_eagle3_vocabulary_is_lossless(tree, qwen3_target, qwen3_config):
    """Draft-vocabulary logits are scattered back onto target ids (chain: [Vd]; tree: [m, Vd])."""
    torch.manual_seed(1)
    draft = build_draft("eagle3", qwen3_config, target_layer_ids=LAYER_IDS["eagle3"], draft_vocab_size=64).eval()
    draft.set_vocab_mapping(torch.arange(0, 256, 4))
    engine = Engine(
        FrozenTarget(qwen3_target, LAYER_IDS["eagle3"]), make_proposer("eagle3", draft, qwen3_target, tree=tree)
    )
    for prompt in PROMPTS[:2]:
        tokens, stats = run(engine, prompt, max_new_tokens=16)
        assert tokens == reference_greedy(qwen3_target, prompt, 16)
        assert all(t % 4 == 0 for r in stats.verify_rounds for t in r.tokens[: r.num_accepted])


@pytest.mark.parametrize(
    ("method", "tree"), [("eagle1", None), ("eagle1", (3, 3, 8)), ("dflash", None), ("dspark", None)]
)
def test_a_draft_vocabulary_drafts_only_kept_ids_and_stays_lossless(method, tree, qwen3_target, qwen3_config):
    """A decode-time draft vocabulary (draft_vocab.safetensors) for drafts that read a full-vocabulary head."""
    kept = torch.arange(0, 256, 4)
    engine = make_engine(method, qwen3_target, qwen3_config)
    proposer = make_proposer(method, engine.proposer.draft, qwen3_target, num_steps=3, tree=tree, vocab=kept)
    engine = Engine(FrozenTarget(qwen3_target, LAYER_IDS[method]), proposer)
    for prompt in PROMPTS[:2]:
        tokens, stats = run(engine, prompt, max_new_tokens=16)
        assert tokens == reference_greedy(qwen3_target, prompt, 16)
        assert all(t % 4 == 0 for r in stats.verify_rounds for t in r.tokens[: r.num_accepted])
    proposer.reset()
    proposer.extend_context(0, engine.session.forward(torch.tensor([PROMPTS[0]]))[1][0])
    drafted = proposer.propose([PROMPTS[0]], [3], SamplingParams(), torch.Generator())[0].tokens
    assert drafted.numel() > 0 and bool((drafted % 4 == 0).all())
    sampled = make_proposer(method, engine.proposer.draft, qwen3_target, num_steps=3, vocab=kept)
    engine = Engine(FrozenTarget(qwen3_target, LAYER_IDS[method]), sampled)
    tokens, _ = run(engine, PROMPTS[0], max_new_tokens=12, sampling=SamplingParams(temperature=0.8), seed=3)
    again, _ = run(engine, PROMPTS[0], max_new_tokens=12, sampling=SamplingParams(temperature=0.8), seed=3)
    assert tokens == again and len(tokens) == 12


def test_eagle3_keeps_its_own_vocabulary():
    from spectool.errors import SpectoolError

    with pytest.raises(SpectoolError, match="does not read a full-vocabulary head"):
        Proposer.use_draft_vocab(ScriptedProposer([], None, 1), torch.arange(4))


#: What this transformers release calls the cache argument of Qwen3ForCausalLM.forward (`cache` from 5.24 on).
RELEASE_KEYWORD = cache_keyword(Qwen3ForCausalLM)


class CacheNamedCache(Qwen3ForCausalLM):
    """A target whose forward takes its KV cache as `cache` (transformers 5.24 and later)."""

    def forward(self, input_ids=None, cache=None, use_cache=None, attention_mask=None, position_ids=None):
        kwargs = {RELEASE_KEYWORD: cache, "attention_mask": attention_mask, "position_ids": position_ids}
        return super().forward(input_ids=input_ids, use_cache=use_cache, **kwargs)


class CacheNamedPastKeyValues(Qwen3ForCausalLM):
    """A target whose forward takes its KV cache as `past_key_values` (transformers before 5.24)."""

    def forward(self, input_ids=None, past_key_values=None, use_cache=None, attention_mask=None, position_ids=None):
        kwargs = {RELEASE_KEYWORD: past_key_values, "attention_mask": attention_mask, "position_ids": position_ids}
        return super().forward(input_ids=input_ids, use_cache=use_cache, **kwargs)


@pytest.mark.parametrize(("cls", "keyword"), [(CacheNamedCache, "cache"), (CacheNamedPastKeyValues, "past_key_values")])
def test_transformers_session_passes_the_cache_by_the_models_name(cls, keyword, qwen3_target, qwen3_config):
    """The transformers-forward session passes its cache under the name the model takes, so it keeps the
    context whatever the transformers release (under the other name a forward runs without it)."""
    model = cls(qwen3_config).eval()
    model.load_state_dict(qwen3_target.state_dict())
    assert cache_keyword(model) == keyword
    session = TargetSession(FrozenTarget(model, []))
    logits, _ = session.forward(torch.tensor([PROMPTS[0]]))
    tokens = [int(logits[-1].argmax())]
    for _ in range(11):
        logits, _ = session.forward(torch.tensor([[tokens[-1]]]))
        tokens.append(int(logits[-1].argmax()))
    assert session.length == len(PROMPTS[0]) + 11
    assert tokens == reference_greedy(qwen3_target, PROMPTS[0], 12)
