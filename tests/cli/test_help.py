"""Every command's --help renders every option's help text whole: Rich reads "[word]" as markup and would drop
it silently, so the defaults written in brackets must survive rendering."""

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from spectool.cli import app
from spectool.paths import SHIPPED_DRAFTS_DIR
from spectool.registry import layer_methods, method_names


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


#: A usage error for every command, each answered with one "error:" line (or Typer's own box for an unknown
#: option) and exit 2, before torch or transformers load.
USAGE_ERRORS = [
    (["chat", "--draft", "/nonexistent/draft", "--prompt", "hi"], "no such draft directory"),
    (["init", "/nonexistent/model", "--method", "dspark", "--out", "/tmp/never-written"], "no such file"),
    (["convert", "/nonexistent/draft", "--to", "vllm", "--out", "/tmp/never-written"], "no such draft directory"),
    (["bench", "--draft", "/nonexistent/draft"], "no such draft directory"),
    (["bench", "--draft", "dspark", "--temperature", "-1"], "--temperature must be"),
    (["bench", "--draft", "dspark", "--baselines", "target,nope"], "unknown baseline(s) nope"),
    (["bench", "--draft", "dspark", "--prompts", "/nonexistent/prompts.jsonl"], "no such file: --prompts"),
    (["bench", "--draft", "dspark", "--target", "/nonexistent/model"], "no such file or directory"),
    (["train", "--target", "/nonexistent/model", "--method", "dspark", "--data", "x.jsonl", "--out", "/tmp/nw"], "no such"),
    (["train", "--target", "Qwen/Qwen3-8B", "--method", "dspark", "--data", "/nonexistent.jsonl", "--out", "/tmp/nw"],
     "no such file or directory: /nonexistent.jsonl"),
    (["train", "--resume", "--out", "/nonexistent/run"], "leave out --resume to start a fresh run"),
    (["train", "--method", "dspark", "--features", "/nonexistent/features", "--out", "/tmp/nw"], "no such features"),
    (["data", "regen", "--target", "/nonexistent/model", "--prompts", "/nonexistent/p.jsonl", "--out", "/tmp/nw.jsonl"],
     "no such"),
    (["data", "features", "--target", "/nonexistent/model", "--method", "dspark", "--data", "x.jsonl", "--out",
      "/tmp/nw"], "no such"),
    (["report", "/nonexistent/run"], "does not exist"),
    (["layers", "/nonexistent/model"], "no such file"),
    (["inspect", "/nonexistent/model"], "no such file"),
    (["demo", "--no-such-option"], "No such option"),
    (["chat", "--draft", "dspark", "--temperature", "-1", "--prompt", "hi"], "--temperature must be"),
    (["demo", "--out", __file__], "is a file, not a directory"),
    (["demo", "--out", str(Path(__file__).parent)], "is not empty"),
    (["bench", "--draft", "dspark", "--prompts", "mt-bench", "--turns", "0"], "--turns must be at least 1"),
    (["train", "--method", "nope", "--out", "/tmp/nw"], "Invalid value for '--method'"),
    (["init", "tiny", "-m", "eagle2", "--out", "/tmp/nw"], "EAGLE-2 is EAGLE-1's (or EAGLE-3's) draft"),
    (["convert", str(SHIPPED_DRAFTS_DIR / "dspark"), "--to", "sglang", "--out", "/tmp/nw"],
     "a dspark draft has no sglang layout (sglang holds eagle1, eagle3 drafts)"),
]  # fmt: skip


def test_help_and_usage_errors_answer_before_torch_loads():
    """--help of every command and a usage error of every command are answered without importing torch or
    transformers (tens of seconds on a loaded machine before): each runs in one fresh interpreter that reports,
    after each, whether either was imported, the exit code and what was printed on stderr."""
    helps = [[*path, "--help"] for path, _ in commands(typer.main.get_command(app))]
    cases = [(args, None) for args in [*helps, ["--version"]]] + USAGE_ERRORS
    code = (
        "import contextlib, io, json, sys\n"
        "from spectool.cli import app\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):\n"
        "        try:\n"
        "            app(args, prog_name='spectool')\n"
        "        except SystemExit as exit:\n"
        "            code = exit.code\n"
        "    print(json.dumps([args, code, 'torch' in sys.modules, 'transformers' in sys.modules, err.getvalue()]))\n"
    )
    argv = json.dumps([args for args, _ in cases])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "NO_COLOR": "1"}
    result = subprocess.run([sys.executable, "-c", code, argv], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == len(cases)
    for (args, expected), (ran, exit_code, torch, transformers, stderr) in zip(cases, rows, strict=True):
        assert ran == args
        assert (torch, transformers) == (False, False), (args, stderr)
        if expected is None:
            assert exit_code in (0, None), (args, stderr)
        else:
            assert exit_code == 2, (args, exit_code, stderr)
            assert expected in stderr, (args, stderr)
            if stderr.startswith("error:"):
                assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, (args, stderr)
    assert not Path("/tmp/nw").exists() and not Path("/tmp/never-written").exists()


#: Words the help renderer adds around what the commands declare.
_RENDERER_WORDS = set(
    "Usage: [OPTIONS] COMMAND [ARGS]... Options Commands Arguments [required] * [default: spectool".split()
)
_RENDERER_WORDS |= set("--help Show this message and exit.".split())


def _declared_words(path: tuple[str, ...], command) -> set[str]:
    """Every word the command's help could print: its text, its options' names, placeholders, helps and defaults."""
    words = set(_RENDERER_WORDS) | set(path)
    texts = [command.help or ""]
    for name, sub in getattr(command, "commands", {}).items():
        words.add(name)
        texts.append(sub.help or "")
    for param in command.params:
        texts.append(getattr(param, "help", None) or "")
        words.update([*param.opts, *param.secondary_opts])
        for name in (param.metavar, param.name):
            if name:
                words.update({name, name.upper(), f"[{name}]", f"{{{name}}}", f"[{name}]...", f"{{{name}}}..."})
        default = getattr(param.default, "value", param.default)
        if default is not None and not callable(default):
            words.update(f"{default}]".split())
        words.update(f"{opt.lstrip('-')}]" for opt in [*param.opts, *param.secondary_opts])  # [default: no-pack]
        if getattr(param, "envvar", None):
            words.update(("[env", "var:", f"{param.envvar}]"))  # [env var: SPECTOOL_API_KEY]
        with contextlib.suppress(Exception):
            words.add(str(param.display_type_rich(None)))  # <int>, <path> ... (Typer versions that print them)
    for text in texts:
        words.update(text.replace("\\[", "[").split())
    return words


@pytest.mark.parametrize("columns", ["80", "120"])
def test_help_renders_cleanly(columns):
    """At 80 and 120 columns: no type beside a flag, no doubled brackets, no word split across lines or cut short
    (every printed word is one the command declares), no reference to a document that does not ship."""
    checked = 0
    for path, command in commands(typer.main.get_command(app)):
        output = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": columns, "NO_COLOR": "1"}).output
        assert "<bool>" not in output and "[[" not in output and "…" not in output, (path, output)
        assert not re.search(r"\bSPEC\b|\.md\b|ARCHITECTURE|docs/", output), (path, output)
        assert max(len(line) for line in output.splitlines()) <= int(columns), path
        declared = _declared_words(path, command)
        text = re.sub(r"[│╭╮╰╯─]", " ", output)
        strays = [word for word in text.split() if word not in declared and word.rstrip(".,;:") not in declared]
        assert not strays, (path, columns, strays)
        checked += 1
    assert checked >= 13


def _method_options():
    for path, command in commands(typer.main.get_command(app)):
        for param in getattr(command, "params", []):
            if "--method" in getattr(param, "opts", ()):
                yield path


def test_every_method_option_is_a_choice_from_the_registry():
    """Each --method refuses an unknown name, listing the registry's methods (and "all" where it is offered);
    its help names the same choices."""
    paths = list(_method_options())
    assert {" ".join(p) for p in paths} >= {"train", "init", "inspect", "layers", "data features"}
    for path in paths:
        names = [m.name for m in layer_methods()] if path == ("layers",) else method_names()
        result = CliRunner().invoke(app, [*path, "--method", "nope"], env={"COLUMNS": "300", "NO_COLOR": "1"})
        assert result.exit_code == 2, (path, result.output)
        message = " ".join(result.output.split())
        assert all(f"'{name}'" in message for name in names), (path, message)
        help_text = " ".join(CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "300"}).output.split())
        assert ", ".join(names) in help_text, (path, names)
