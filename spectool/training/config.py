"""`TrainConfig`: every knob of a training run as one typed value, readable from TOML / YAML and the command line.

Precedence: the dataclass defaults, then a config file, then the options given on the command line. A resumed
run starts from the run's own ``train_config.json``; options that would change what the saved state means
(data, model shape, batch, seed...) may not change on resume.

Options left unset take the method's defaults, declared with the method (`spectool/methods/<name>.py`: its
`default_lr`, and the draft shape `spectool.registry.resolve` scales to the target). A method's own options
(`DraftMethod.options`: DSpark's Markov rank, EAGLE-3's training-time-test steps ...) are held in
``method_options``; train_config.json and config files name them at the top level like every other option.

Warmup defaults to ``min(max(20, steps // 50), steps // 10)`` steps: at least the 20 upstream asks for, at most a
tenth of a short run. Small targets often want a higher lr (1e-3 .. 3e-3 for a 64-wide toy).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from spectool.errors import SpectoolError, UsageError, json_problem
from spectool.registry import declared_options, method_names
from spectool.registry import get as get_method

#: Fields that fix what a checkpoint's state means: a resumed run may not change them (nor the method's own
#: options, unless the method declares one resumable: `resume_locked`).
RESUME_LOCKED = (
    "method",
    "target",
    "data",
    "features",
    "init",
    "batch_size",
    "grad_accum",
    "max_length",
    "pack",
    "assistant_turns",
    "chat_template",
    "skip_bad_rows",
    "eval_fraction",
    "seed",
    "num_draft_layers",
    "target_layer_ids",
    "num_feature_layers",
    "fsdp",
)


def resume_locked(method: str) -> tuple[str, ...]:
    """`RESUME_LOCKED` and the options of `method` that a resumed run may not change."""
    return RESUME_LOCKED + tuple(option.name for option in get_method(method).options if not option.resumable)


@dataclass
class TrainConfig:
    """One training run. ``None`` means "the method's default, scaled to the target" (resolved at start)."""

    # what to train
    method: str  # a registered method's name (`spectool.registry.method_names()`)
    target: str | None = None  # MODEL reference (with --features, defaults to the one the features came from)
    data: str | None = None  # conversations (file, directory or Hub dataset); not needed with features
    out: str = "draft"
    features: str | None = None  # a `spectool data features` directory: train offline from stored features
    init: str | None = None  # start from this draft directory instead of a fresh one
    # how long
    max_steps: int | None = None  # optimizer steps; with epochs too, whichever ends first
    epochs: float | None = None  # passes over the training split (default 1 when max_steps is unset)
    max_minutes: float | None = None  # time budget: the step count is planned from the measured step time
    # batches and optimisation
    batch_size: int = 8  # sequences per micro-batch, over all processes together (the global micro-batch)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float | None = None  # peak learning rate (None: the method's `default_lr`)
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    weight_decay: float = 0.0  # on matrices only (never norms or biases)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    # data
    max_length: int = 2048
    pack: bool = False
    assistant_turns: Literal["all", "last"] = "all"
    chat_template: str | None = None  # a Jinja file to use instead of the tokenizer's template
    skip_bad_rows: bool = False
    eval_fraction: float = 0.02  # held-out share of the examples; 0 disables evaluation
    # checkpoints, evaluation, logging
    save_every: int = 500  # steps between checkpoints; 0: only when interrupted
    keep_last: int = 3  # checkpoints kept
    eval_every: int = 500  # steps between evaluations (and one at the end); 0: only at the end
    eval_batches: int | None = None  # at most this many held-out batches per evaluation
    log_every: int = 10
    report_to: str | None = None  # trackers, comma-separated: tensorboard, wandb, none (spectool.training.reporting)
    seed: int = 0
    # hardware
    device: str | None = None  # cpu, cuda, cuda:1 ... (default cuda when available); torchrun picks cuda:LOCAL_RANK
    # auto: on CUDA the target in bf16 and the draft under bf16 autocast; on CPU the target in bf16 where the CPU
    # multiplies bf16 natively (AMX), else fp32, and the draft in fp32 (spectool.hardware)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    save_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"  # dtype of the final draft's weights
    fsdp: bool = False  # shard the draft with FSDP2 (fully_shard) instead of replicating it (DDP)
    shard_target: bool = False  # shard the frozen target's decoder layers over the processes with FSDP2
    # draft shape (None: the registry's default for the target)
    num_draft_layers: int | None = None
    target_layer_ids: list[int] | None = None
    num_feature_layers: int | None = None
    # the method's own options (`DraftMethod.options`: its draft shape and objective), those given: name -> value;
    # the rest take the method's defaults. `from_dict` sorts them out of a flat mapping of options.
    method_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise a `UsageError` naming the option for any value out of range."""
        method = get_method(self.method)  # a usage error listing the methods
        for name, value in self.method_options.items():
            if name not in method.option_names() and value is not None:
                raise UsageError(f"--{_flag(name)} does not apply to {method.title} drafts")
        method.check_options(self.method_options, max_length=self.max_length)
        if self.features is None and self.data is None:
            raise UsageError("give --data FILE (conversations) or --features DIR (from `spectool data features`)")
        if self.features is None and self.target is None:
            raise UsageError(
                "give --target MODEL: a Hub id (Qwen/Qwen3-8B), a model directory, a .gguf file, or `tiny` (the "
                "target embedded in spectool, with `--data demo`)"
            )
        positive = {
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "max_length": self.max_length,
            "keep_last": self.keep_last,
            "log_every": self.log_every,
        }
        optional_positive = {
            "max_steps": self.max_steps,
            "epochs": self.epochs,
            "max_minutes": self.max_minutes,
            "lr": self.lr,
            "eval_batches": self.eval_batches,
            "num_draft_layers": self.num_draft_layers,
            "num_feature_layers": self.num_feature_layers,
        }
        for name, value in {**positive, **optional_positive}.items():
            if value is not None and not value > 0:
                raise UsageError(f"--{_flag(name)} must be positive, got {value}")
        for name in ("save_every", "eval_every", "warmup_steps"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise UsageError(f"--{_flag(name)} must be 0 or more, got {value}")
        if self.max_length < 2:
            raise UsageError(f"--max-length must be at least 2, got {self.max_length}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UsageError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise UsageError("--weight-decay and --grad-clip must be 0 or more")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise UsageError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        from spectool.training.reporting import resolve_report_to

        resolve_report_to(self.report_to)
        if self.device is not None:
            from spectool.hardware import check_device

            check_device(self.device)

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else get_method(self.method).default_lr

    def options_of(self, part: str) -> dict[str, Any]:
        """The method's own options of one part ("shape": for `resolve`; "objective": for the objective's
        constructor) that were set; the method supplies its defaults for the rest."""
        names = get_method(self.method).option_names(part)
        return {name: value for name, value in self.method_options.items() if name in names and value is not None}

    def to_json(self) -> dict[str, Any]:
        """train_config.json: every option at the top level, the method's own (all of them, None when unset) last."""
        values = dataclasses.asdict(self)
        del values["method_options"]
        return {**values, **{name: self.method_options.get(name) for name in get_method(self.method).option_names()}}

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, where: str = "config") -> TrainConfig:
        """Build from a flat mapping of option names (dashes or underscores), checking names and value types; the
        method's own options go to ``method_options``. Another method's option is refused unless it is None (an
        older train_config.json listed every method's)."""
        checked = check_values(values, where=where)
        if "method" not in checked:
            raise UsageError(f"give --method ({', '.join(method_names())})")
        method = get_method(checked["method"])
        fields, own = {}, {}
        for name, value in checked.items():
            if name in FIELD_NAMES:
                fields[name] = value
            elif name in method.option_names():
                own[name] = value
            elif value is not None:
                raise UsageError(f"{where}: --{_flag(name)} does not apply to {method.title} drafts")
        return cls(**fields, method_options=own)


def _flag(name: str) -> str:
    return name.replace("_", "-")


#: The options `TrainConfig` names itself; the methods' own options come from the registry (`declared_options`).
FIELD_NAMES = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "method_options")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
_HINTS = typing.get_type_hints(TrainConfig)


def check_values(values: dict[str, Any], *, where: str = "config") -> dict[str, Any]:
    """Normalise keys (``max-steps`` -> ``max_steps``) and coerce values to the option types (the methods' own
    options to the type they declare).

    Unknown keys are a `UsageError` that names them all; so is a value of the wrong type.
    """
    normalised = {str(key).replace("-", "_"): value for key, value in values.items()}
    options = declared_options()
    hints = {**_HINTS, **{name: option.kind | None for name, option in options.items()}}
    valid = (*FIELD_NAMES, *options)
    unknown = sorted(key for key in normalised if key not in valid)
    if unknown:
        raise UsageError(f"{where}: unknown keys {', '.join(unknown)} (valid keys: {', '.join(valid)})")
    return {key: _coerce(value, hints[key], f"{where}: {key}") for key, value in normalised.items()}


def _coerce(value: Any, hint: Any, label: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [arg for arg in args if arg is not type(None)]
        return _coerce(value, inner[0], label)
    if origin is Literal:
        if value not in args:
            raise UsageError(f"{label} must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):
            from spectool.layers import parse_layer_ids

            return parse_layer_ids(value)
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise UsageError(f"{label} must be a list of integers, got {value!r}")
        return list(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise UsageError(f"{label} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{label} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise UsageError(f"{label} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{label} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise UsageError(f"{label} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, Path)):
            raise UsageError(f"{label} must be a string, got {value!r}")
        return str(value)
    return value


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a TOML (``.toml``), YAML (``.yaml`` / ``.yml``) or JSON file; a ``[train]`` table is
    unwrapped, and relative input paths that exist beside the file are read from there."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UsageError(f"{path} is a directory; --config takes a .toml, .yaml or .json file")
    if not path.is_file():
        raise UsageError(f"no such config file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text; a config is a .toml, .yaml or .json file") from None
    suffix = path.suffix.lower()
    if suffix == ".toml":
        import tomllib

        try:
            data: Any = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"{path}: not valid TOML ({exc})") from None
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise SpectoolError(f"{path}: reading YAML needs PyYAML (`pip install pyyaml`), or use TOML") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UsageError(f"{path}: not valid YAML ({first})") from None
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}: not valid JSON ({json_problem(exc, line=True)})") from None
    else:
        raise UsageError(f"{path}: config files are .toml, .yaml / .yml or .json, not {suffix or 'extensionless'}")
    if data is None:
        data = {}
    if isinstance(data, dict) and set(data) == {"train"} and isinstance(data["train"], dict):
        data = data["train"]
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a table of options at the top level")
    return _beside(check_values(data, where=str(path)), path.parent)


def resolve_config(
    cli_values: dict[str, Any],
    *,
    config_file: str | Path | None = None,
    saved: dict[str, Any] | None = None,
) -> TrainConfig:
    """Merge the layers: defaults < saved run config (resume) < config file < explicit command-line values.

    ``cli_values`` holds only the options given on the command line. On resume (``saved`` given), options in
    `RESUME_LOCKED` must keep their saved value.
    """
    file_values = read_config_file(config_file) if config_file is not None else {}
    given = _absolute_paths({**file_values, **check_values(cli_values, where="command line")})
    if saved is None:
        merged = given
    else:
        base = check_values(saved, where="train_config.json")
        changed = [
            name
            for name in resume_locked(base.get("method", given.get("method")))
            if name in given and given[name] != base.get(name, _DEFAULTS.get(name))
        ]
        if changed:
            detail = "; ".join(f"--{_flag(n)} {given[n]!r} (saved {base.get(n)!r})" for n in changed)
            raise UsageError(f"a resumed run keeps its saved settings, but these differ: {detail}")
        merged = {**base, **given}
    config = TrainConfig.from_dict(merged, where="config")
    config.validate()
    return config


#: Options naming local files or directories: stored absolute, so a resumed run finds them from anywhere.
_PATH_FIELDS = ("target", "data", "features", "init", "chat_template", "out")


def _beside(values: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A config file's relative input paths read from the file's own folder when they exist there (so a config
    works from any directory); otherwise they stay as written (the current directory, or a Hub id)."""
    fixed = dict(values)
    for name in _PATH_FIELDS:
        value = fixed.get(name)
        if name != "out" and isinstance(value, str) and not Path(value).expanduser().is_absolute():
            candidate = folder / value
            if candidate.exists():
                fixed[name] = str(candidate.resolve())
    return fixed


def _absolute_paths(values: dict[str, Any]) -> dict[str, Any]:
    """Relative paths that exist (or, for ``out``, any path) made absolute; Hub ids stay as they are."""
    fixed = dict(values)
    for name in _PATH_FIELDS:
        value = fixed.get(name)
        if isinstance(value, str) and (name == "out" or Path(value).expanduser().exists()):
            fixed[name] = str(Path(value).expanduser().resolve())
    return fixed


__all__ = [
    "RESUME_LOCKED",
    "resume_locked",
    "TrainConfig",
    "check_values",
    "read_config_file",
    "resolve_config",
]
