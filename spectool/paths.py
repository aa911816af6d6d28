"""Checks and writes on output paths that every writing command shares (light: no torch, so the CLI starts fast).

What `--force` may remove: only what spectool itself wrote. A directory counts as spectool's when it holds a
`spectool.json` (a draft spectool wrote) or a `train_config.json` (a training run); then its draft files, run files
and spectool's own temporary files are spectool's, and anything else in it is the user's. A directory without either
marker is entirely the user's (a `config.json` + `model.safetensors` beside no `spectool.json` is somebody's model).
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Iterable, Mapping
from pathlib import Path

from spectool.errors import SpectoolError, UsageError

# The names of what spectool writes, each spelled here only (the modules that write and read them import them).
#: The files of a draft directory that spectool writes (`spectool.checkpoint.save_draft`).
DRAFT_FILES = ("model.safetensors", "config.json", "spectool.json")
#: A training run's metrics, one JSON row per log step (`spectool.training.rundir` writes, `spectool report` reads).
METRICS_FILE = "metrics.jsonl"
#: A training run's resolved configuration, what `--resume` continues (`spectool.training.rundir`).
RUN_CONFIG_FILE = "train_config.json"
#: A training run's checkpoints, ``step-<7-digit step>/`` each, holding the draft and `TRAINER_STATE_FILE`.
CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE_FILE = "trainer_state.pt"
#: What a `spectool data features` directory computed (`spectool.training.features`).
FEATURES_MANIFEST = "features.json"
#: What a training run adds beside its final draft (`spectool.training.rundir`).
RUN_FILES = (
    RUN_CONFIG_FILE,
    METRICS_FILE,
    CHECKPOINTS_DIR,
    ".final-draft",
    "tensorboard",
    "wandb",
    "wandb_run_id",
)
#: Files whose presence says spectool wrote the directory.
MARKER_FILES = ("spectool.json", RUN_CONFIG_FILE)
_OWN_NAMES = frozenset(DRAFT_FILES + RUN_FILES)


#: Drafts shipped inside the package for its embedded tiny target (``--draft dspark``).
SHIPPED_DRAFTS_DIR = Path(__file__).resolve().parent / "assets" / "drafts"


def shipped_drafts() -> list[str]:
    """Names of the drafts shipped inside the package (``--draft dspark``)."""
    if not SHIPPED_DRAFTS_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DRAFTS_DIR.iterdir() if (p / "config.json").is_file())


def shipped_drafts_by_target() -> dict[str, list[str]]:
    """The shipped drafts grouped by the target each records (``tiny``, or a packaged GGUF's file name)."""
    groups: dict[str, list[str]] = {}
    for name in shipped_drafts():
        try:
            target = json.loads((SHIPPED_DRAFTS_DIR / name / "spectool.json").read_text(encoding="utf-8"))["target"]
        except (OSError, ValueError, KeyError, TypeError):
            target = "?"
        groups.setdefault(str(target), []).append(name)
    return groups


def resolve_draft_dir(path: str | os.PathLike[str], option: str = "--draft") -> Path:
    """The draft directory a command-line argument names: an existing path, or the name of a shipped draft that is
    not one; refused in one line (exit 2) otherwise. Filesystem only, so commands check it before loading torch."""
    directory = Path(path).expanduser()
    if not directory.exists():
        shipped = shipped_drafts()
        if str(path) not in shipped:
            listing = f" (drafts shipped with spectool: {', '.join(shipped)})" if shipped else ""
            raise UsageError(f"no such draft directory: {path}{listing}")
        directory = SHIPPED_DRAFTS_DIR / str(path)
    if not (directory / "config.json").is_file():
        raise UsageError(f"{directory} has no config.json; point {option} at a draft checkpoint directory")
    return directory


def check_input_file(path: str | os.PathLike[str], option: str, kind: str) -> Path:
    """An input file a command reads (``--prompts``, ``--chat-template``): refused in one line (exit 2) when it is
    missing or a directory, before anything loads."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise UsageError(f"{option} {path} is a directory; {option} takes {kind}")
    if not file.is_file():
        raise UsageError(f"no such file: {option} {path}")
    return file


def installed_package_file(module: str, relative: str) -> Path | None:
    """A data file that an installed package ships (``module``'s folder / ``relative``), found without importing
    the package (some import tools that a ``--no-deps`` install does not bring); None when it is not there."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / relative
        if path.is_file():
            return path
    return None


def user_data_dir() -> Path:
    """Where spectool keeps what it remembers for the user (chat history): ``$XDG_DATA_HOME/spectool``, else
    ``~/.local/share/spectool`` (``%APPDATA%\\spectool`` on Windows)."""
    if os.name == "nt" and os.environ.get("APPDATA"):
        return Path(os.environ["APPDATA"]) / "spectool"
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "spectool"


def quoted(path: str | os.PathLike[str]) -> str:
    """A path as it must appear in a command line printed for pasting (quoted when it holds spaces etc.)."""
    return shlex.quote(str(path))


def check_output_path(out: str | Path) -> None:
    """An output directory must be creatable: refuse one that is a file or lies under a file (exit 2)."""
    out = Path(out).expanduser()
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                where = "is a file" if path == out else f"lies under {path}, which is a file"
                raise UsageError(f"--out {out} {where}, not a directory; choose a directory for --out")
            return


def make_output_dir(out: str | Path) -> Path:
    """Create the output directory (and its parents), or fail with one line (exit 1) naming why."""
    out = Path(out).expanduser()
    check_output_path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SpectoolError(f"cannot create --out {out}: {exc.strerror or exc}; choose another --out") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise SpectoolError(f"cannot write into --out {out}: permission denied; choose another --out")
    return out


def refuse_to_replace_input(out: str | Path, source: str | Path, name: str) -> None:
    """Writing OUT replaces what spectool owns in it: refuse an OUT that is, or contains, an input (exit 2).

    `name` is how the command line calls the input (SRC, MODEL, --data).
    """
    resolved, src = Path(out).expanduser().resolve(), Path(source).expanduser().resolve()
    if resolved == src or resolved in src.parents:
        where = "is" if resolved == src else "contains"
        raise UsageError(
            f"--out {out} {where} the {name} {source}, which writing --out could overwrite or delete; "
            "choose another --out"
        )


def refuse_inputs_inside(out: str | Path, inputs: Mapping[str, str | Path | None]) -> None:
    """`refuse_to_replace_input` for every input that exists on disk (Hub ids and unset options are skipped)."""
    for name, source in inputs.items():
        if source and Path(source).expanduser().exists():
            refuse_to_replace_input(out, source, name)


def spectool_entries(out: str | Path) -> tuple[list[Path], list[Path]]:
    """(entries spectool wrote, the user's entries) of directory ``out`` (see the module docstring)."""
    out = Path(out).expanduser()
    if not out.is_dir():
        return [], []
    entries = sorted(out.iterdir())
    names = {entry.name for entry in entries}
    if not names & set(MARKER_FILES):
        return [], entries
    own, foreign = [], []
    for entry in entries:
        (own if _is_own(entry.name) else foreign).append(entry)
    return own, foreign


def _is_own(name: str) -> bool:
    if name in _OWN_NAMES:
        return True
    # Temporary files of an interrupted atomic write: ".metrics.jsonl.tmp-1234", ".train_config.json.tmp-1234".
    base, sep, pid = name.rpartition(".tmp-")
    return bool(sep) and pid.isdigit() and base.startswith(".") and base[1:] in _OWN_NAMES


def check_force_target(out: str | Path, *, force: bool, hint: str = "choose another --out") -> list[Path]:
    """Whether a fresh write into ``out`` may go ahead; returns the entries that must be removed first.

    An empty or missing ``out`` needs nothing. A non-empty one needs ``force``, and then may hold only what spectool
    wrote: the user's own files are never removed (exit 2 names them). Nothing is removed here.
    """
    out = Path(out).expanduser()
    if not out.is_dir() or not any(out.iterdir()):
        return []
    if not force:
        raise UsageError(f"{out} is not empty; {hint}, or pass --force to replace what spectool wrote there")
    own, foreign = spectool_entries(out)
    if foreign:
        shown = ", ".join(entry.name for entry in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        whose = "files spectool did not write" if own else "no draft or run written by spectool, only other files"
        raise UsageError(
            f"--force replaces only what spectool wrote, and {out} holds {whose} ({shown}); move them or choose "
            "another --out"
        )
    return own


def remove_entries(entries: Iterable[Path]) -> None:
    """Remove what `check_force_target` returned (files, and directories spectool wrote)."""
    import shutil

    for entry in entries:
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)
        except OSError as exc:
            raise SpectoolError(f"cannot remove {entry}: {exc.strerror or exc}") from None


def file_mode() -> int:
    """The mode a new regular file gets under the current umask (0o644 under 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_dir(directory: str | Path) -> None:
    """Make renames in ``directory`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def cache_dir() -> Path:
    """spectool's cache: ``$SPECTOOL_CACHE``, else ``$XDG_CACHE_HOME/spectool`` (``~/.cache/spectool``)."""
    base = os.environ.get("SPECTOOL_CACHE")
    if base:
        return Path(base).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "spectool"


def write_text_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename, so a reader sees the old file or the new one, never a part."""
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, path)


def short_path(path: str | os.PathLike[str]) -> str:
    """A path as people read it: a shipped draft by its name, a path under the working directory relative to it,
    anything else as given."""
    resolved = Path(path).resolve()
    if resolved.parent == SHIPPED_DRAFTS_DIR.resolve():
        return resolved.name
    try:
        return str(resolved.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------------------------------------------
# Reading a run or features directory before torch loads (the command line answers at once)
# ----------------------------------------------------------------------------------------------------------------


def saved_run_config(out: Path) -> dict:
    """The options a run in `out` saved (its train_config.json), for `train --resume`; a usage error when there is
    no complete checkpoint to resume (the trainer checks the checkpoint itself when it loads)."""
    if not any((out / CHECKPOINTS_DIR).glob(f"step-*/{TRAINER_STATE_FILE}")):
        fresh = "leave out --resume to start a fresh run"
        if not out.is_dir():
            raise UsageError(f"nothing to resume: {out} does not exist; {fresh} there")
        if any(out.iterdir()):
            fresh += " (with --force to replace the files spectool wrote there)"
        raise UsageError(f"nothing to resume in {out}: no complete checkpoint under {out / CHECKPOINTS_DIR}; {fresh}")
    path = out / RUN_CONFIG_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise UsageError(f"cannot read {path}, which a resumed run continues from") from None


def features_method(features: Path) -> str | None:
    """The method a `spectool data features` directory was made for (None when unreadable: the store reports it)."""
    try:
        return json.loads((features / FEATURES_MANIFEST).read_text(encoding="utf-8")).get("method")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
