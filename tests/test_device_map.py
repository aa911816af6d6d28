"""`--device-map`: a target placed by accelerate over several devices (issue 30, part 4).

A CPU has no second GPU, but accelerate spreads a target over the CPU and disk through the same hooks it uses
between GPUs (each offloaded module's weights come back at its forward, inputs move to its device), so capping the
CPU's memory gives a spread target here: the decoding engine must run it through the transformers forward, keep
its tensors and the draft where the embedding is, and stay lossless.
"""

from __future__ import annotations

import pytest

from spectool.decoding.accept import SamplingParams
from spectool.decoding.engine import TargetSession
from spectool.errors import UsageError
from spectool.hub import check_device_map
from spectool.runtime import load_runtime, placement_notes
from tests.cli.conftest import invoke
from tests.decoding.test_engine import run

#: The embedded tiny target's embedding, lm_head and first layer fit in this; the other layers go to disk.
CPU_MEMORY = {"cpu": "12MB"}
QUESTION = [{"role": "user", "content": "Tell me about rivers and the sea."}]


def _answer(engine, prompt, **options) -> tuple[list[int], list[int]]:
    """The answer's tokens and the tokens accepted in each round."""
    tokens, stats = run(engine, prompt, max_new_tokens=40, **options)
    return tokens, [event.num_accepted for event in stats.rounds]


@pytest.mark.parametrize(("draft", "tree"), [("eagle3", None), ("eagle3", "4,4,12"), ("dflash", None)])
def test_spread_target_decodes_exactly_as_the_whole_one(draft, tree):
    whole = load_runtime(draft, verify="full", tree=tree)
    prompt = whole.prompt_ids(QUESTION)
    reference, accepted = _answer(whole.engine, prompt)
    assert reference == _answer(whole.target_engine, prompt)[0]

    spread = load_runtime(draft, verify="full", tree=tree, device_map="sequential", max_memory=CPU_MEMORY)
    placed = spread.model.hf_device_map
    assert placed["model.embed_tokens"] == "cpu" and placed["model.layers.7"] == "disk"
    assert type(spread.engine.session) is TargetSession  # the lean forward needs the whole target on one device
    assert str(spread.engine.device) == "cpu"  # where the embedding runs, not a disk module's meta tensors
    assert _answer(spread.engine, prompt) == (reference, accepted)  # the same tokens and the same acceptance
    assert _answer(spread.target_engine, prompt)[0] == reference
    assert any("offloaded to disk" in warning for warning in spread.warnings)
    sampled = _answer(spread.engine, prompt, sampling=SamplingParams(temperature=0.8), seed=1)[0]
    assert sampled == _answer(whole.engine, prompt, sampling=SamplingParams(temperature=0.8), seed=1)[0]


def test_verify_auto_on_a_spread_target_is_lossless():
    whole = load_runtime("dspark", verify="full")
    prompt = whole.prompt_ids(QUESTION)
    spread = load_runtime("dspark", verify="auto", device_map="auto", max_memory=CPU_MEMORY)
    assert _answer(spread.engine, prompt)[0] == _answer(whole.target_engine, prompt)[0]


def test_placement_notes_name_the_devices():
    class Placed:
        hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "lm_head": "cpu"}

    (spread,) = placement_notes(Placed())
    assert "2 on cuda:0, 1 on cuda:1, 1 on cpu" in spread and "transformers forward" in spread
    Placed.hf_device_map = {"": 0}
    assert placement_notes(Placed()) == []
    Placed.hf_device_map = {"model": "cpu", "lm_head": "disk"}
    assert len(placement_notes(Placed())) == 2


def test_device_map_is_checked_before_anything_loads():
    check_device_map(None, "cuda")
    check_device_map("auto", None)
    with pytest.raises(UsageError, match="one of auto, balanced"):
        check_device_map("everywhere", None)
    with pytest.raises(UsageError, match="leave out --device"):
        check_device_map("auto", "cpu")


@pytest.mark.parametrize("command", ["chat", "bench", "serve"])
def test_commands_refuse_a_bad_device_map_in_one_line(command):
    result = invoke(command, "--draft", "dspark", "--device-map", "everywhere")
    assert result.exit_code == 2
    assert "--device-map must be one of auto, balanced, balanced_low_0, sequential" in result.output
    assert "Traceback" not in result.output


def test_chat_answers_through_a_device_map():
    options = ("chat", "--draft", "dspark", "--prompt", "Tell me about snow.", "-n", "12", "--plain")
    whole = invoke(*options)
    mapped = invoke(*options, "--device-map", "auto")
    assert whole.exit_code == 0 and mapped.exit_code == 0, mapped.output
    assert whole.stdout.splitlines()[0] == mapped.stdout.splitlines()[0]  # the same answer
