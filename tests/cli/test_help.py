"""Every command's --help renders every option's help text whole: Rich reads "[word]" as markup and would drop
it silently, so the defaults written in brackets must survive rendering."""

import re
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from spectool.cli import app


def commands(group, path: tuple[str, ...] = ()):
    yield path, group
    if hasattr(group, "commands"):  # a group (Typer's click types are its own)
        for name, command in group.commands.items():
            yield from commands(command, (*path, name))


def test_every_bracketed_default_appears_in_the_rendered_help():
    checked = 0
    for path, command in commands(typer.main.get_command(app)):
        result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "400", "NO_COLOR": "1"})
        assert result.exit_code == 0, (path, result.output)
        rendered = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())
        for param in command.params:
            for bracketed in re.findall(r"\[[^\]]*\]", (getattr(param, "help", None) or "").replace("\\[", "[")):
                assert bracketed in rendered, (path, param.name, bracketed)
                checked += 1
    assert checked > 20


@pytest.mark.parametrize(
    "args",
    [
        ["chat", "--draft", "/nonexistent/draft", "--prompt", "hi"],
        ["init", "/nonexistent/model", "--method", "dspark", "--out", "/tmp/never-written"],
        ["convert", "/nonexistent/draft", "--to", "vllm", "--out", "/tmp/never-written"],
        ["--help"],
        ["chat", "--help"],
    ],
)
def test_usage_errors_and_help_answer_before_torch_loads(args):
    """A mistyped path or --help is answered without importing torch or transformers (tens of seconds on a loaded
    machine before): the command runs in a fresh interpreter that reports what it imported."""
    code = (
        "import sys\n"
        "from spectool.cli import app\n"
        "try:\n"
        f"    app({args!r}, prog_name='spectool')\n"
        "except SystemExit as exit:\n"
        "    code = exit.code\n"
        "print('exit', code, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    last = result.stdout.strip().splitlines()[-1]
    assert last in ("exit 2 False False", "exit 0 False False"), (last, result.stderr[-500:])
    if last.startswith("exit 2"):
        assert "no such" in result.stderr and len(result.stderr.strip().splitlines()) == 1
