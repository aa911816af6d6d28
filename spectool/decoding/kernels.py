"""Matrix kernels for the lean forward's few-token products, chosen by timing them on this machine.

Speculative decoding lives on products of a weight with 1 to ~16 token rows, and on a CPU the library's default
formulation (`F.linear`, x @ W.T) is far from the memory-bandwidth floor at exactly those shapes: on a 2-core AMD
EPYC, SmolLM2's lm_head (49,152 x 576) takes 8.9 ms for one row and 20-30 ms for two to eight, while the same
weight stored column-major reads one row in 4.8 ms and `(W @ x.T).T` on the row-major weight does four rows in
8.6 ms. Which formulation wins depends on the CPU, the BLAS, the shape and the row count, so it is measured:

* four forms: ``linear`` (F.linear on the row-major weight, the model's own), ``wx`` ((W @ x.T).T on the same
  weight), ``col`` (F.linear on a column-major copy) and ``native`` (spectool's own kernel, `native.few_rows`:
  fp32 weights, where a C compiler is at hand; it reads the weight once for all rows and prefetches it, so eight
  rows cost little more than one, and each token's result does not depend on the rows beside it);
* each for every token count in `MEASURED_TOKENS`, timed cold: each call reads a different layer's weight, as the
  forward does (one weight timed in a loop stays in the cache and lies);
* per token count the fastest (form, rows) pair wins, where a product may be padded with zero rows to a larger
  measured count when that count's kernel is faster (four rows can cost less than three);
* column-major copies cost memory, so a kind of weight keeps one only where it pays at one token and within
  `COLUMN_COPY_SHARE` of the weights' bytes.

The plan is cached per machine (CPU model, threads, torch version, dtype, shapes) in ``kernels.json`` under
spectool's cache dir, so it is measured once (a few seconds). Every form computes the same product; results
differ only in float rounding, as `F.linear` over one token and over several already do, and the tests check that
greedy decoding reads the same tokens. Models small enough to live in the cache (the test fixtures, the demo
target) and non-CPU devices keep `F.linear`: there per-op overhead, not the kernel, sets the cost;
``SPECTOOL_KERNELS=plain`` keeps it everywhere (for side-by-side comparisons and bug reports).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from spectool.decoding import native
from spectool.hardware import cpu_name
from spectool.paths import cache_dir, write_text_atomically

FORMS = ("linear", "wx", "col", "native")
#: The forms that need no copy of the weight.
ROW_MAJOR_FORMS = ("linear", "wx", "native")
#: Token counts timed; a count in between is padded up to the next one timed, a count above the last runs F.linear.
MEASURED_TOKENS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16)
#: Below this many weight bytes a model lives in the CPU caches: no choice is made (plain F.linear).
SMALL_MODEL_BYTES = 48 << 20
#: Column-major copies may add at most this share of the planned weights' bytes.
COLUMN_COPY_SHARE = 0.25
#: A form other than plain F.linear must be at least this much faster to be chosen (timing noise).
MARGIN = 0.03
#: The kinds are timed over the first layers whose weights add up to this many bytes (so reads come from memory).
COLD_BYTES = 96 << 20
PLAN_VERSION = 2  # 2: the native form


@dataclass(frozen=True)
class Choice:
    """How one product runs: which form, on how many rows."""

    form: str  # one of FORMS
    rows: int  # the product runs on this many rows (>= the tokens; zero rows pad)


@dataclass
class KernelPlan:
    """Per kind of weight: token count -> Choice (absent: F.linear), and which kinds keep a column-major copy."""

    tables: dict[str, dict[int, Choice]]
    columns: frozenset[str]
    timings: dict[str, dict[str, list[float]]]  # kind -> form -> seconds per call at MEASURED_TOKENS (for reports)
    measured_seconds: float = 0.0

    def to_json(self) -> dict:
        return {
            "version": PLAN_VERSION,
            "tables": {k: {str(m): [c.form, c.rows] for m, c in t.items()} for k, t in self.tables.items()},
            "columns": sorted(self.columns),
            "timings": self.timings,
            "measured_seconds": self.measured_seconds,
        }

    @classmethod
    def from_json(cls, data: Mapping) -> KernelPlan:
        if data.get("version") != PLAN_VERSION:
            raise ValueError("an older kernel plan")
        tables = {k: {int(m): Choice(str(c[0]), int(c[1])) for m, c in t.items()} for k, t in data["tables"].items()}
        for table in tables.values():
            if any(c.form not in FORMS or c.rows < m for m, c in table.items()):
                raise ValueError("a malformed kernel plan")
        return cls(tables, frozenset(data["columns"]), dict(data.get("timings", {})), data.get("measured_seconds", 0))

    def summary(self) -> dict:
        """For reports: per kind, the form used at each token count up to 8 ("wx/4": wx on 4 rows)."""
        return {
            "chosen": bool(self.tables),
            # why spectool's own kernel was not among the forms timed (None: it was, or nothing was timed)
            "native_unavailable": (native.unavailable_reason() or None) if self.tables else None,
            "column_copies": sorted(self.columns),
            "forms": {
                kind: {
                    str(m): (f"{c.form}/{c.rows}" if c.rows > m else c.form) if (c := table.get(m)) else "linear"
                    for m in range(1, 9)
                }
                for kind, table in self.tables.items()
            },
        }


PLAIN = KernelPlan({}, frozenset(), {})
_COLUMN_ATTRIBUTE = "_spectool_column_major"  # a weight's column-major copy lives (and dies) with the weight
_PLANS: dict[str, KernelPlan] = {}


def column_major(weight: torch.Tensor) -> torch.Tensor:
    """A column-major copy of `weight` (shape unchanged, strides transposed), made once per weight tensor."""
    column = getattr(weight, _COLUMN_ATTRIBUTE, None)
    if column is None:
        column = weight.detach().t().contiguous().t()
        setattr(weight, _COLUMN_ATTRIBUTE, column)
    return column


def drop_column_major(weight: torch.Tensor) -> None:
    """Forget `weight`'s column-major copy (users of the copy keep theirs)."""
    if hasattr(weight, _COLUMN_ATTRIBUTE):
        delattr(weight, _COLUMN_ATTRIBUTE)


class PlannedLinear:
    """`F.linear(x, weight, bias)` through the plan's choice for the number of token rows in `x`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, table: Mapping[int, Choice], column: bool):
        self.weight, self.bias, self.table = weight, bias, dict(table)
        self.column = column_major(weight) if column else None
        if self.column is None and any(c.form == "col" for c in self.table.values()):
            raise ValueError("a plan that reads a column-major copy the weight does not have")
        if any(c.form == "native" for c in self.table.values()) and not native_fits(weight):
            raise ValueError("a plan that runs the native kernel on a weight it does not take (or without it)")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.table:  # the plain plan (small models, GPUs): no per-call bookkeeping on the hot path
            return F.linear(x, self.weight, self.bias)
        tokens = x.numel() // x.shape[-1] if x.numel() else 0
        choice = self.table.get(tokens)
        if choice is None:
            return F.linear(x, self.weight, self.bias)
        if choice.form == "native" and choice.rows == tokens and x.is_contiguous():  # any shape, no copies
            out = native.few_rows(x, self.weight)
            return out if self.bias is None else out.add_(self.bias)
        flat = x.reshape(tokens, x.shape[-1])
        if choice.rows > tokens:
            flat = torch.cat((flat, flat.new_zeros(choice.rows - tokens, flat.shape[1])))
        # the kernels were timed on row-major rows and hand row-major results on (BLAS takes another path for
        # other strides, several times slower at these shapes)
        out = run_form(choice.form, flat.contiguous(), self.weight, self.column)[:tokens].contiguous()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], out.shape[-1])


def run_form(form: str, x: torch.Tensor, weight: torch.Tensor, column: torch.Tensor | None) -> torch.Tensor:
    """`x` [M, in] times `weight` [out, in] transposed, by one of FORMS (no bias)."""
    if form == "wx":
        return torch.mm(weight, x.t()).t()
    if form == "col":
        return F.linear(x, column)
    if form == "native":
        return native.few_rows(x, weight)
    return F.linear(x, weight)


def native_fits(weight: torch.Tensor) -> bool:
    """Whether the native kernel is built here and takes this weight (a contiguous float32 CPU tensor)."""
    return (
        weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and weight.is_contiguous()
        and native.library() is not None
    )


def machine_key(dtype: torch.dtype, shapes: Mapping[str, tuple[int, int, int]]) -> str:
    """What a plan depends on: the CPU, the thread count, torch, the dtype and each kind's (out, in, layers)."""
    kinds = ",".join(f"{k}={o}x{i}x{n}" for k, (o, i, n) in sorted(shapes.items()))
    built = "native" if dtype == torch.float32 and native.library() is not None else "no-native"
    return f"{cpu_name()}|threads={torch.get_num_threads()}|torch={torch.__version__}|{dtype}|{built}|{kinds}"


def plan_for(
    weights: Mapping[str, Sequence[torch.Tensor]],
    *,
    report: Callable[[str], None] | None = None,
    small_bytes: int | None = None,
) -> KernelPlan:
    """The plan for these kinds of weight (kind -> every layer's row-major weight): PLAIN off the CPU or for a
    model under `small_bytes` (default `SMALL_MODEL_BYTES`: one that fits in the caches); else the cached plan for this machine, measured (and
    cached) when missing."""
    first = next(iter(weights.values()))[0]
    total = sum(w.numel() * w.element_size() for ws in weights.values() for w in ws)
    small_bytes = SMALL_MODEL_BYTES if small_bytes is None else small_bytes
    if first.device.type != "cpu" or total < small_bytes or os.environ.get("SPECTOOL_KERNELS") == "plain":
        return PLAIN
    shapes = {k: (ws[0].shape[0], ws[0].shape[1], len(ws)) for k, ws in weights.items()}
    key = machine_key(first.dtype, shapes)
    if key in _PLANS:
        return _PLANS[key]
    path = cache_dir() / "kernels.json"
    stored = _read_plans(path)
    try:
        plan = KernelPlan.from_json(stored[key])
    except (KeyError, ValueError, TypeError, IndexError):
        if report is not None:
            report(f"timing matrix kernels for this CPU once (cached in {path})")
        plan = measure_plan(weights)
        stored = _read_plans(path)  # another process may have written meanwhile
        stored[key] = plan.to_json()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomically(path, json.dumps(stored, indent=1))
        except OSError:
            pass  # an unwritable cache costs a re-measure next time, nothing else
    _PLANS[key] = plan
    return plan


def plan_draft(draft: torch.nn.Module, *, report: Callable[[str], None] | None = None) -> KernelPlan:
    """Run the draft's own linear layers through kernels chosen for them (each layer its own kind), for
    decoding beside a target whose products have a plan: the draft is small, but it runs after the target's
    forward has evicted it from the caches, at the same few-token shapes. Inference only: the layers' forward is
    replaced (a column-major or bf16 copy would not follow an optimizer's updates).

    A layer whose float32 weights are all exact in bfloat16 (a draft saved in bf16, as shipped drafts are) reads a
    bf16 copy through the native kernel instead (`HalfStoredLinear`): the same values and sums, half the bytes."""
    linears = {name: m for name, m in draft.named_modules() if isinstance(m, torch.nn.Linear)}
    halved = {name for name, m in linears.items() if exact_in_bf16(m.weight) and native_fits(m.weight)}
    for name in halved:
        linears[name].forward = HalfStoredLinear(linears[name].weight, linears[name].bias)
    rest = {name: m for name, m in linears.items() if name not in halved}
    if not rest:
        return PLAIN
    plan = plan_for({f"draft.{name}": [m.weight] for name, m in rest.items()}, report=report, small_bytes=0)
    for name, module in rest.items():
        kind = f"draft.{name}"
        if plan.tables.get(kind):
            module.forward = PlannedLinear(module.weight, module.bias, plan.tables[kind], kind in plan.columns)
    return plan


def exact_in_bf16(weight: torch.Tensor) -> bool:
    """Whether a float32 weight holds only values a bfloat16 holds exactly (so a bf16 copy loses nothing)."""
    return weight.dtype == torch.float32 and torch.equal(weight.detach().to(torch.bfloat16).float(), weight.detach())


class HalfStoredLinear:
    """`F.linear(x, weight, bias)` for a float32 weight that is exact in bfloat16: up to the last measured token
    count, the native kernel reads a bf16 copy (half the bytes; bit for bit what it computes on the float32
    weight); more rows, or rows it does not take, go through F.linear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        if not (exact_in_bf16(weight) and native_fits(weight)):
            raise ValueError("a bf16 copy of a weight that bf16 does not hold exactly (or without the native kernel)")
        self.weight, self.bias = weight, bias
        self.half = weight.detach().to(torch.bfloat16).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // x.shape[-1] if x.numel() else 0
        if 0 < tokens <= MEASURED_TOKENS[-1] and x.dtype == torch.float32 and x.is_contiguous():
            out = native.few_rows_bf16(x, self.half)
            return out if self.bias is None else out.add_(self.bias)
        return F.linear(x, self.weight, self.bias)


def _read_plans(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@torch.no_grad()
def measure_plan(weights: Mapping[str, Sequence[torch.Tensor]], *, sweeps: int = 5) -> KernelPlan:
    """Time every form at every measured token count for each kind, then choose.

    The products run as the forward runs them: layer by layer, each layer's kinds in turn (timed one kind after
    another over all layers, a weight read from memory looks up to 1.5x cheaper than it is in the forward), over
    the first layers that add up to `COLD_BYTES`; kinds with one weight (the lm_head) after each pass over the
    layers. Each call is timed alone; a kind's figure is the median over layers and `sweeps`."""
    began = time.perf_counter()
    depth = max(len(ws) for ws in weights.values())
    layered = [k for k, ws in weights.items() if len(ws) == depth]
    layer_bytes = sum(weights[k][0].numel() * weights[k][0].element_size() for k in layered)
    count = min(depth, max(1, -(-COLD_BYTES // max(layer_bytes, 1))))
    sample = {k: list(ws[:count]) if k in layered else list(ws) for k, ws in weights.items()}
    # a kind too big for the column copies' share is never given one: its column form is not timed (nor copied)
    bytes_per_kind = {k: sum(w.numel() * w.element_size() for w in ws) for k, ws in weights.items()}
    allowance = COLUMN_COPY_SHARE * sum(bytes_per_kind.values())
    columns = {k: [column_major(w) for w in ws] if bytes_per_kind[k] <= allowance else None for k, ws in sample.items()}
    runs_native = {k: all(native_fits(w) for w in ws) for k, ws in sample.items()}
    calls: dict[tuple[str, str, int], list[float]] = {}
    for _ in range(sweeps):
        for tokens in MEASURED_TOKENS:
            inputs = {k: torch.randn(tokens, ws[0].shape[1], dtype=ws[0].dtype) for k, ws in sample.items()}
            for form in FORMS:
                order = [(k, i) for i in range(count) for k in layered]
                order += [(k, i) for k in sample if k not in layered for i in range(len(sample[k]))]
                for kind, i in order:
                    if (form == "col" and columns[kind] is None) or (form == "native" and not runs_native[kind]):
                        calls.setdefault((kind, form, tokens), []).append(math.inf)
                        continue
                    start = time.perf_counter()
                    run_form(form, inputs[kind], sample[kind][i], columns[kind][i] if columns[kind] else None)
                    calls.setdefault((kind, form, tokens), []).append(time.perf_counter() - start)
    for ws in sample.values():  # the copies the plan keeps are made again when it is applied
        for w in ws:
            drop_column_major(w)
    timings = {k: {f: [statistics.median(calls[(k, f, m)]) for m in MEASURED_TOKENS] for f in FORMS} for k in weights}
    plan = choose(timings, bytes_per_kind)
    plan.measured_seconds = round(time.perf_counter() - began, 4)
    return plan


def choose(timings: Mapping[str, Mapping[str, Sequence[float]]], bytes_per_kind: Mapping[str, int]) -> KernelPlan:
    """The plan from measured seconds per call (kind -> form -> per MEASURED_TOKENS): which kinds keep a column
    copy (the best savings at one token per byte first, within COLUMN_COPY_SHARE of all bytes), then per token
    count the fastest (form, padded rows) among the forms the kind has, F.linear unless another beats it by MARGIN.

    The native kernel runs on the rows it is given (padding only ever wins it by timing noise), and wherever it is
    timed within MARGIN of the fastest it is taken: then a token's products do not depend on how many tokens are
    verified beside it, so the verify reads exactly what plain steps would."""
    saving = {}
    for kind, forms in timings.items():
        row_best = min(_best(forms, ROW_MAJOR_FORMS, 1))
        gain = row_best - forms["col"][0]
        if gain > MARGIN * row_best:
            saving[kind] = gain
    allowance = COLUMN_COPY_SHARE * sum(bytes_per_kind.values())
    columns = set()
    for kind in sorted(saving, key=lambda k: -saving[k] / bytes_per_kind[k]):
        if bytes_per_kind[kind] <= allowance:
            columns.add(kind)
            allowance -= bytes_per_kind[kind]
    tables = {}
    for kind, forms in timings.items():
        allowed = FORMS if kind in columns else ROW_MAJOR_FORMS
        table = {}
        for index, tokens in enumerate(MEASURED_TOKENS):
            plain = forms["linear"][index]
            seconds, choice = min(_candidates(forms, allowed, index), key=lambda pair: pair[0])
            own = forms["native"][index] if "native" in forms else math.inf
            counts = range(MEASURED_TOKENS[index - 1] + 1 if index else 1, tokens + 1)
            if own <= (1 + MARGIN) * seconds:
                table.update({count: Choice("native", count) for count in counts})
            elif seconds < (1 - MARGIN) * plain:
                table.update({count: choice for count in counts})
        tables[kind] = table
    return KernelPlan(tables, frozenset(columns), {k: {f: list(v) for f, v in t.items()} for k, t in timings.items()})


def _best(forms: Mapping[str, Sequence[float]], allowed: Sequence[str], tokens: int) -> list[float]:
    index = MEASURED_TOKENS.index(tokens)
    return [seconds for seconds, _ in _candidates(forms, allowed, index)]


def _candidates(forms: Mapping[str, Sequence[float]], allowed: Sequence[str], index: int):
    """(seconds, Choice) for every allowed form run on MEASURED_TOKENS[index] rows or padded to a larger count."""
    for form in (f for f in allowed if f in forms):  # a kind timed without a form never gets it
        for padded in range(index, index + 1 if form == "native" else len(MEASURED_TOKENS)):
            yield forms[form][padded], Choice(form, MEASURED_TOKENS[padded])
