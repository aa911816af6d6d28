"""The answer worker's text stream: pieces that later tokens cannot change, cut before a stop string."""

from __future__ import annotations

from spectool.answers import Finished, TextStream
from spectool.decoding.engine import GenerationStats, RoundEvent

#: A hand-made tokenizer: token i decodes to PIECES[i]; 9 and 10 are the two halves of one character.
PIECES = {1: "Hello", 2: ",", 3: " wor", 4: "ld", 5: " END", 6: " more", 9: "", 10: "é"}


def decode(ids: list[int]) -> str:
    text = "".join(PIECES[i] for i in ids)
    return text + "\ufffd" if ids and ids[-1] == 9 else text  # a lone first byte decodes to U+FFFD


def test_pieces_join_to_the_text_and_wait_for_a_split_character():
    stream = TextStream(decode)
    assert stream.add([1]) == "Hello"
    assert stream.add([2, 9]) == ""  # "," waits with the half character: the decode ends in U+FFFD
    assert stream.add([10]) == ",é"
    assert stream.add([3, 4]) == " world"
    assert stream.finish(stopped=False) == ""
    assert stream.text == "Hello,é world"


def test_the_last_characters_that_could_start_a_stop_string_are_held_back():
    stream = TextStream(decode, stops=[" END"])  # 4 characters: the last 3 wait
    assert stream.add([1]) == "He"
    assert stream.add([3]) == "llo "  # "wor" waits: " wor" cannot become " END", but the rule is by length
    assert stream.add([5]) == "wor"  # the engine stopped here: " END" completed
    assert stream.finish(stopped=True) == ""  # the text ends before the stop string
    assert stream.text == "Hello wor"


def test_a_stop_string_is_cut_where_it_starts_even_inside_a_token():
    stream = TextStream(decode, stops=["ld E", "xyz"])
    pieces = [stream.add([1, 3]), stream.add([4]), stream.add([5])]
    assert "".join(pieces) + stream.finish(stopped=True) == "Hello wor"


def test_an_answer_that_ends_without_its_stop_string_releases_everything():
    stream = TextStream(decode, stops=["never seen"])
    text = stream.add([1, 2]) + stream.add([6])
    assert text + stream.finish(stopped=False) == "Hello, more"


def test_finished_reports_usage_and_what_the_draft_did():
    rounds = [
        RoundEvent([5], 0, 0, "prefill", 0.0, 0.1),
        RoundEvent([7, 8, 9], 4, 2, "correction", 0.01, 0.1),
        RoundEvent([3], 4, 0, "correction", 0.01, 0.1, "length"),
    ]
    finished = Finished("length", GenerationStats(rounds, seconds=0.5), prompt_tokens=11)
    assert finished.usage() == {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}
    extension = finished.extension()
    assert extension["acceptance_length"] == 2.0  # 4 tokens over 2 verify forwards
    assert extension["target_forwards"] == 3  # the prefill is a forward too
    assert (extension["drafted_tokens"], extension["accepted_tokens"]) == (8, 2)
    assert extension["tokens_per_second"] == 10.0
