"""The house rules of ARCHITECTURE.md, checked on the code: imports only run down the layers and never in a circle,
a method's name and its options' names are spelled only in its own modules, and no file or function outgrows what
one reading holds."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from spectool import registry

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "spectool"

#: The layers, top to bottom (ARCHITECTURE.md): a module may import from its own layer or any below it.
LAYERS = {
    "cli": 5,
    "apps": 4,
    "training": 3,
    "decoding": 3,
    "models": 2,
    "core": 1,
}
APPS = {
    "spectool.runtime",
    "spectool.bench",
    "spectool.bench_prompts",
    "spectool.baselines",
    "spectool.draft_init",
    "spectool.export",
    "spectool.answers",
    "spectool.serve",
    "spectool.inspection",
    "spectool.report",
    "spectool.demo",
    "spectool.vocabulary",
}
MODELS = {"spectool.checkpoint", "spectool.target"}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[1:2] == ["cli"] or module == "spectool.__main__":
        return "cli"
    if module in APPS:
        return "apps"
    if parts[1:2] in (["training"], ["decoding"]):
        return parts[1]
    if parts[1:2] == ["drafts"] or module in MODELS:
        return "models"
    return "core"


def module_files() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The spectool modules `name` imports anywhere in its file (function-level imports included)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("spectool"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("spectool"):
                for alias in node.names:
                    candidate = f"{target}.{alias.name}"
                    found.add(candidate if candidate in known else target)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def test_imports_never_run_up_a_layer():
    upward = [
        f"{name} ({layer_of(name)}) imports {other} ({layer_of(other)})"
        for name, targets in import_graph().items()
        for other in targets
        if LAYERS[layer_of(other)] > LAYERS[layer_of(name)]
    ]
    assert not upward, "\n".join(upward)


def test_imports_form_no_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def own_modules(method: str) -> set[Path]:
    """Where a method may spell its own name: its declaration and the modules named after it."""
    stems = {method, type(registry.get(method)).__module__.rsplit(".", 1)[-1]}
    return {p for p in PACKAGE.rglob("*.py") if p.stem in stems}


def test_method_names_are_spelled_only_in_their_own_modules():
    allowed = {PACKAGE / "registry.py", *(PACKAGE / "methods").glob("*.py")}
    found = []
    for method in registry.method_names():
        literal = re.compile(rf"""["']{method}["']""")
        for path in PACKAGE.rglob("*.py"):
            if path in allowed or path in own_modules(method):
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if literal.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def declared_modules(method: str) -> set[Path]:
    """The modules a method names as its own: its declaration (and its bases' in `spectool.methods`, less the
    abstract `base`) and those of its draft model, config, objective and proposer."""
    found, files = registry.get(method), module_files()
    names = {cls.__module__ for cls in type(found).__mro__ if cls.__module__.startswith("spectool.methods.")}
    names -= {"spectool.methods.base"}
    for reference in (found.draft_model, found.draft_config, found.objective, found.proposer):
        names.add(reference.partition(":")[0] if isinstance(reference, str) else reference.__module__)
    return {files[name] for name in names if name in files}


def sibling_imports(path: Path) -> set[Path]:
    """The modules of its own package that the module at `path` imports."""
    files = module_files()
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            name = f"{package}.{node.module}" if node.level == 1 else node.module
            if name.rsplit(".", 1)[0] == package and name in files:
                found.add(files[name])
    return found


def option_homes(name: str) -> set[Path]:
    """Where option `name` may be spelled: the declared modules of the methods that declare it, and the helpers
    those import that only such methods import (the block methods' shared modules, not every method's base)."""
    declaring = {method.name for method in registry.declaring_methods(name)}
    homes = {path for method in declaring for path in declared_modules(method)}
    importers: dict[Path, set[str]] = {}
    for method in registry.method_names():
        for path in declared_modules(method):
            for helper in sibling_imports(path):
                importers.setdefault(helper, set()).add(method)
    return homes | {helper for helper, methods in importers.items() if methods <= declaring}


def test_method_options_are_spelled_only_in_their_methods_modules():
    """A method's option (`DraftMethod.options`) is named only where the methods that declare it live: the command
    line, `TrainConfig`, `DraftSpec`, `inspect` and the resume check are built from the declarations."""
    found = []
    for name in registry.declared_options():
        homes = option_homes(name)
        word = re.compile(rf"\b{name}\b")
        for path in PACKAGE.rglob("*.py"):
            if path in homes:
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if word.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert registry.declared_options(), "no method declares an option: the check would pass vacuously"
    assert not found, "\n".join(found)


#: Attributes that only one method's draft or proposer has: probing for them is asking which method it is.
METHOD_PROBES = ("markov_head", "midlayer", "scheduler", "enable_confidence_head", "pruned_vocab", "owns_embeddings")


def test_no_attribute_probe_tells_methods_apart():
    probe = re.compile(rf"""(hasattr|getattr)\([^)]*["']({"|".join(METHOD_PROBES)})["']""")
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in PACKAGE.rglob("*.py")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if probe.search(line)
    ]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_files_and_functions_stay_readable(path):
    source = path.read_text(encoding="utf-8")
    assert len(source.splitlines()) <= 600, f"{path.relative_to(ROOT)} has {len(source.splitlines())} lines"
    cli_signature = path.parent.name == "cli"
    long = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            start = node.body[0].lineno if cli_signature else node.lineno  # a command's options are its signature
            if node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
                start = max(start, node.body[0].end_lineno + 1)  # docstrings are not code
            length = node.end_lineno - start + 1
            if length > 80:
                long.append(f"{node.name} ({length} lines)")
    assert not long, f"{path.relative_to(ROOT)}: {', '.join(long)}"


def test_every_public_class_has_a_docstring():
    missing = [
        f"{path.relative_to(ROOT)}: {node.name}"
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_") and ast.get_docstring(node) is None
    ]
    assert not missing, "\n".join(missing)
