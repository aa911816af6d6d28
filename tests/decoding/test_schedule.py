"""DSpark's prefix scheduler against hand-computed admissions, and losslessness with it in the loop."""

import pytest
import torch

from spectool.decoding.draft_length import (
    CALIBRATION_GRID,
    PrefixScheduler,
    VerifyCostProfile,
    calibrate_temperatures,
    expected_calibration_error,
    profile_verify_cost,
)
from spectool.drafts import build_draft
from spectool.target import FrozenTarget
from tests.decoding.test_engine import PROMPTS, reference_greedy, run

# Verifying n tokens costs seconds[n-1]: flat up to 3 tokens, then steeper (a typical batch-size knee).
PROFILE = VerifyCostProfile(seconds=(1.0, 1.0, 1.0, 1.5, 2.5, 4.0), context_length=64)


def logit(p):
    return torch.logit(torch.tensor(p))


def test_admits_while_expected_tokens_per_second_improves():
    scheduler = PrefixScheduler(PROFILE)
    # survival a = 0.9, 0.72, 0.432, 0.2592, ...
    conf = logit([0.9, 0.8, 0.6, 0.6, 0.6])
    # n=1: 1.0/1.0 = 1.0; +a1 -> 1.9/1.0; +a2 -> 2.62/1.0; +a3 -> 3.052/1.5 = 2.03 < 2.62: stop at 2 drafts.
    assert scheduler.prefix_length(conf) == 2


def test_drafting_time_makes_longer_prefixes_pay():
    # D = 3: n=1: 1/4 = 0.25; +a1 1.9/4; +a2 2.62/4 = 0.655; +a3 3.052/4.5 = 0.678 (admitted, unlike with D = 0);
    # +a4 3.3112/5.5 = 0.602 < 0.678: stop at 3 drafts.
    scheduler = PrefixScheduler(PROFILE, draft_seconds=3.0)
    assert scheduler.prefix_length(logit([0.9, 0.8, 0.6, 0.6, 0.6])) == 3


def test_drafting_time_is_a_running_average():
    scheduler = PrefixScheduler(PROFILE)
    assert scheduler.round_seconds(4) == 1.5  # nothing measured yet: verification alone
    scheduler.observe_draft(2.0)
    scheduler.observe_draft(1.0)
    assert scheduler.draft_seconds == pytest.approx(2.0 + PrefixScheduler.DRAFT_TIME_WEIGHT * (1.0 - 2.0))
    assert scheduler.round_seconds(4) == pytest.approx(1.5 + scheduler.draft_seconds)


def test_stops_at_the_first_non_improvement_even_if_later_would_pay():
    flat_then_cheap = VerifyCostProfile(seconds=(1.0, 2.0, 0.5, 0.5), context_length=8)
    # One draft: (1 + 0.5) / 2.0 = 0.75 < 1.0 -> stop, although 3 tokens would be cheap.
    assert PrefixScheduler(flat_then_cheap).prefix_length(logit([0.5, 0.99, 0.99])) == 0


def test_confident_drafts_use_the_whole_block_on_flat_cost():
    flat = VerifyCostProfile(seconds=(1.0,) * 8, context_length=8)
    assert PrefixScheduler(flat).prefix_length(logit([0.99] * 7)) == 7


def test_temperatures_soften_the_confidence():
    scheduler = PrefixScheduler(VerifyCostProfile((1.0,) * 4, 8), temperatures=[4.0, 4.0])  # flat cost: admit all
    values = logit([0.9, 0.8, 0.6])
    expected = torch.sigmoid(values / torch.tensor([4.0, 4.0, 1.0])).cumprod(0)  # the last position: T = 1
    admission = scheduler.admission()
    for value, survival in zip(values.tolist(), expected.tolist(), strict=True):
        assert admission.admit(value)
        assert admission.survival == pytest.approx(survival)


def test_profile_is_positive_and_leaves_the_session_empty(qwen3_target):
    from spectool.decoding.engine import target_session

    session = target_session(FrozenTarget(qwen3_target, []))
    profile = profile_verify_cost(session, 4, context_length=8, repeats=2)
    assert len(profile.seconds) == 4 and all(s > 0 for s in profile.seconds)
    assert profile.steps_per_second(99) == profile.steps_per_second(4)
    assert session.length == 0


@pytest.mark.parametrize("seconds", [(1.0, 1.0, 1.0, 1.5, 2.5, 4.0), (1.0, 1.01, 1.02, 1.03, 1.04, 1.05)])
def test_engine_with_scheduler_is_lossless(qwen3_target, qwen3_config, seconds):
    from spectool.decoding.engine import Engine
    from spectool.decoding.proposers import make_proposer

    torch.manual_seed(2)
    draft = build_draft("dspark", qwen3_config, target_layer_ids=[0, 2, 3], block_size=5, mask_token_id=255).eval()
    draft.copy_target_weights(qwen3_target)
    scheduler = PrefixScheduler(VerifyCostProfile(seconds, 8))
    engine = Engine(FrozenTarget(qwen3_target, [0, 2, 3]), make_proposer("dspark", draft, qwen3_target), scheduler)
    for prompt in PROMPTS[:2]:
        tokens, stats = run(engine, prompt, max_new_tokens=20)
        assert tokens == reference_greedy(qwen3_target, prompt, 20)
        assert all(r.num_drafted <= 5 for r in stats.rounds)


def test_calibration_recovers_the_temperatures_that_generated_the_verdicts():
    generator = torch.Generator().manual_seed(0)
    true = [2.0, 0.5, 1.0]  # points of the grid
    logits = 2.0 * torch.randn(40000, 3, generator=generator)
    accepted = torch.rand(40000, 3, generator=generator) < torch.sigmoid(logits / torch.tensor(true))
    fitted = calibrate_temperatures(logits, accepted, torch.ones_like(accepted))
    assert all(CALIBRATION_GRID[0] <= t <= CALIBRATION_GRID[-1] for t in fitted)
    for got, want in zip(fitted, true, strict=True):
        assert want / 2**0.25 <= got <= want * 2**0.25  # within one grid step


def test_calibration_skips_positions_no_block_supervises():
    logits = torch.tensor([[3.0, 0.5, -1.0], [2.0, 1.0, 0.0]])
    accepted = torch.tensor([[True, True, False], [True, False, True]])
    supervised = torch.tensor([[True, False, True], [True, False, False]])  # slot 2 unsupervised: 2 and 3 too
    fitted = calibrate_temperatures(logits, accepted, supervised)
    assert len(fitted) == 3 and fitted[1:] == [1.0, 1.0]


def test_expected_calibration_error_by_hand():
    predicted = torch.tensor([0.05, 0.15, 0.95, 0.85])
    observed = torch.tensor([0.0, 1.0, 1.0, 1.0])
    # bins: [0.0, 0.1) holds 0.05 vs 0; [0.1, 0.2) holds 0.15 vs 1; [0.8, 0.9) 0.85 vs 1; [0.9, 1.0] 0.95 vs 1
    assert expected_calibration_error(predicted, observed) == pytest.approx((0.05 + 0.85 + 0.15 + 0.05) / 4)


def test_dspark_stops_drafting_where_the_scheduler_cuts(qwen3_target, qwen3_config):
    from spectool.decoding.accept import SamplingParams
    from spectool.decoding.proposers import make_proposer

    torch.manual_seed(2)
    draft = build_draft("dspark", qwen3_config, target_layer_ids=[0, 2, 3], block_size=5, mask_token_id=255).eval()
    draft.copy_target_weights(qwen3_target)
    with torch.no_grad():  # spread the confidences so that the cut falls inside the block
        draft.confidence_head.proj.weight.mul_(40.0)
    proposer = make_proposer("dspark", draft, qwen3_target)
    features = FrozenTarget(qwen3_target, [0, 2, 3]).capture(torch.tensor([PROMPTS[2]])).target_hidden_states
    scheduler = PrefixScheduler(VerifyCostProfile((1.0, 1.0, 1.0, 1.5, 2.5, 4.0), 8))

    always = PrefixScheduler(VerifyCostProfile((1.0,) * 6, 8))  # flat cost: every slot pays, nothing is cut
    recorded = []
    confidence_logits = draft.confidence_logits

    def recording(hidden, prev):
        out = confidence_logits(hidden, prev)
        recorded.append(float(out))
        return out

    draft.confidence_logits = recording

    def propose(with_scheduler):
        proposer.reset()
        proposer.extend_context(0, features[0])
        proposer.use_scheduler(with_scheduler)
        return proposer.propose([PROMPTS[2]], [5], SamplingParams(), torch.Generator())[0]

    full = propose(always)
    assert len(full.tokens) == 5 and len(recorded) == 5
    keep = scheduler.prefix_length(torch.tensor(recorded))
    assert 0 < keep < 5, "the test needs a cut inside the block"
    assert torch.equal(propose(scheduler).tokens, full.tokens[:keep])
    assert torch.equal(propose(None).tokens, full.tokens)


def test_a_scheduler_needs_a_block_proposer(qwen3_target):
    from spectool.decoding.engine import Engine

    with pytest.raises(ValueError, match="block by block"):
        Engine(FrozenTarget(qwen3_target, []), None, PrefixScheduler(PROFILE))
