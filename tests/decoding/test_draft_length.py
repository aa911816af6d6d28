"""`--verify auto` for every method: the draft-length rule against hand-computed throughputs, plain target steps
(k = 0) and probing, a flat verify cost that makes a good draft draft full blocks, and losslessness in the loop."""

import itertools

import pytest
import torch

from spectool.decoding.accept import SamplingParams, probabilities
from spectool.decoding.draft_length import DraftLengthController, VerifyCostProfile, _RunningMean
from spectool.decoding.engine import Engine
from spectool.decoding.proposers import Proposal, make_proposer
from spectool.drafts import build_draft
from spectool.target import FrozenTarget
from tests.decoding.test_accept import CHI2_CRIT_001, chi_square
from tests.decoding.test_engine import PROMPTS, ScriptedProposer, oracle, reference_greedy, run

FLAT = VerifyCostProfile(seconds=(1.0,) * 8, context_length=64)  # a GPU with a large target: V(n) ~ V(1)
CPU = VerifyCostProfile(seconds=(1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75), context_length=64)  # V(n) grows


def settled(value):
    """A running estimate holding ``value`` after many observations (no prior left in it)."""
    mean = _RunningMean(0.05, prior=value)
    mean.count = 1000
    return mean


def controller_with(profile, rates, draft_seconds, *, per_token=False):
    """A controller whose running estimates hold exactly ``rates`` and ``draft_seconds``."""
    controller = DraftLengthController(profile, per_token_drafting=per_token)
    controller.draft_seconds = settled(draft_seconds)
    controller.rates = [settled(rate) for rate in rates]
    return controller


def test_rarely_reached_positions_lean_on_the_one_before():
    """Position 0 seen 1000 times at 0.3, position 1 seen twice (both accepted): its estimate is pulled towards
    0.3 ((2 x 1 + 2 x 0.3) / 4 = 0.65), and position 2, never reached, takes position 1's."""
    c = DraftLengthController(FLAT, per_token_drafting=False)
    c.rates = [settled(0.3), _RunningMean(0.05)]
    c.rates[1].add(1.0)
    c.rates[1].add(1.0)
    assert c.acceptance_rates(3) == rounded([0.3, 0.65, 0.65])
    assert DraftLengthController(FLAT, per_token_drafting=False).acceptance_rates(2) == [0.5, 0.5]


def rounded(values):
    return [pytest.approx(v, abs=1e-4) for v in values]


def test_expected_throughput_by_hand_flat_cost_drafts_the_whole_block():
    c = controller_with(FLAT, [0.8, 0.5, 0.5], 0.1)
    # E(0)=1 -> 1/1 = 1; E(1)=1.8 -> 1.8/1.1 = 1.636; E(2)=2.2 -> 2.0; E(3)=2.4 -> 2.1818
    assert [c.tokens_per_second(k) for k in range(4)] == rounded([1.0, 1.6364, 2.0, 2.1818])
    assert c.best(3) == 3


def test_expected_throughput_by_hand_steep_cost_takes_a_plain_step():
    c = controller_with(CPU, [0.5, 0.3, 0.2], 0.9)
    # k=1: 1.5/(0.9+1.25)=0.6977; k=2: 1.65/(0.9+1.5)=0.6875; k=3: 1.68/(0.9+1.75)=0.6340; k=0: 1/1 = 1
    assert [c.tokens_per_second(k) for k in range(4)] == rounded([1.0, 0.6977, 0.6875, 0.634])
    assert c.best(3) == 0


def test_expected_throughput_by_hand_middle_length_wins():
    c = controller_with(CPU, [0.9, 0.5, 0.1], 0.2)
    # k=1: 1.9/1.45=1.3103; k=2: 2.35/1.7=1.3824; k=3: 2.395/1.95=1.2282
    assert [c.tokens_per_second(k) for k in range(1, 4)] == rounded([1.3103, 1.3824, 1.2282])
    assert c.best(3) == 2


def test_drafting_must_beat_a_plain_step_by_the_margin():
    """1.03x a plain step is within the noise of the estimates: a plain step; 1.10x is drafting."""
    c = controller_with(FLAT, [0.13], 0.1)  # 1.13 / 1.1 = 1.027 tokens/s against 1
    assert c.tokens_per_second(1) == pytest.approx(1.0273, abs=1e-4) and c.best(1) == 0
    c = controller_with(FLAT, [0.21], 0.1)  # 1.21 / 1.1 = 1.1
    assert c.best(1) == 1


def test_a_chain_pays_per_drafted_token():
    c = controller_with(FLAT, [0.9, 0.9, 0.2], 0.3, per_token=True)
    # k=1: 1.9/1.3=1.4615; k=2: 2.71/1.6=1.6938; k=3: 2.872/1.9=1.5116
    assert [c.tokens_per_second(k) for k in range(1, 4)] == rounded([1.4615, 1.6938, 1.5116])
    assert c.best(3) == 2


def test_tree_is_all_or_nothing():
    c = DraftLengthController(FLAT, per_token_drafting=False, tree=True)
    assert c.choose(5, tree_size=16) == 5  # nothing measured yet: draft once
    c.observe(5, 3, 0.5, tree_size=16)  # 4 tokens per tree round, 0.5 s of drafting: 4 / 1.5 > 1
    assert c.choose(5, tree_size=16) == 5
    slow = DraftLengthController(CPU, per_token_drafting=False, tree=True)
    slow.choose(5, tree_size=7)
    slow.observe(5, 0, 0.5, tree_size=7)  # 1 token per round for 0.5 + V(8) = 3.25 s: a plain step wins
    assert slow.choose(5, tree_size=7) == 0


def test_plain_steps_then_probes_with_a_doubling_interval():
    c = DraftLengthController(CPU, per_token_drafting=False, probe_every=4, max_probe_every=16)
    choices = []
    for _ in range(60):
        k = c.choose(4)
        choices.append(k)
        c.observe(k, 0, 0.9)  # a draft that never lands
    probes = [i for i, k in enumerate(choices) if k]
    assert probes[0] == 0 and all(choices[i] == 4 for i in probes)
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    # The first round measures (it is no probe); then a probe after 4 plain rounds, which does not pay: the next
    # one after 8, then every 16th (the cap).
    assert gaps[:4] == [4, 8, 16, 16] and set(gaps) == {4, 8, 16}


def test_a_chain_probes_one_token_at_a_steady_interval():
    """A chain whose first position rarely pays probes with one drafted token (a fraction of a step), every
    `probe_every` rounds without doubling: its first-position rate keeps being measured (a full-chain probe
    with a doubling interval left it at a handful of noisy observations)."""
    c = controller_with(CPU, [0.1], 0.05, per_token=True)
    choices = []
    for _ in range(70):
        k = c.choose(4)
        choices.append(k)
        if k:
            c.observe(k, 0, 0.05)
    probes = [i for i, k in enumerate(choices) if k]
    assert len(probes) == 4 and all(choices[i] == 1 for i in probes)
    assert [b - a for a, b in itertools.pairwise(probes)] == [16] * 3 and c.probe_every == 16


def test_a_probe_that_pays_brings_drafting_back():
    c = DraftLengthController(FLAT, per_token_drafting=False, probe_every=2)
    c.choose(4)
    c.observe(4, 0, 5.0)  # a very slow, useless draft: plain steps until the next probe
    plain = 0
    while (k := c.choose(4)) == 0:
        plain += 1
        c.observe(0, 0, 0.0)
    assert k == 4 and plain == 1 and c.probe_every == 2  # the measuring round is no probe: nothing doubled
    for _ in range(40):  # from the probe on, the draft is fast and always right (e.g. a repetitive answer)
        c.observe(k, k, 0.01)
        k = c.choose(4)
    assert k == 4 and c.plain_rounds == 0 and c.probe_every == 2


def test_a_new_answer_restarts_from_the_rate_over_every_round():
    """One good answer (first slot accepted every other round), then a hard one (never accepted): the chain goes
    to plain steps and probes. The next answer starts from the rate over both (not from the hard answer's), so it
    drafts again (on today's HumanEval run the running rate carried one answer's 0.12 into the next)."""
    flat_two = VerifyCostProfile(seconds=(1.0, 1.0, 1.5, 2.0), context_length=64)  # V(2) = V(1): memory-bound
    c = DraftLengthController(flat_two, per_token_drafting=True)
    c.draft_seconds = settled(0.1)
    reached = accepted = 0
    for i in range(100):
        c.observe(1, i % 2, 0.1)
        reached, accepted = reached + 1, accepted + i % 2
    assert c.choose(3) >= 1
    c.new_answer()
    drafting_rounds = 0
    for _ in range(200):
        if c.choose(1):
            c.observe(1, 0, 0.1)
            reached, drafting_rounds = reached + 1, drafting_rounds + 1
    assert c.choose(1) == 0 and drafting_rounds < 60  # plain steps, probing now and then
    c.new_answer()
    assert c.rates[0].value == pytest.approx(accepted / reached)  # 50 / (100 + the hard answer's drafts)
    assert c.choose(1) == 1  # 1.3 tokens for 1.1 steps against 1.05


def test_a_new_answer_restarts_a_tree_from_its_mean_tokens():
    c = DraftLengthController(FLAT, per_token_drafting=True, tree=True)
    c.draft_seconds = settled(0.2)
    for accepted in [3] * 40 + [0] * 60:
        c.observe(4, accepted, 0.2, 8)
    assert c.choose(4, 8) == 0  # the running mean follows the last rounds: ~1.14 tokens for 1.2 steps
    c.new_answer()
    assert c.tree_tokens.value == pytest.approx(2.2) and c.choose(4, 8) == 4  # (40 x 4 + 60 x 1) / 100 for 1.2


def test_the_engine_starts_every_answer_with_new_answer(qwen3_target):
    calls = []

    class Counting(DraftLengthController):
        def new_answer(self):
            calls.append(1)
            super().new_answer()

    for prompt in PROMPTS[:2]:
        proposer = ScriptedProposer(prompt, lambda done, limit: Proposal(torch.tensor([1] * limit)), 2)
        engine = Engine(FrozenTarget(qwen3_target, []), proposer, controller=Counting(FLAT, per_token_drafting=False))
        list(engine.generate(prompt, max_new_tokens=4))
        list(engine.generate(prompt, max_new_tokens=4))
    assert len(calls) == 4


def test_live_verify_times_rescale_the_profile():
    """Profiled at 1 s per verify, the rounds now take 0.1 s (a quieter machine, a warmer cache): the draft's 0.3 s
    per block now outweighs what 80% first-slot acceptance returns."""
    c = controller_with(FLAT, [0.8, 0.5, 0.5], 0.3)
    assert c.best(3) == 3  # 2.4 / 1.3 = 1.85 tokens/s against 1
    for _ in range(200):
        c.observe_verify(2, 0.1)
    assert c.verify_seconds(4) == pytest.approx(0.1, rel=1e-3)
    # k=0: 1/0.1 = 10; k=3: 2.4 / (0.3 + 0.1) = 6
    assert c.best(3) == 0


# ------------------------------------------------------------------------------------------------------------
# In the engine
# ------------------------------------------------------------------------------------------------------------


def test_flat_verify_cost_and_a_good_draft_draft_full_blocks(qwen3_target):
    """The injected flat curve (a GPU with a large target) and a scripted draft that is always right: every round
    after the first drafts all it may."""
    prompt = PROMPTS[0]
    truth = reference_greedy(qwen3_target, prompt, 40)
    controller = DraftLengthController(FLAT, per_token_drafting=False)
    engine = Engine(FrozenTarget(qwen3_target, []), oracle(prompt, truth, 4), controller=controller)
    tokens, stats = run(engine, prompt, max_new_tokens=36)
    assert tokens == truth[:36]
    assert [r.num_drafted for r in stats.verify_rounds] == [4] * 7  # 1 + 7 x 5 = 36 tokens


def test_steep_cost_and_a_useless_draft_take_plain_steps(qwen3_target):
    prompt = PROMPTS[0]
    truth = reference_greedy(qwen3_target, prompt, 60)
    wrong = ScriptedProposer(prompt, lambda done, limit: Proposal(torch.tensor([(truth[done] + 1) % 256] * limit)), 4)
    steep = VerifyCostProfile(seconds=(0.001, 0.004, 0.006, 0.008, 0.010), context_length=64)
    controller = DraftLengthController(steep, per_token_drafting=False, probe_every=8)
    engine = Engine(FrozenTarget(qwen3_target, []), wrong, controller=controller)
    tokens, stats = run(engine, prompt, max_new_tokens=60)
    assert tokens == truth[:60]
    drafted = [r.num_drafted for r in stats.verify_rounds]
    assert drafted[0] == 4 and drafted.count(0) >= 45  # a measuring round, then mostly plain target steps
    assert all(r.num_accepted == 0 for r in stats.verify_rounds)


METHODS = {"eagle1": [3], "eagle3": [0, 1, 2], "dflash": [1, 2], "dspark": [0, 2, 3]}


def auto_engine(method, target, config, profile, tree=None):
    torch.manual_seed(1)
    options = {"block_size": 4, "mask_token_id": 255} if method in ("dflash", "dspark") else {}
    draft = build_draft(method, config, target_layer_ids=METHODS[method], **options).eval()
    if method == "dspark":
        draft.copy_target_weights(target)
    if method == "eagle1":
        draft.copy_target_embeddings(target)
    proposer = make_proposer(method, draft, target, num_steps=3, tree=tree)
    controller = DraftLengthController(
        profile, per_token_drafting=proposer.per_token_drafting, tree=proposer.tree_size is not None, probe_every=3
    )
    return Engine(FrozenTarget(target, METHODS[method]), proposer, controller=controller)


@pytest.mark.parametrize(("method", "tree"), [(m, None) for m in METHODS] + [("eagle3", (2, 3, 6))])
@pytest.mark.parametrize("profile", [FLAT, CPU], ids=["flat", "steep"])
def test_auto_is_lossless_greedy_for_every_method(method, tree, profile, qwen3_target, qwen3_config):
    engine = auto_engine(method, qwen3_target, qwen3_config, profile, tree)
    seen = set()
    for prompt in PROMPTS:
        tokens, stats = run(engine, prompt, max_new_tokens=24)
        assert tokens == reference_greedy(qwen3_target, prompt, 24)
        seen |= {r.num_drafted > 0 for r in stats.verify_rounds}
    if profile is CPU:
        assert seen == {True, False}  # random drafts on a steep curve: plain steps and probes both happen


def first_two_tokens_joint(target, prompt, sampling):
    """{(a, b): probability} of the target alone sampling a then b after `prompt` (top-k keeps it small)."""
    with torch.no_grad():
        first = probabilities(target(torch.tensor([prompt])).logits[0, -1], sampling)
        joint = {}
        for a in first.nonzero().flatten().tolist():
            second = probabilities(target(torch.tensor([prompt + [a]])).logits[0, -1], sampling)
            for b in second.nonzero().flatten().tolist():
                joint[(a, b)] = float(first[a] * second[b])
    return joint


def test_auto_sampling_follows_the_target_distribution(qwen3_target, qwen3_config):
    """The first two sampled tokens over many runs with `auto` in the loop (plain steps and probes mixed) follow
    the target's exact joint distribution (top-k 3, so 9 outcomes)."""
    sampling = SamplingParams(temperature=1.0, top_k=3)
    prompt = PROMPTS[0]
    joint = first_two_tokens_joint(qwen3_target, prompt, sampling)
    outcomes = sorted(joint)
    engine = auto_engine("dflash", qwen3_target, qwen3_config, VerifyCostProfile((1.0, 1.0, 1.0, 1.1), 64))
    counts = torch.zeros(len(outcomes))
    drafted = set()
    for seed in range(900):
        tokens, stats = run(engine, prompt, max_new_tokens=3, sampling=sampling, seed=seed)
        counts[outcomes.index(tuple(tokens[:2]))] += 1  # the second comes from a round that may draft
        drafted |= {r.num_drafted for r in stats.verify_rounds}
    assert 0 in drafted and max(drafted) >= 1
    assert chi_square(counts, torch.tensor([joint[o] for o in outcomes])) < CHI2_CRIT_001[8]


def test_a_block_cut_to_nothing_counts_its_cost_and_a_miss():
    """A DSpark round whose confidence cut admitted no slot still ran the draft: its time is the draft's cost and
    the round is a miss at the first position, so a draft that never passes the cut stops being run every round
    (it used to leave no trace, and the controller asked for it again and again)."""
    c = DraftLengthController(CPU, per_token_drafting=False)
    assert c.choose(7) == 7  # nothing measured yet: draft fully once
    c.observe(0, 0, 0.5, 0, ran=True, catch_up=1)
    assert c.draft_seconds.value == 0.5 and c.rates[0].value == 0.0
    assert [c.choose(7) for _ in range(15)] == [0] * 15


def test_rounds_that_catch_up_after_plain_steps_do_not_count_as_drafting_cost():
    """A round after plain steps (or the prompt) first reads every committed position the draft missed; that
    time is not the cost of drafting k tokens, which a steady round (catching up at most k + 1) measures."""
    c = DraftLengthController(CPU, per_token_drafting=True)
    c.observe(4, 1, 8.0, catch_up=60)  # the prompt, unwarmed
    assert c.draft_seconds.value is None and c.rates[0].value == 1.0
    c.observe(4, 1, 0.4, catch_up=2)
    assert c.draft_seconds.value == pytest.approx(0.1)
    c.observe(4, 4, 4.0, catch_up=12)  # after 11 plain steps
    assert c.draft_seconds.value == pytest.approx(0.1)
    c.observe(4, 0, 0.8, catch_up=5)  # a steady round after 4 accepted
    assert c.draft_seconds.value == pytest.approx(0.15)


def test_positions_beyond_the_chosen_length_are_explored_now_and_then():
    """Estimates of positions past the chosen k are never updated by rounds that stop at k; one round in every
    `probe_every` paying rounds drafts one more so a stale pessimistic estimate can recover."""
    c = controller_with(CPU, [0.9, 0.02], 0.01)
    choices = [c.choose(4) for _ in range(48)]
    assert set(choices) == {1, 2} and choices.count(2) == 3  # rounds 16, 32, 48
    c.rates[1] = settled(0.95)  # what such explorations would reveal
    assert c.choose(4) > 2


def test_the_prefix_scheduler_follows_the_live_verify_cost():
    """DSpark's prefix cut and the draft length are chosen against the same V(n): the controller's, rescaled by
    live verify forwards (the scheduler used to keep the raw start-up profile)."""
    from spectool.decoding.draft_length import PrefixScheduler

    scheduler = PrefixScheduler(CPU)
    controller = DraftLengthController(CPU, per_token_drafting=False)
    scheduler.follow(controller)
    for _ in range(200):
        controller.observe_verify(1, 3.0)  # the machine got three times slower since start-up
    assert scheduler.round_seconds(1) == pytest.approx(3.0, rel=1e-3)
    assert scheduler.round_seconds(5) == pytest.approx(3.0 * 2.0, rel=1e-3)


def test_an_observation_after_a_gap_weighs_the_rounds_it_stands_for():
    """A running rate that saw nothing for 16 rounds moves as if each of them had moved it by the decay."""
    mean = settled(0.2)
    mean.add(1.0)
    assert mean.value == pytest.approx(0.2 + 0.05 * 0.8)
    mean = settled(0.2)
    mean.add(1.0, elapsed=16)
    assert mean.value == pytest.approx(0.2 + (1 - 0.95**16) * 0.8)


def test_a_probe_after_plain_rounds_counts_for_the_rounds_it_waited():
    """A chain fell into plain steps on a low first-position estimate (0.2, needs 0.37 to pay here): one accepted
    probe 16 rounds later stands for those rounds and brings drafting back (it moved the estimate by 5% before,
    so a draft whose estimate dipped under the bar stayed plain for hundreds of rounds)."""
    c = controller_with(FLAT, [0.2], 0.3, per_token=True)
    choices = []
    while not (choices and choices[-1]):
        choices.append(c.choose(4))
    assert len(choices) == 16 and choices[-1] == 1 and c.probing
    c.observe(1, 1, 0.3)
    assert c.rates[0].value == pytest.approx(0.2 + (1 - 0.95**16) * 0.8, abs=1e-6)
    assert c.choose(4) >= 1


def test_a_chain_costs_its_first_token_apart_from_the_further_ones():
    """A chain's first token carries the feed over the committed positions (0.3 here), each further token one
    step (0.02): two tokens pay where the average cost per token (0.3) said one."""
    c = controller_with(FLAT, [0.4, 0.4], 0.3, per_token=True)
    assert c.best(2) == 1  # E(2) = 1.56 / (1 + 0.6) < E(1) = 1.4 / 1.3
    c.first_seconds, c.next_seconds = settled(0.3), settled(0.02)
    assert c.draft_cost(3) == pytest.approx(0.34)
    assert c.best(2) == 2  # 1.56 / 1.32 = 1.18 > 1.4 / 1.3 = 1.08
    fresh = DraftLengthController(FLAT, per_token_drafting=True)
    fresh.observe(3, 0, 0.5, first_seconds=0.3)
    assert fresh.first_seconds.value == pytest.approx(0.3) and fresh.next_seconds.value == pytest.approx(0.1)
    fresh.observe(1, 0, 0.4, first_seconds=0.4)  # one token: no further step to measure
    assert fresh.next_seconds.count == 1 and fresh.draft_cost(2) == pytest.approx(0.35 + 0.1)


def test_a_new_answer_starts_its_estimates_as_of_now():
    """`new_answer` restarts each rate from its overall mean, an estimate as of that moment: the answer's first
    observation moves it by the decay, whatever gap the answer before ended with."""
    c = controller_with(FLAT, [0.2], 0.3, per_token=True)
    for _ in range(40):
        c.choose(4)  # plain rounds (and probes, left unobserved): a long gap for position 0
    c.new_answer()
    c.choose(4)
    before = c.rates[0].value
    c.observe(1, 1, 0.3)
    assert c.rates[0].value == pytest.approx(before + 0.05 * (1 - before))
