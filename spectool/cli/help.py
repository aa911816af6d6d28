"""Help that reads cleanly at 80 columns and up: no type beside a flag, short placeholders, choices named in words.

Typer prints a type beside every option (`<bool>` even beside a flag, which takes no value) and the whole choice
list of an Enum option in the narrow type column, where Rich folds it mid-word (`<eagle1|eagle3|df` / `lash>`).
`tidy_help(app)` runs once, after every command has registered: each Enum option gets an upper-case placeholder
(`--method METHOD`) and its choices are written into its help text ("One of: eagle1, eagle3, ..."), where Rich wraps
between words. `hide_flag_types()` leaves the type column of flags empty, as click itself does.
"""

from __future__ import annotations

import inspect
from enum import Enum
from typing import Any

import typer
from typer.models import ArgumentInfo, OptionInfo


def _commands(app: typer.Typer):
    """(what holds the help, the callback) for the app's callback, its commands and its groups' commands."""
    if app.registered_callback is not None and app.registered_callback.callback is not None:
        yield app.info, app.registered_callback.callback  # Typer(help=...) is the group's help
    for command in app.registered_commands:
        if command.callback is not None:
            yield command, command.callback
    for group in app.registered_groups:
        if group.typer_instance is not None:
            yield from _commands(group.typer_instance)


def unwrapped(text: str) -> str:
    """Help text with its paragraphs kept and the line breaks inside them (a docstring's) made spaces, so the
    terminal, not the source file, decides where lines end."""
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in paragraph.splitlines()) for paragraph in paragraphs)


def method_choice(name: str, names: list[str] | tuple[str, ...], *, extra: tuple[str, ...] = ()) -> type[Enum]:
    """A choice type of fixed ``names`` (plus ``extra``), e.g. `convert --to`'s destinations; --method uses
    `method_option`, which also takes methods registered after import."""
    return Enum(name, [(value, value) for value in (*names, *extra)], type=str)  # type: ignore[return-value]


#: Names people reach for that are not methods of their own, and what to use instead.
ALIASES = {
    "eagle2": "EAGLE-2 is EAGLE-1's (or EAGLE-3's) draft decoded as a dynamic tree: train / init -m eagle1 (or "
    "eagle3), then chat or bench with --tree TOP_K,DEPTH,TOTAL.",
    "eagle": "EAGLE is -m eagle1 (EAGLE-1/2) or -m eagle3.",
}


def method_option(default: Any, *, extra: tuple[str, ...] = (), help: str = "Draft method.") -> Any:
    """The `--method` option: any method of the registry (plus ``extra``, e.g. "all"), checked when the command line
    is parsed, so a method registered after import (a plug-in, a test) is accepted; the help lists the choices."""
    from spectool.registry import method_names

    def check(value: str | None) -> str | None:
        choices = [*extra, *method_names()]
        if value is not None and value not in choices:
            hint = ALIASES.get(value.lower().replace("-", ""))
            raise typer.BadParameter(
                f"{value!r} is not one of {', '.join(repr(c) for c in choices)}." + (f" {hint}" if hint else "")
            )
        return value

    def complete(incomplete: str) -> list[str]:
        return [name for name in (*extra, *method_names()) if name.startswith(incomplete)]

    listed = choices_text([*extra, *method_names()])
    return typer.Option(
        default, "--method", "-m", metavar="METHOD", callback=check, autocompletion=complete, help=f"{help} {listed}"
    )


def draft_option() -> Any:
    """`--draft` of the commands that run a draft (chat, serve): a directory or a shipped draft's name, the
    registry's default method's shipped draft when left out."""
    from spectool.paths import shipped_drafts_by_target
    from spectool.registry import DEFAULT_METHOD

    groups = [
        f"{', '.join(names)} ({'the embedded tiny target' if target == 'tiny' else target})"
        for target, names in shipped_drafts_by_target().items()
    ]
    return typer.Option(
        DEFAULT_METHOD,
        "--draft",
        "-d",
        help=f"Draft checkpoint directory, or the name of a draft shipped with spectool: {'; '.join(groups)}.",
    )


def device_map_option() -> Any:
    """`--device-map` of the commands that decode (chat, bench, serve): a target bigger than one device."""
    from spectool.hub import DEVICE_MAPS

    return typer.Option(
        None,
        "--device-map",
        help=f"Spread the target over every GPU, then the CPU and disk, with accelerate ({', '.join(DEVICE_MAPS)}), "
        "instead of --device: for targets bigger than one device.",
    )


def choices_text(choices: list[str]) -> str:
    return "One of: " + ", ".join(choices) + "."


def tidy_help(app: typer.Typer) -> None:
    """Unwrap each command's help, give every Enum option a placeholder and its choices in words (see the module
    docstring)."""
    for command, callback in _commands(app):
        text = command.help or inspect.getdoc(callback)
        if isinstance(text, str) and text:
            command.help = unwrapped(text)
        for parameter in inspect.signature(callback, eval_str=True).parameters.values():
            info: Any = parameter.default
            kind = parameter.annotation
            if not isinstance(info, (OptionInfo, ArgumentInfo)) or not (
                isinstance(kind, type) and issubclass(kind, Enum)
            ):
                continue
            if info.metavar is None:
                info.metavar = parameter.name.upper()
            listed = choices_text([str(member.value) for member in kind])
            if listed not in (info.help or ""):
                info.help = f"{info.help} {listed}" if info.help else listed


def hide_flag_types() -> None:
    """No `<bool>` beside a flag: a flag takes no value (Typer versions that print one: 0.16 and later)."""
    from typer.core import TyperOption

    original = getattr(TyperOption, "display_type_rich", None)
    if original is None or getattr(original, "_spectool", False):
        return

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        return None if self.is_flag else original(self, ctx)

    display_type_rich._spectool = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]
