"""`spectool chat` driven end to end: scripted stdin, --prompt, --plain, and a real pty for Ctrl-C."""

import io
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest
from rich.console import Console
from transformers import AutoTokenizer

from spectool.chat_format import ChatFormat, Message
from spectool.cli.chat_session import ChatSession
from spectool.decoding.accept import SamplingParams
from spectool.draft_init import init_draft
from spectool.errors import UsageError
from spectool.runtime import load_runtime
from tests.cli.conftest import invoke

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # styles, and the cursor moves prompt_toolkit draws with


@pytest.fixture(scope="module")
def draft_dir(chat_target_dir, tmp_path_factory):
    return init_draft(str(chat_target_dir), "dflash", tmp_path_factory.mktemp("chat") / "dflash", dtype="float32").path


def test_prompt_answers_once_with_a_stats_line(draft_dir):
    result = invoke("chat", "--draft", str(draft_dir), "--prompt", "hi there", "-n", "10")
    assert result.exit_code == 0, result.output
    assert "acceptance length" in result.stdout and "tokens/forward (incl. bonus)" in result.stdout
    assert "10 tokens in" in result.stdout
    assert not ANSI.search(result.stdout)  # not a terminal: no escape codes


def test_stop_string_ends_the_answer(draft_dir):
    full = invoke("chat", "--draft", str(draft_dir), "--prompt", "hi there", "-n", "16", "--plain")
    answer = full.stdout.splitlines()[0]
    stop = answer[len(answer) // 2 : len(answer) // 2 + 2]
    result = invoke("chat", "--draft", str(draft_dir), "--prompt", "hi there", "-n", "16", "--stop", stop)
    assert result.exit_code == 0, result.output
    cut = result.stdout.splitlines()[0]
    assert stop in cut and answer.startswith(cut) and len(cut) < len(answer)
    assert cut.index(stop) + len(stop) >= len(cut) - 8  # ends within the token that completes the stop string


def test_max_drafts_caps_the_rounds(draft_dir):
    result = invoke("chat", "--draft", str(draft_dir), "--prompt", "hi there", "-n", "10", "--max-drafts", "1")
    assert result.exit_code == 0, result.output
    assert "accepted/drafted by position" in result.stdout
    assert len(result.stdout.split("accepted/drafted by position")[1].split("·")[0].split()) == 1


def test_scripted_session_with_slash_commands(draft_dir):
    script = "/help\nhi there\n/stats\n/temp 1e-9\n/temp 0.5\n/system you are nice\ntell me about cats\n/reset\n/bogus\n/quit\n"
    result = subprocess.run(
        [sys.executable, "-m", "spectool", "chat", "--draft", str(draft_dir), "-n", "8"],
        input=script,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "/stats" in out and "tokens per target forward over" in out  # the help text, then the histogram
    assert "temperature 0.5" in out and "system prompt set" in out and "conversation forgotten" in out
    assert "unknown command /bogus" in out
    assert "usage: /temp T  (0 for greedy, or a number >= 0.001)" in out  # 1e-9 would overflow logits / T
    assert out.count("acceptance length") == 2


def test_end_of_input_exits_cleanly(draft_dir):
    result = subprocess.run(
        [sys.executable, "-m", "spectool", "chat", "--draft", str(draft_dir)],
        input="",
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr


def test_bad_options(draft_dir, tmp_path):
    assert invoke("chat", "--draft", str(draft_dir), "--temperature", "-2", "--prompt", "x").exit_code == 2
    assert invoke("chat", "--draft", str(tmp_path / "none"), "--prompt", "x").exit_code == 2
    empty = invoke("chat", "--draft", str(draft_dir), "--prompt", "  ")
    assert empty.exit_code == 2 and "--prompt is empty" in empty.output


def _read_until(fd, pattern, timeout):
    buffer = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buffer += chunk
            if re.search(pattern, ANSI.sub("", buffer.decode("utf-8", "replace"))):
                return buffer.decode("utf-8", "replace")
    raise AssertionError(f"did not see {pattern!r}; got {buffer.decode('utf-8', 'replace')[-500:]!r}")


def test_tty_colours_and_ctrl_c_stops_only_the_answer(draft_dir):
    """In a terminal, accepted tokens are styled; Ctrl-C during an answer stops it and the session goes on."""
    pid, fd = pty.fork()
    if pid == 0:  # child: the chat, in a real terminal
        # This pty answers no cursor-position requests (a real terminal does): tell prompt_toolkit not to wait.
        os.environ.update(OMP_NUM_THREADS="1", TERM="xterm-256color", COLUMNS="120", PROMPT_TOOLKIT_NO_CPR="1")
        os.environ.pop("NO_COLOR", None)
        os.execv(sys.executable, [sys.executable, "-m", "spectool", "chat", "--draft", str(draft_dir), "-n", "100000"])
    try:
        _read_until(fd, r"you>", 60)  # prompt_toolkit draws the prompt with cursor moves, not a literal space
        os.write(fd, b"hi there\r")  # Enter, as a terminal sends it
        _read_until(fd, r"hi there\s*\n\s*\S{3,}", 30)  # the answer has started streaming after the line
        time.sleep(0.3)
        os.write(fd, b"\x03")  # Ctrl-C through the terminal driver: SIGINT to the chat
        seen = _read_until(fd, r"answer stopped by Ctrl-C[\s\S]*acceptance length[\s\S]*you>", 60)
        assert "\x1b[" in seen  # styled output in a terminal
        os.write(fd, b"/quit\r")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.close(fd)


def _chat_process(*args, input: bytes, env: dict | None = None) -> subprocess.CompletedProcess:
    """`spectool chat ARGS` as a process fed raw bytes on stdin (argv items may be bytes, as a shell passes them)."""
    return subprocess.run(
        [sys.executable, "-m", "spectool", "chat", *args],
        input=input,
        capture_output=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def test_prompt_that_is_not_utf8_is_refused(draft_dir):
    result = _chat_process("--draft", str(draft_dir), "--prompt", b"hi \xff there", input=b"")
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert "--prompt is not valid UTF-8 (byte 0xff at character 4)" in stderr
    assert len(stderr.strip().splitlines()) == 1 and "internal error" not in stderr


@pytest.mark.parametrize("option", ["--system", "--stop"])
def test_other_text_options_that_are_not_utf8_are_refused(draft_dir, option):
    result = invoke("chat", "--draft", str(draft_dir), "--prompt", "hi", option, "a\udcffb")  # argv's b"a\xffb"
    assert result.exit_code == 2, result.output
    assert f"{option} is not valid UTF-8 (byte 0xff at character 2)" in result.stderr


# The default stdin decodes leniently only under the C / C.UTF-8 locales; PYTHONIOENCODING=utf-8:strict is what a
# en_US.UTF-8 terminal gives, where a bad byte used to raise and lose the lines buffered behind it.
@pytest.mark.parametrize("env", [{}, {"PYTHONIOENCODING": "utf-8:strict"}], ids=["default", "strict-stdin"])
def test_stdin_line_that_is_not_utf8_is_skipped(draft_dir, env):
    result = _chat_process("--draft", str(draft_dir), "-n", "6", input=b"hi \xff there\nhi there\n/quit\n", env=env)
    stdout, stderr = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, stderr
    assert stderr.count("skipped a line that is not valid UTF-8 (byte 0xff at character 4)") == 1
    assert stdout.count("acceptance length") == 1  # the bad line never reached the model; the next one did
    assert "internal error" not in stderr


SHORT_POSITIONS = 40


@pytest.fixture(scope="module")
def short_target(chat_target_dir, tmp_path_factory):
    """The chat target with max_position_embeddings 40, and a DFlash draft for it."""
    target = tmp_path_factory.mktemp("short") / "target"
    shutil.copytree(chat_target_dir, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "max_position_embeddings": SHORT_POSITIONS}))
    draft = init_draft(str(target), "dflash", target.parent / "dflash", dtype="float32").path
    return target, draft


def _prompt_length(target, text: str) -> int:
    return len(ChatFormat(AutoTokenizer.from_pretrained(target)).prompt_ids([Message("user", text)]))


def test_answer_is_capped_to_the_target_positions(short_target):
    target, draft = short_target
    room = SHORT_POSITIONS - _prompt_length(target, "hi there")
    result = invoke("chat", "--draft", str(draft), "--prompt", "hi there", "-n", "100")
    assert result.exit_code == 0, result.output
    assert f"answer capped at {room} tokens (not 100)" in result.stderr
    assert f"{room} tokens in" in result.stdout
    assert "capped" not in invoke("chat", "--draft", str(draft), "--prompt", "hi there", "-n", str(room)).stderr


def test_prompt_longer_than_the_target_positions_is_refused(short_target):
    _, draft = short_target
    result = invoke("chat", "--draft", str(draft), "--prompt", "hi " * 30)
    assert result.exit_code == 2, result.output
    assert "leaves no room for an answer in the target's 40 positions (max_position_embeddings)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "acceptance length" not in result.stdout


def test_long_conversation_drops_the_oldest_turns(short_target):
    _, draft = short_target
    turns = ["tell me about cats and dogs", "what is the time now ?", "write code for x", "tell me about cats"]
    script = "\n".join([*turns, "hi " * 30, "hi there", "/quit"]).encode() + b"\n"
    result = _chat_process("--draft", str(draft), "-n", "8", input=script)
    stdout, stderr = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, stderr
    assert "dropped the oldest" in stderr and "to fit the target's 40 positions" in stderr
    assert stdout.count("8 tokens in") == len(turns) + 1  # every answer in full; the too-long message got none
    assert stderr.count("leaves no room for an answer") == 1 and "internal error" not in stderr


def test_fitting_never_exceeds_the_positions_and_a_refusal_keeps_the_history(short_target):
    session = ChatSession(
        load_runtime(short_target[1]),
        system=None,
        sampling=SamplingParams(),
        max_new_tokens=8,
        out=Console(file=io.StringIO()),
    )
    history = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "fine thanks"}] * 3
    session.messages = list(history)
    with pytest.raises(UsageError, match="leaves no room"):
        session.fit("hi " * 30)
    assert session.messages == history  # a refused message costs no history
    ids, budget = session.fit("tell me about cats")
    assert budget == 8 and len(ids) + budget <= SHORT_POSITIONS
    assert 0 < len(session.messages) < len(history)  # only the oldest turns went
    assert session.messages == history[len(history) - len(session.messages) :]


def test_an_answer_cut_by_the_token_cap_says_so_and_the_stats_say_why(draft_dir):
    args = ("chat", "--draft", str(draft_dir), "--prompt", "hi there", "-n", "6", "--max-drafts", "2")
    result = invoke(*args, "--verify", "auto")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "[answer cut at 6 tokens: raise --max-new-tokens]" in text
    assert "drafted per round" in text and "(0: a plain target step;" in text  # auto says what it did
    assert "--verify auto chose" in text or "--verify auto drafted" in text
    assert "at most 2 by --max-drafts" in text and "the target alone" not in text
    default = " ".join(invoke(*args).stdout.split())  # drafting every round: the target alone's speed beside
    assert re.search(r"drafting every round; the target alone: ~[0-9.]+ tok/s here", default)
    # a random dflash draft: the target rejects its tokens, and the line says that is why little is highlighted
    assert "little is highlighted: the target rejected most of the draft's tokens" in default


def test_chat_by_default_highlights_the_shipped_drafts_accepted_tokens():
    """The first thing a new user runs: `spectool chat` (the embedded target, the shipped DSpark draft)."""
    result = subprocess.run(
        [sys.executable, "-m", "spectool", "chat", "--prompt", "Tell me about the sea.", "-n", "32"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "FORCE_COLOR": "1", "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr
    tau = float(re.search(r"acceptance length ([0-9.]+)", ANSI.sub("", result.stdout)).group(1))
    assert tau > 1.2  # the draft's tokens were proposed and accepted ...
    highlighted = re.findall(r"\x1b\[[0-9;]*(?:;4[0-7]|48;[0-9;]+)m", result.stdout)  # ... on a background colour
    assert len(highlighted) >= 3 and "drafting every round" in ANSI.sub("", result.stdout)


def test_legend_says_in_plain_words_what_the_colours_mean():
    from spectool.cli.chat_cmd import legend_text

    legend = legend_text("dspark", "tiny").plain
    assert "tokens the draft proposed and the target accepted" in legend
    assert "Plain: tokens the target produced itself" in legend and "with each round" in legend


def test_draft_defaults_to_the_shipped_dspark():
    result = invoke("chat", "--prompt", "What does the len() function return?", "-n", "8")
    assert result.exit_code == 0, result.output
    assert "8 tokens in" in result.stdout


def test_terminal_input_edits_keeps_history_and_takes_multi_line_messages(tmp_path):
    """The prompt_toolkit reader, fed keys through a pipe: Alt-Enter puts a new line inside one message, Enter
    sends it, and the history file carries messages into the next session (Up recalls them)."""
    from prompt_toolkit.application import create_app_session
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    from spectool.cli.chat_cmd import line_reader

    history = tmp_path / "data" / "chat_history"
    with create_pipe_input() as keys, create_app_session(input=keys, output=DummyOutput()):
        read = line_reader(True, history)
        keys.send_text("first line\x1b\rsecond line\r")
        assert read("you> ") == "first line\nsecond line"
        keys.send_text("hello\x1b[D\x1b[DX\r")  # Left twice, then type: line editing, not "^[[D" in the text
        assert read("you> ") == "helXlo"
    assert history.is_file()
    with create_pipe_input() as keys, create_app_session(input=keys, output=DummyOutput()):
        read = line_reader(True, history)  # a new session
        keys.send_text("\x1b[A\r")  # Up: the last message of the earlier session
        assert read("you> ") == "helXlo"
