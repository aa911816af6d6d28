"""What `spectool report` shows: training runs (their metrics.jsonl) and benchmarks (`spectool bench --json`).

`load_sources` reads the paths; `summary_tables` gives Rich tables for the terminal (with sparklines);
`write_figure` draws them with matplotlib (imported only there) into a PNG, or an HTML page embedding it, and writes
the plotted numbers beside it as CSV (``source,panel,series,x,value``, one row per point) so they can be checked.

Runs share their panels: loss and eval loss vs step and vs training minutes, acceptance length vs step, tokens/s vs
step, and a heat map of greedy acceptance through each draft position (``prefix@k``; ``acc@k`` for older runs) over
steps per run. A run keeps one colour in every panel (eval series dashed).
Benchmarks add the histogram of tokens per verify round and tokens/s of the draft against each baseline.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spectool.errors import UsageError
from spectool.paths import METRICS_FILE

PLOT_INSTALL = "pip install 'spectool[plot]'"
_SPARKS = "▁▂▃▄▅▆▇█"
_POSITION = re.compile(r"^(prefix|acc)@(\d+)$")
#: What the heat map shows per draft position: greedy acceptance through k (``prefix@k``, whose sum plus 1 is the
#: acceptance length); runs written before spectool logged it have only ``acc@k``, which the block methods then
#: used for the same rate.
_POSITION_TITLES = {
    "prefix": "greedy acceptance through draft position k (prefix@k)",
    "acc": "hit rate by draft position (acc@k)",
}


@dataclass
class RunSource:
    """A training run: the rows of its metrics.jsonl."""

    name: str
    path: Path
    rows: list[dict[str, Any]] = field(default_factory=list)

    def series(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of every row holding a number under ``key``."""
        return [(row["step"], float(row[key])) for row in self.rows if _is_number(row.get(key))]

    def training_minutes(self) -> dict[int, float]:
        """Step -> minutes of training up to it: each row's mean step time (``step_seconds``) times the steps
        since the row before. Evaluation and checkpoint time are left out, as in the run's tokens/s."""
        minutes: dict[int, float] = {}
        total, previous = 0.0, 0
        for row in self.rows:
            if _is_number(row.get("step_seconds")):
                total += float(row["step_seconds"]) * (row["step"] - previous)
                previous = row["step"]
                minutes[row["step"]] = total / 60.0
        return minutes

    def last(self, key: str) -> float | None:
        points = self.series(key)
        return points[-1][1] if points else None

    def position_metric(self) -> str:
        """``prefix`` when the run logged ``prefix@k``, else ``acc``."""
        names = {m.group(1) for row in self.rows for key in row if (m := _POSITION.match(key))}
        return "prefix" if "prefix" in names or not names else "acc"

    def positions(self) -> list[int]:
        """The k of the `position_metric` fields, sorted."""
        name = self.position_metric()
        return sorted(
            {int(m.group(2)) for row in self.rows for key in row if (m := _POSITION.match(key)) and m.group(1) == name}
        )


@dataclass
class BenchSource:
    """A benchmark: the object `spectool bench --json` printed."""

    name: str
    path: Path | None
    data: dict[str, Any]

    def decoders(self) -> list[tuple[str, float]]:
        """(decoder, tokens/s): the speculative loop first, then each baseline."""
        rows = [("speculative", float(self.data.get("tokens_per_second") or 0.0))]
        for name, row in (self.data.get("baselines") or {}).items():
            rows.append((name, float(row.get("tokens_per_second") or 0.0)))
        return rows

    def histogram(self) -> list[tuple[int, int]]:
        """(tokens per verify round, rounds), sorted."""
        return sorted((int(k), int(v)) for k, v in (self.data.get("acceptance_histogram") or {}).items())


Source = RunSource | BenchSource


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def load_sources(paths: list[str | Path]) -> list[Source]:
    """Read run directories (or their metrics.jsonl) and bench JSON files; a `UsageError` names a bad path."""
    if not paths:
        raise UsageError("give one or more run directories (with metrics.jsonl) or `spectool bench --json` files")
    sources: list[Source] = []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            metrics = path / METRICS_FILE
            if not metrics.is_file():
                raise UsageError(f"{path} holds no {METRICS_FILE}: give a `spectool train` run directory")
            sources.append(RunSource(path.name or str(path), path, _read_rows(metrics)))
        elif path.is_file() and path.suffix == ".jsonl":
            sources.append(RunSource(path.parent.name or path.stem, path, _read_rows(path)))
        elif path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise UsageError(f"cannot read {path} as a bench JSON file: {exc}") from None
            if not isinstance(data, dict) or "tokens_per_second" not in data or "baselines" not in data:
                raise UsageError(f"{path} is not the output of `spectool bench --json`")
            sources.append(BenchSource(path.stem, path, data))
        else:
            raise UsageError(f"{path} does not exist")
    _unique_names(sources)
    return sources


def _current_names(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row in today's names: DSpark runs written before every method's ``acceptance_length`` was the
    greedy one logged the greedy value as ``greedy_acceptance_length`` and the sampled one as ``acceptance_length``."""
    for prefix in ("", "eval_"):
        greedy = row.pop(f"{prefix}greedy_acceptance_length", None)
        if greedy is not None:
            row[f"{prefix}sampled_acceptance_length"] = row.get(f"{prefix}acceptance_length")
            row[f"{prefix}acceptance_length"] = greedy
    return row


def _read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut off by a kill
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(_current_names(row))
    return rows


def _unique_names(sources: list[Source]) -> None:
    """Sources with the same name are told apart by their path."""
    seen: dict[str, int] = {}
    for source in sources:
        seen[source.name] = seen.get(source.name, 0) + 1
    for source in sources:
        if seen[source.name] > 1 and source.path is not None:
            source.name = str(source.path)


# ----------------------------------------------------------------------------------------------------------------
# Terminal
# ----------------------------------------------------------------------------------------------------------------


def sparkline(values: list[float], width: int = 30, floor: float | None = None) -> str:
    """``▁▃▅█``: the values (averaged into at most ``width`` buckets) scaled from their min (or ``floor``, when
    lower: acceptance lengths start at 1, so 1.06 -> 1.09 is a flat line, not a climb) to their max."""
    if not values:
        return ""
    if len(values) > width:
        size = len(values) / width
        values = [
            sum(chunk) / len(chunk)
            for i in range(width)
            if (chunk := values[int(i * size) : max(int((i + 1) * size), int(i * size) + 1)])
        ]
    low, high = min(values), max(values)
    if floor is not None:
        low = min(low, floor)
    span = high - low
    return "".join(_SPARKS[int((v - low) / span * (len(_SPARKS) - 1) + 0.5) if span else 0] for v in values)


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_tables(sources: list[Source]) -> list[Any]:
    """Rich renderables: one table per run and per benchmark."""
    from rich.table import Table
    from rich.text import Text

    tables = []
    for source in sources:
        table = Table(title=Text(source.name, style="bold"), title_justify="left", show_edge=False, show_header=False)
        table.add_column("what", style="bold")
        table.add_column("value", justify="right")
        table.add_column("trend")
        if isinstance(source, RunSource):
            steps = source.rows[-1]["step"] if source.rows else 0
            loss = [v for _, v in source.series("loss")]
            tau = [v for _, v in source.series("acceptance_length")]
            minutes = source.training_minutes()
            table.add_row("steps", str(steps), "")
            if minutes:
                table.add_row("training minutes", f"{max(minutes.values()):,.1f}", "")
            table.add_row("loss (last)", _number(source.last("loss"), ".4f"), sparkline(loss))
            table.add_row("eval loss (last)", _number(source.last("eval_loss"), ".4f"), "")
            table.add_row(
                "acceptance length (last)", _number(source.last("acceptance_length"), ".3f"), sparkline(tau, floor=1.0)
            )
            if source.last("eval_acceptance_length") is not None:
                table.add_row(
                    "eval acceptance length (last)", _number(source.last("eval_acceptance_length"), ".3f"), ""
                )
            speed = [v for _, v in source.series("tokens_per_second")]
            table.add_row("tokens/s (mean)", _number(sum(speed) / len(speed) if speed else None, ",.0f"), "")
        else:
            data = source.data
            histogram = source.histogram()
            table.add_row("draft", f"{data.get('method')} {data.get('draft')}", "")
            table.add_row(
                "acceptance length", _number(data.get("acceptance_length"), ".3f"), sparkline([c for _, c in histogram])
            )
            for name, tps in source.decoders():
                speedup = (data.get("baselines") or {}).get(name, {}).get("speedup")
                note = f"speculative: {speedup:.2f}x this" if isinstance(speedup, int | float) else ""
                table.add_row(f"tokens/s {name}", f"{tps:,.1f}", note)
        tables.append(table)
    return tables


# ----------------------------------------------------------------------------------------------------------------
# Figure
# ----------------------------------------------------------------------------------------------------------------


def require_matplotlib() -> None:
    """A `UsageError` naming the extra to install when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(f"drawing needs matplotlib: {PLOT_INSTALL}") from None


def check_figure_path(out: str | Path, *, force: bool = True, option: str = "--out") -> Path:
    """The figure's path: .png or .html, not a directory; with ``force`` False an existing figure or data CSV
    (the same name with .csv) is refused rather than replaced."""
    out = Path(out).expanduser()
    if out.suffix.lower() not in (".png", ".html"):
        raise UsageError(f"{out}: the figure is written as .png or .html")
    if out.is_dir():
        raise UsageError(f"{out} is a directory; give a .png or .html file")
    existing = [path for path in (out, out.with_suffix(".csv")) if path.exists()]
    if existing and not force:
        names = " and ".join(str(path) for path in existing)
        raise UsageError(
            f"{names} already exist{'s' if len(existing) == 1 else ''}; pass --force to replace, or "
            f"choose another {option}"
        )
    return out


def write_figure(sources: list[Source], out: str | Path) -> tuple[Path, Path]:
    """Draw ``sources`` into ``out`` (.png, or .html embedding the PNG) and the plotted data into a CSV beside
    it (same name, .csv). Returns both paths."""
    out = check_figure_path(out)
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    drawing = _Drawing(sources, plt)
    png = drawing.render()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".png":
        out.write_bytes(png)
    else:
        encoded = base64.b64encode(png).decode("ascii")
        names = ", ".join(s.name for s in sources)
        out.write_text(
            '<!doctype html>\n<html><head><meta charset="utf-8"><title>spectool report</title></head><body>\n'
            f"<h1>spectool report</h1>\n<p>{_escape(names)}</p>\n"
            f'<img alt="spectool report" src="data:image/png;base64,{encoded}">\n</body></html>\n',
            encoding="utf-8",
        )
    table = out.with_suffix(".csv")
    with open(table, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["source", "panel", "series", "x", "value"])
        writer.writerows(drawing.points)
    return out, table


class _Drawing:
    """One report figure: a panel per view of the runs and bench files, each source in its own colour on every
    panel, and every plotted point kept (source, panel, series, x, value) for the CSV."""

    def __init__(self, sources: list[Source], plt: Any) -> None:
        self.plt = plt
        self.runs = [s for s in sources if isinstance(s, RunSource)]
        self.benches = [s for s in sources if isinstance(s, BenchSource)]
        self.colour = _colours(self.runs, self.benches, plt.rcParams["axes.prop_cycle"].by_key()["color"])
        self.points: list[tuple[str, str, str, Any, float]] = []

    def panels(self) -> list[str]:
        panels: list[str] = []
        if self.runs:
            panels += ["loss", "loss_time", "acceptance_length", "tokens_per_second"]
            panels += [f"positions:{i}" for i, run in enumerate(self.runs) if run.positions()]
        if self.benches:
            panels += ["histogram", "decoders"]
        if not panels:
            raise UsageError("nothing to draw")
        return panels

    def render(self) -> bytes:
        """The figure as PNG bytes."""
        panels = self.panels()
        columns = 2 if len(panels) > 1 else 1
        rows_count = (len(panels) + columns - 1) // columns
        fig, axes = self.plt.subplots(rows_count, columns, figsize=(6.0 * columns, 3.4 * rows_count), squeeze=False)
        flat = list(axes.flat)
        for ax in flat[len(panels) :]:
            ax.set_visible(False)
        for ax, panel in zip(flat, panels, strict=False):
            if panel == "loss":
                self._lines(ax, panel, ("loss", "eval_loss"), "loss", "loss")
            elif panel == "loss_time":
                self._lines(ax, panel, ("loss", "eval_loss"), "loss vs training time", "loss", by_time=True)
            elif panel == "acceptance_length":
                keys = ("acceptance_length", "eval_acceptance_length")
                self._lines(ax, panel, keys, "acceptance length (bonus token included)", "tokens per round")
                if ax.has_data():  # from 1 (nothing accepted): a change of 0.03 must not fill the panel
                    ax.set_ylim(bottom=min(1.0, ax.get_ylim()[0]), top=max(ax.get_ylim()[1], 1.5))
            elif panel == "tokens_per_second":
                self._lines(ax, panel, ("tokens_per_second",), "training tokens/s", "tokens/s")
            elif panel.startswith("positions:"):
                self._positions(fig, ax, self.runs[int(panel.split(":")[1])])
            elif panel == "histogram":
                self._histogram(ax)
            else:
                self._decoders(ax)
        fig.tight_layout()
        image = io.BytesIO()
        fig.savefig(image, format="png", dpi=80)
        self.plt.close(fig)
        return image.getvalue()

    def _lines(
        self, ax: Any, panel: str, keys: tuple[str, ...], title: str, ylabel: str, by_time: bool = False
    ) -> None:
        """One line per run and key against the step (or, ``by_time``, the run's training minutes)."""
        for run in self.runs:
            minutes = run.training_minutes() if by_time else {}
            for key in keys:
                series = run.series(key)
                if by_time:
                    series = [(minutes[step], value) for step, value in series if step in minutes]
                if not series:
                    continue
                style = "--" if key.startswith("eval_") else "-"
                xs, ys = zip(*series, strict=True)
                ax.plot(xs, ys, style, color=self.colour[run.name], marker="." if len(xs) < 30 else None,
                        label=f"{run.name} {key}")  # fmt: skip
                self.points.extend((run.name, panel, key, x, y) for x, y in series)
        ax.set_title(title)
        ax.set_xlabel("training minutes (evaluation and checkpoints left out)" if by_time else "step")
        ax.set_ylabel(ylabel)
        if ax.has_data():
            ax.legend(fontsize="small")

    def _positions(self, fig: Any, ax: Any, run: RunSource) -> None:
        """Greedy acceptance by draft position over steps, as a heat map."""
        ks, name = run.positions(), run.position_metric()
        rows = [r for r in run.rows if any(f"{name}@{k}" in r for k in ks)]
        steps = [row["step"] for row in rows]
        grid = [[float("nan")] * len(steps) for _ in ks]
        for j, row in enumerate(rows):
            for i, k in enumerate(ks):
                value = row.get(f"{name}@{k}")
                if _is_number(value):
                    grid[i][j] = float(value)
                    self.points.append((run.name, "positions", f"{name}@{k}", row["step"], float(value)))
        image = ax.imshow(grid, aspect="auto", origin="lower", vmin=0.0, vmax=1.0, cmap="viridis",
                          interpolation="nearest")  # fmt: skip
        ax.set_yticks(range(len(ks)), [str(k) for k in ks])
        spacing = max(1, len(steps) // 6)
        ticks = [t for t in range(0, len(steps), spacing) if t == 0 or len(steps) - 1 - t >= spacing / 2]
        ticks = sorted({*ticks, len(steps) - 1})  # the last step always labelled, no label crowding it
        ax.set_xticks(ticks, [str(steps[t]) for t in ticks])
        ax.set_title(f"{run.name}: {_POSITION_TITLES[name]}", fontsize="medium")
        ax.set_xlabel("step")
        ax.set_ylabel("position k")
        fig.colorbar(image, ax=ax)

    def _histogram(self, ax: Any) -> None:
        """Tokens per verify round, as shares of each bench file's rounds."""
        width = 0.8 / len(self.benches)
        for b, bench in enumerate(self.benches):
            histogram = bench.histogram()
            total = sum(c for _, c in histogram) or 1
            xs = [k + (b - (len(self.benches) - 1) / 2) * width for k, _ in histogram]
            ax.bar(xs, [c / total for _, c in histogram], width=width, color=self.colour[bench.name], label=bench.name)
            self.points.extend((bench.name, "histogram", "rounds", k, float(c)) for k, c in histogram)
        ax.set_xticks(sorted({k for bench in self.benches for k, _ in bench.histogram()}))
        ax.set_title("tokens per verify round (acceptance length)")
        ax.set_xlabel("tokens per round")
        ax.set_ylabel("share of rounds")
        ax.legend(fontsize="small")

    def _decoders(self, ax: Any) -> None:
        """Decoding tokens/s of the draft and each baseline, per bench file."""
        names = list(dict.fromkeys(name for bench in self.benches for name, _ in bench.decoders()))
        width = 0.8 / len(self.benches)
        for b, bench in enumerate(self.benches):
            speeds = dict(bench.decoders())
            xs = [i + (b - (len(self.benches) - 1) / 2) * width for i, name in enumerate(names) if name in speeds]
            ys = [speeds[name] for name in names if name in speeds]
            ax.bar(xs, ys, width=width, color=self.colour[bench.name], label=bench.name)
            self.points.extend((bench.name, "decoders", "tokens_per_second", name, speeds[name]) for name in speeds)
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize="small")
        ax.set_title("decoding tokens/s: the draft against the baselines")
        ax.set_ylabel("tokens/s")
        ax.legend(fontsize="small")


def _colours(runs: list[RunSource], benches: list[BenchSource], cycle: list[str]) -> dict[str, str]:
    """A colour per source name. A bench takes the colour of the run it measured: the run whose directory is the
    bench's draft, else the run named like the draft's directory (a shipped draft and the run of its config);
    other benches take, in turn, the colours no run uses."""
    run_colour = {run.name: cycle[i % len(cycle)] for i, run in enumerate(runs)}
    by_directory = {(run.path if run.path.is_dir() else run.path.parent).resolve(): run.name for run in runs}
    spare = [c for c in cycle if c not in run_colour.values()] or cycle
    colour, unmatched = dict(run_colour), 0
    for bench in benches:
        draft = Path(str(bench.data.get("draft") or ""))
        match = by_directory.get(draft.resolve()) if draft.name else None
        if match is None and draft.name in run_colour:  # runs only: never another bench's name
            match = draft.name
        if match is None:
            colour[bench.name] = spare[unmatched % len(spare)]
            unmatched += 1
        else:
            colour[bench.name] = run_colour[match]
    return colour


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


__all__ = ["BenchSource", "RunSource", "load_sources", "sparkline", "summary_tables", "write_figure"]
