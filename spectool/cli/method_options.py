"""The methods' own options on the command line: one option per `MethodOption` a registered method declares
(`DraftMethod.options`), built when the command line is, so a method registered later (a plug-in, a test) brings
its options with it.

A command declares where they go with a ``method_options`` parameter and `with_method_options`; it receives the
options given as one dict (name -> value), which `TrainConfig`, `resolve` and `init_draft` take as they are.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import typer

from spectool.registry import declared_options, declaring_methods


def option_help(name: str) -> str:
    """The help of option `name`: each declaring method's title before its wording (methods that word it alike
    share one sentence), e.g. "DFlash / DSpark mask token (an unused row) [...]."."""
    wordings: dict[str, list[str]] = {}
    for method in declaring_methods(name):
        wording = next(option.help for option in method.options if option.name == name)
        wordings.setdefault(wording, []).append(method.title)
    text = " ".join(f"{' / '.join(titles)} {wording}" for wording, titles in wordings.items())
    return text.replace("[", "\\[")  # Rich would read "[512]" as markup


class WithMethodOptions:
    """A command whose signature, read when the command line is built, has one option per method option of the
    given parts in place of its ``method_options`` parameter; called, it passes the options given (not None) as
    ``method_options``."""

    def __init__(self, command: Callable[..., Any], parts: tuple[str, ...]) -> None:
        self.command, self.parts = command, parts
        self.__wrapped__ = command
        self.__name__, self.__qualname__ = command.__name__, command.__qualname__
        self.__module__, self.__doc__ = command.__module__, command.__doc__

    def _options(self) -> dict[str, Any]:
        return {name: option for part in self.parts for name, option in declared_options(part).items()}

    @property
    def __signature__(self) -> inspect.Signature:
        signature = inspect.signature(self.command, eval_str=True)
        parameters: list[inspect.Parameter] = []
        for parameter in signature.parameters.values():
            if parameter.name != "method_options":
                parameters.append(parameter)
                continue
            for name, option in self._options().items():
                default = typer.Option(None, option.flag, help=option_help(name))
                parameters.append(inspect.Parameter(name, parameter.kind, default=default, annotation=option.kind))
        return signature.replace(parameters=parameters)

    def __call__(self, **kwargs: Any) -> Any:
        names = self._options()
        given = {name: kwargs.pop(name) for name in list(kwargs) if name in names}
        return self.command(
            **kwargs, method_options={name: value for name, value in given.items() if value is not None}
        )


def with_method_options(*parts: str) -> Callable[[Callable[..., Any]], WithMethodOptions]:
    """Decorate a command that takes the methods' options of `parts` ("shape", "objective") as ``method_options``."""

    def decorate(command: Callable[..., Any]) -> WithMethodOptions:
        return WithMethodOptions(command, parts)

    return decorate


__all__ = ["WithMethodOptions", "option_help", "with_method_options"]
