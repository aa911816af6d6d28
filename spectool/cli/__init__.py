"""The `spectool` command line: the Typer app in `application.py`, one small module per command, rendering helpers and the
shared panels in `render.py`."""

from __future__ import annotations

# Command modules register themselves on `app` when imported.
from spectool.cli import (  # noqa: F401
    bench_cmd,
    chat_cmd,
    data_cmd,
    demo_cmd,
    export_cmd,
    init_cmd,
    inspect_cmd,
    layers_cmd,
    report_cmd,
    serve_cmd,
    train_cmd,
)
from spectool.cli.application import app
from spectool.cli.help import hide_flag_types, tidy_help

tidy_help(app)
hide_flag_types()


def main() -> None:
    app()
