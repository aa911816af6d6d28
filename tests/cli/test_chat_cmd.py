"""`spectool chat` driven end to end: scripted stdin, --prompt, --plain, and a real pty for Ctrl-C."""

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import pytest

from spectool.init import init_draft
from tests.cli.conftest import invoke

ANSI = re.compile(r"\x1b\[[0-9;]*m")


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
        os.environ.update(OMP_NUM_THREADS="1", TERM="xterm-256color", COLUMNS="120")
        os.environ.pop("NO_COLOR", None)
        os.execv(sys.executable, [sys.executable, "-m", "spectool", "chat", "--draft", str(draft_dir), "-n", "100000"])
    try:
        _read_until(fd, r"you> ", 60)
        os.write(fd, b"hi there\n")
        _read_until(fd, r"\S{3,}", 30)  # the answer has started streaming
        time.sleep(0.3)
        os.write(fd, b"\x03")  # Ctrl-C through the terminal driver: SIGINT to the chat
        seen = _read_until(fd, r"answer stopped[\s\S]*acceptance length[\s\S]*you> ", 60)
        assert "\x1b[" in seen  # styled output in a terminal
        os.write(fd, b"/quit\n")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.close(fd)
