"""Every command's --help renders every option's help text whole: Rich reads "[word]" as markup and would drop
it silently, so the defaults written in brackets must survive rendering."""

import re

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
