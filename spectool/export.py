"""`spectool export`: from a trained draft to the command that serves it in an engine.

For an engine (vLLM or SGLang) and a draft, this checks the draft is one the engine serves (its method, and feature
layers the engine can capture: neither the embedding output nor the post-final-norm state), optionally writes the
engine's layout (`spectool convert`, which also writes the config keys that engine reads: vLLM reads a top-level
`eagle_aux_hidden_state_layer_ids` in its own numbering, and a config carrying only SGLang's nested key is read one
layer off), and prints the launch command with the number of speculative tokens chosen from the draft's measured
acceptance: a bench JSON (`spectool bench --json`) when given, else the draft's training summary.

The number: the draft positions reached (every earlier one accepted too) in at least `REACH` of rounds. On a GPU
with a large target verifying a few more tokens costs about nothing, while each drafted token costs a draft
forward; a position reached in under a quarter of the rounds adds under 0.25 tokens per round for that forward.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spectool.errors import SpectoolError, UsageError
from spectool.registry import get, methods, serving

#: A draft position is worth speculating when rounds reach it (all earlier positions accepted) this often.
REACH = 0.25
#: The most tokens an EAGLE chain is asked to draft (engines' own examples use 3 to 8).
MAX_CHAIN = 8

#: The engines `export` writes launch commands for (each method says how an engine names it: `engine_names`).
ENGINES = ("vllm", "sglang")


@dataclass
class ExportPlan:
    """What `spectool export` found: the engine, the draft to load, the target, the tokens per round and why, the
    command, and notes."""

    engine: str
    method: str
    draft: str  # the directory the engine is to load
    target: str
    num_speculative_tokens: int
    why: str
    command: str
    notes: list[str] = field(default_factory=list)
    convert_command: str | None = None  # vLLM: the draft in the speculators format (`speculators convert`)

    def to_json(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "method": self.method,
            "draft": self.draft,
            "target": self.target,
            "num_speculative_tokens": self.num_speculative_tokens,
            "why": self.why,
            "command": self.command,
            "notes": list(self.notes),
            "convert_command": self.convert_command,
        }


def uniform_rate(expected: float, k: int) -> float:
    """The acceptance rate r in [0, 1], the same at every position, that gives 1 + r + ... + r^k = `expected`
    tokens per round (0 at 1 token or fewer; 1 when even r = 1 falls short), by bisection."""
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        if sum(middle**j for j in range(k + 1)) < expected:
            low = middle
        else:
            high = middle
    return high if expected > 1.0 else 0.0


def reach_from_tau(tau: float, positions: int) -> list[float]:
    """Per-position reach r, r^2, ... of a draft whose acceptance length (bonus included) is `tau` over `positions`
    drafted tokens, when every position is accepted at the same rate r (`uniform_rate`)."""
    rate = uniform_rate(tau, positions)
    return [rate**j for j in range(1, positions + 1)]


def choose_tokens(reach: list[float], limit: int, source: str) -> tuple[int, str]:
    """(K, why): the leading positions reached in at least REACH of rounds, 1 to `limit`."""
    reached = 0
    for value in reach[:limit]:
        if value < REACH:
            break
        reached += 1
    k = max(1, reached)
    shown = " ".join(f"{v:.2f}" for v in reach[: max(k + 1, 3)][:limit])
    why = (
        f"{source}: draft positions 1.. are reached in {shown} of rounds; {k} token{'s' if k > 1 else ''} "
        f"reach{'' if k > 1 else 'es'} at least {REACH:.0%} of rounds"
    )
    if reached == 0:
        why += " (none does: 1, the least an engine drafts; this draft will not speed the target up)"
    return k, why


def reach_from_bench(path: Path) -> tuple[list[float], str]:
    """Per-position reach from a `spectool bench --json` file (its accept rate by draft position)."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"--bench {path}: not a readable bench JSON ({exc})") from None
    rates = report.get("accepted_per_position") if isinstance(report, dict) else None
    if not isinstance(rates, list) or not rates:
        raise UsageError(f"--bench {path}: no accepted_per_position (write it with `spectool bench --json`)")
    return [float(r) for r in rates], f"bench {path.name} ({report.get('prompts') or 'its prompts'})"


def reach_from_training(metadata: Any, positions: int) -> tuple[list[float], str] | None:
    """Per-position reach from the draft's training summary: `prefix@k` (greedy acceptance through position k)
    when logged, else its acceptance length spread over the positions; held-out figures first."""
    final = ((metadata.training or {}).get("final_metrics") or {}) if metadata is not None else {}
    for prefix in ("eval_", ""):
        reach = [final.get(f"{prefix}prefix@{k}") for k in range(1, positions + 1)]
        if reach[0] is not None:
            return [float(v) for v in reach if v is not None], f"training ({prefix or 'train '}prefix@k)".strip()
    for key in ("eval_acceptance_length", "acceptance_length"):
        if final.get(key) is not None:
            tau = float(final[key])
            return reach_from_tau(tau, positions), f"training ({key} {tau:.2f}, spread evenly over positions)"
    return None


def launch_command(engine: str, method: str, target: str, draft: str, k: int, block: int | None = None) -> str:
    """The command that serves `target` with `draft` drafting `k` tokens per round (a block draft: its `block`
    slots, the anchor and k = block - 1 drafted tokens)."""
    name = get(method).engine_names[engine]
    if engine == "vllm":
        config = json.dumps({"method": name, "model": draft, "num_speculative_tokens": k})
        return f"vllm serve {shlex.quote(target)} --speculative-config {shlex.quote(config)}"
    if block is not None:
        return (
            f"python -m sglang.launch_server --model-path {shlex.quote(target)} --speculative-algorithm {name} "
            f"--speculative-draft-model-path {shlex.quote(draft)} --speculative-num-draft-tokens {block}"
        )
    return (
        f"python -m sglang.launch_server --model-path {shlex.quote(target)} --speculative-algorithm {name} "
        f"--speculative-draft-model-path {shlex.quote(draft)} --speculative-num-steps {k} "
        f"--speculative-eagle-topk 1 --speculative-num-draft-tokens {k + 1}"
    )


def check_servable(engine: str, method: str, target_layer_ids: list[int], num_target_layers: int | None) -> None:
    """Refuse (a usage error) a method the engine does not serve, or feature layers it cannot capture."""
    if engine not in ENGINES:
        raise UsageError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine not in get(method).engine_names:
        served = ", ".join(m.name for m in methods() if engine in m.engine_names)
        raise UsageError(f"{engine} serves {served} drafts, not {method} (spectool chat / bench run it)")
    if get(method).reads_feature_layers and num_target_layers:
        found = serving(method, target_layer_ids, num_target_layers)
        if not found.portable:
            raise UsageError(f"{engine} cannot serve this draft: {found.message()}")


def plan_export(
    draft_dir: str | Path, engine: str, *, out: str | Path | None = None, bench: str | Path | None = None
) -> ExportPlan:
    """Check the draft against the engine, write its layout to `out` (when given), choose the number of
    speculative tokens and build the launch command."""
    from spectool.checkpoint import convert, load_draft

    loaded = load_draft(draft_dir)
    metadata = loaded.metadata
    num_layers = metadata.num_target_layers if metadata is not None else None
    check_servable(engine, loaded.method, list(loaded.target_layer_ids or []), num_layers)
    if metadata is None or not metadata.target:
        raise SpectoolError(f"{loaded.path} does not record its target (no spectool.json); export needs it")
    served = convert(loaded.path, engine, out) if out is not None else loaded
    notes = get(loaded.method).serving_notes(_config(served.path), engine)
    block = get(loaded.method).block_length(loaded.config)
    if block:  # a block is drafted in one forward: every slot, whose verify costs about nothing on a GPU
        k = int(block) - 1
        why = f"a block of {block} is drafted in one forward: all {k} drafted slots, as the engines' own examples"
    else:
        positions = MAX_CHAIN
        found = reach_from_bench(Path(bench)) if bench is not None else reach_from_training(metadata, positions)
        if found is None:
            k, why = 3, "no bench JSON (--bench) and no training summary in the draft: 3, the engines' usual start"
        else:
            k, why = choose_tokens(found[0], positions, found[1])
    target = engine_target(metadata.target)
    draft = str(Path(served.path).resolve())
    command = launch_command(engine, loaded.method, target, draft, k, int(block) if block else None)
    convert = speculators_command(loaded.method, draft, target, _config(served.path)) if engine == "vllm" else None
    return ExportPlan(engine, loaded.method, draft, target, k, why, command, notes, convert)


def speculators_command(method: str, draft: str, target: str, config: dict[str, Any]) -> str | None:
    """The `speculators convert` command (vLLM's speculators package, 0.9.0) that rewrites the draft in its own
    format, with what the converter does not read from the checkpoint; None where it has no converter."""
    found = get(method)
    if found.speculators_algorithm is None:
        return None
    words = ["speculators", "convert", draft, "--algorithm", found.speculators_algorithm, "--verifier", target]
    words += ["--output-path", f"{draft}-speculators"]
    kwargs = found.speculators_kwargs(config)
    if kwargs:
        words += ["--algorithm-kwargs", json.dumps(kwargs)]
    return " ".join(shlex.quote(word) for word in words)


def engine_target(ref: str) -> str:
    """What the engine is told to load: a Hub id as it is, a local target (or spectool's embedded one, or a GGUF
    file's safetensors conversion) by its directory."""
    from spectool.hub import resolve_model

    info = resolve_model(ref)
    return str(info.directory) if info.source == "local" and info.directory is not None else info.ref


def _config(directory: Path) -> dict[str, Any]:
    try:
        config = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}
