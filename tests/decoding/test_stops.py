"""Stop strings: the answer ends at the token that completes one, in the engine's multi-token rounds too."""

import pytest

from spectool.decoding.engine import Engine
from spectool.decoding.stops import StopStrings
from spectool.errors import UsageError
from spectool.target import FrozenTarget

from .test_engine import PROMPTS, make_engine, oracle, reference_greedy, run


def angle_decode(ids):
    """Token i reads "<i>": stop strings can start and end inside tokens."""
    return "".join(f"<{i}>" for i in ids)


def test_completes_at_the_token_that_finishes_the_string():
    stops = StopStrings(angle_decode, ["2><3"])
    assert not stops.completes_at([1, 2])
    assert stops.completes_at([1, 2, 3])  # "<1><2><3>" contains "2><3", "<1><2>" does not
    assert not stops.completes_at([1, 2, 3, 4])  # already complete one token earlier


def test_any_of_several_strings_and_long_answers():
    stops = StopStrings(angle_decode, ["<9>", "7><7"])
    long_answer = [1] * 500
    assert not stops.completes_at(long_answer)
    assert stops.completes_at([*long_answer, 9])
    assert stops.completes_at([*long_answer, 7, 7])
    assert not stops.completes_at([])
    assert stops.found_in([1, 7, 7, 2]) and not stops.found_in([1, 7, 2, 7])


def test_empty_or_missing_strings_are_usage_errors():
    with pytest.raises(UsageError):
        StopStrings(angle_decode, [])
    with pytest.raises(UsageError):
        StopStrings(angle_decode, ["ok", ""])


def test_a_stop_string_cuts_a_fully_accepted_round(qwen3_target):
    prompt = PROMPTS[0]
    truth = reference_greedy(qwen3_target, prompt, 30)

    # Spans two tokens of the answer; rounds after the prefill commit tokens 1..5, 6..10, ...
    stop = f"{truth[5]}><{truth[6]}"
    end = next(i for i in range(len(truth)) if stop in angle_decode(truth[: i + 1]))
    assert end % 5 != 0, "the stop must fall inside a round for this test"
    engine = Engine(FrozenTarget(qwen3_target, []), oracle(prompt, truth, 4))
    tokens, stats = run(
        engine, prompt, max_new_tokens=30, stop_strings=StopStrings(angle_decode, [stop]), stop_token_ids=[]
    )
    assert tokens == truth[: end + 1]
    assert stats.rounds[-1].finish_reason == "stop"
    assert len(stats.rounds[-1].tokens) < 5  # the round was cut, not the whole of it kept


def test_speculative_and_target_alone_stop_at_the_same_token(qwen3_target, qwen3_config):
    truth = reference_greedy(qwen3_target, PROMPTS[2], 24)
    stops = StopStrings(angle_decode, [f"<{truth[9]}>"])
    expected = truth[: truth.index(truth[9]) + 1]
    assert len(expected) > 1
    for engine in (make_engine("dspark", qwen3_target, qwen3_config), Engine(FrozenTarget(qwen3_target, []))):
        tokens, stats = run(engine, PROMPTS[2], max_new_tokens=24, stop_strings=stops)
        assert tokens == expected
        assert stats.rounds[-1].finish_reason == "stop"
