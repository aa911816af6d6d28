"""Checks on output directories that every writing command shares (light: no torch, so the CLI starts fast)."""

from __future__ import annotations

from pathlib import Path

from spectool.errors import UsageError


def check_output_path(out: str | Path) -> None:
    """An output directory must be creatable: refuse one that is a file or lies under a file (exit 2)."""
    out = Path(out).expanduser()
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                where = "is a file" if path == out else f"lies under {path}, which is a file"
                raise UsageError(f"--out {out} {where}, not a directory; choose a directory for --out")
            return


def refuse_to_replace_input(out: str | Path, source: str | Path, name: str) -> None:
    """Writing OUT replaces the whole directory: refuse an OUT that is, or contains, an input (exit 2).

    `name` is how the command line calls the input (SRC, MODEL).
    """
    resolved, src = Path(out).expanduser().resolve(), Path(source).expanduser().resolve()
    if resolved == src or resolved in src.parents:
        where = "is" if resolved == src else "contains"
        raise UsageError(
            f"--out {out} {where} the {name} {source}, which writing --out would delete; choose another --out"
        )
