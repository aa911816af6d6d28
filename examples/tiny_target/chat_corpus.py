"""Deterministic chat corpus for the embedded tiny target, built only from text that ships with Python.

Two sources, both read from the running interpreter (so the corpus is a pure function of the CPython
version and platform; it was built with CPython 3.11 on Linux):

* ``pydoc_data.topics.topics``: the 79 help topics behind ``help("for")`` and friends. Each topic is split
  at its underlined headings into sections; ``name(args)`` entries followed by an indented body (such as
  ``str.capitalize()`` or ``object.__len__(self)``) become one question each, and the remaining prose is
  grouped into answer-sized chunks.
* docstrings of a fixed, sorted list of standard-library modules (:data:`STDLIB_MODULES`): the module
  itself, its public functions and classes, and the public methods each class defines itself.

Every item becomes one single-turn conversation ``{"messages": [user, assistant]}`` whose question comes
from a few fixed templates picked by ``random.Random(0)``. Conversations are deduplicated by question and
by answer (first occurrence wins), and about 5% of them are held out by a hash of the question
(:func:`is_heldout`), so later sessions can prompt the target with questions it never trained on.

Use :func:`corpus` (``"train"``, ``"heldout"`` or ``"all"``) from Python, or ``build.py``, which writes
``train.jsonl`` and ``heldout.jsonl`` into its work dir.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import json
import random
import re
import subprocess
import sys
import sysconfig
import textwrap
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

#: Standard-library modules whose docstrings feed the corpus. Sorted; every one imports without side
#: effects. A module that fails to import on some interpreter is skipped (and the corpus changes).
STDLIB_MODULES: tuple[str, ...] = tuple(
    sorted(
        """
        abc argparse array ast asyncio base64 binascii bisect builtins bz2 calendar cmath codecs collections
        colorsys concurrent.futures configparser contextlib contextvars copy csv dataclasses datetime dbm
        decimal difflib dis doctest email.message enum filecmp fnmatch fractions functools getopt gettext
        glob graphlib gzip hashlib heapq hmac html html.parser http.client http.cookies inspect io ipaddress
        itertools json keyword linecache locale logging lzma math mimetypes multiprocessing numbers
        operator optparse os os.path pathlib pickle platform pprint queue random re reprlib sched secrets
        selectors shelve shlex shutil signal smtplib socket socketserver sqlite3 ssl stat statistics string
        struct subprocess sys sysconfig tarfile tempfile textwrap threading time timeit tokenize traceback
        types typing unicodedata unittest urllib.parse urllib.request uuid warnings weakref
        xml.dom.minidom xml.etree.ElementTree zipfile zlib
        """.split()
    )
)

#: Longest answer kept, in characters (about 200 tokens of the tiny target's tokenizer).
MAX_ANSWER_CHARS = 800
#: Shortest answer kept, in characters.
MIN_ANSWER_CHARS = 24
#: Fraction of conversations held out by question hash (in thousandths, so the test is integer-exact).
HELDOUT_PER_MILLE = 50
#: Longest and shortest source-code answer kept, in characters (``--source-code``).
MAX_SOURCE_CHARS = 700
MIN_SOURCE_CHARS = 40
#: Standard-library folders whose code is not read for source-code answers (tests, demos, the IDE).
SOURCE_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "idlelib", "lib2to3", "turtledemo", "site-packages"})
#: Seed of the ``random.Random`` that picks question templates.
TEMPLATE_SEED = 0

MODULE_TEMPLATES = (
    "What is the {name} module?",
    "What does Python's {name} module provide?",
    "Describe the {name} module.",
    "What is {name} used for in Python?",
)
CLASS_TEMPLATES = (
    "What is the {name} class?",
    "What is `{name}` used for?",
    "Describe {name}.",
    "Explain the {name} class in Python.",
)
FUNCTION_TEMPLATES = (
    "What does `{name}` do?",
    "How do I use {name}?",
    "Explain {name}.",
    "What is {name} in Python?",
)
SECTION_TEMPLATES = (
    "Explain {name} in Python.",
    "What is {name}?",
    "Tell me about {name}.",
    "Can you describe {name}?",
)
SOURCE_TEMPLATES = (
    "Show me the source of `{name}`.",
    "How is `{name}` implemented?",
    "Write `{name}` the way the standard library does.",
)
CONTINUATION_TEMPLATES = (
    "Tell me more about {name} (part {part}).",
    "Continue explaining {name}, part {part}.",
    "What else should I know about {name}? (part {part})",
)

_HEADING_UNDERLINE = re.compile(r"^([*=\-~^])\1*$")
_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?!?([^`]+)`")
_DOUBLE_BACKTICK = re.compile(r"``([^`]+)``")
_SENTENCE_END = re.compile(r"[.!?:;]['\")\]]?(?=\s)")


@dataclass(frozen=True)
class Item:
    """One question-worthy piece of documentation before a question template is chosen."""

    kind: str  # "module", "class", "function", "section" or "continuation"
    name: str  # what the question asks about
    answer: str  # cleaned answer text
    part: int = 1  # chunk number for continuations


# --------------------------------------------------------------------------------------------------------
# Text cleaning


def _is_prose(lines: list[str]) -> bool:
    """True for a paragraph of wrapped prose that can be reflowed into one line.

    Code, doctests, lists and column-aligned tables keep their line breaks.
    """
    for line in lines:
        if line[:1].isspace() or line.lstrip().startswith((">>>", "...", "- ", "* ", "+ ", "|", "%")):
            return False
        if "   " in line.strip() or line.rstrip().endswith("::"):
            return False
    return True


def split_paragraphs(text: str) -> list[str]:
    """Split text on blank lines, dropping trailing whitespace but keeping each paragraph's indentation."""
    paragraphs = re.split(r"\n[ \t]*\n", text.expandtabs(8))
    return [p.rstrip() for p in (p.strip("\n") for p in paragraphs) if p.strip()]


def clean_paragraph(paragraph: str) -> str:
    """Normalise one paragraph: reflow prose, keep code verbatim (right-stripped), simplify RST markup."""
    paragraph = _ROLE.sub(r"`\1`", paragraph)
    paragraph = _DOUBLE_BACKTICK.sub(r"`\1`", paragraph)
    lines = [line.rstrip() for line in paragraph.split("\n")]
    if _is_prose(lines):
        return " ".join(" ".join(line.split()) for line in lines)
    indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
    return "\n".join(line[indent:] for line in lines)


def _cut(paragraph: str, room: int, first: bool) -> str:
    """The longest clean prefix of ``paragraph`` within ``room`` characters, or ``""``.

    Code and tables are cut at a line end (at least five lines, or nothing); prose at a sentence end,
    or, for the first paragraph of an answer only, at a word boundary marked with `` ...``.
    """
    if "\n" in paragraph:
        lines: list[str] = []
        size = 0
        for line in paragraph.split("\n"):
            if size + len(line) + 1 > room:
                break
            lines.append(line)
            size += len(line) + 1
        return "\n".join(lines) if len(lines) >= 5 else ""
    head = paragraph[:room]
    ends = [m.end() for m in _SENTENCE_END.finditer(head + " ") if m.end() >= 40]
    if ends:
        sentence = head[: ends[-1]].rstrip()
        return sentence[:-1] + "." if sentence.endswith((":", ";")) else sentence
    return head.rsplit(" ", 1)[0].rstrip() + " ..." if first else ""


def truncate(paragraphs: list[str], max_chars: int = MAX_ANSWER_CHARS) -> str:
    """Join paragraphs into at most ``max_chars`` characters, cutting only at clean boundaries.

    An answer never ends on a lead-in such as "For example:" whose example was cut; an answer that would
    be nothing but such a lead-in becomes ``""``.
    """
    kept: list[str] = []
    size = 0
    for paragraph in paragraphs:
        room = max_chars - size - (2 if kept else 0)
        if len(paragraph) > room:
            partial = _cut(paragraph, room, first=not kept)
            if partial:
                kept.append(partial)
            break
        kept.append(paragraph)
        size += len(paragraph) + (2 if len(kept) > 1 else 0)
    while len(kept) > 1 and kept[-1].endswith(":"):
        kept.pop()
    text = "\n\n".join(kept)
    return "" if text.endswith(":") else text


def clean_docstring(doc: str | None) -> str:
    """Dedent, normalise and truncate a docstring; ``""`` when there is nothing worth keeping."""
    if not doc or not doc.strip():
        return ""
    paragraphs = [clean_paragraph(p) for p in split_paragraphs(inspect.cleandoc(doc))]
    text = truncate(paragraphs)
    return text if len(text) >= MIN_ANSWER_CHARS else ""


# --------------------------------------------------------------------------------------------------------
# Source 1: pydoc help topics


def _sentence_subject(heading: str) -> str:
    """Lower-case a heading's first letter for use inside a question ("The "for" statement" -> "the ...").

    Headings in title case ("Format String Syntax") or starting with an acronym ("OR Patterns") stay.
    """
    words = heading.split()
    if words[0][:1].isupper() and words[0][1:].islower() and not any(w[:1].isupper() for w in words[1:]):
        return heading[0].lower() + heading[1:]
    return heading


def _sections(text: str) -> Iterator[tuple[str, str]]:
    """Yield ``(heading, body)`` for every underlined heading of a pydoc topic."""
    lines = text.expandtabs(8).split("\n")
    heading, body = "", []
    i = 0
    while i < len(lines):
        line = lines[i]
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if line.strip() and _HEADING_UNDERLINE.match(nxt) and len(nxt) == len(line):
            if heading or any(b.strip() for b in body):
                yield heading, "\n".join(body)
            heading, body = line.strip(), []
            i += 2
            continue
        body.append(line)
        i += 1
    yield heading, "\n".join(body)


def _dedent(paragraph: str, width: int) -> str:
    """Remove up to ``width`` leading spaces from every line (pydoc indents entry bodies by three)."""
    return "\n".join(line[min(width, len(line) - len(line.lstrip(" "))) :] for line in paragraph.split("\n"))


_DEFINITION = re.compile(
    r"(class )?[A-Za-z_][\w.]*\(.*\)"  # str.center(width[, fillchar]), class list([iterable])
    r"|[a-z_!][\w.]*(\(\w+\))?( .*)?"  # object.__slots__, d(own) [count], x in dictview
)


_FUNCTION_WORDS = {"a", "an", "as", "by", "is", "of", "the", "to", "with"}


def _is_definition(paragraph: str, following: str | None) -> bool:
    """A one-line, unindented ``name(args)`` paragraph whose body follows indented (pydoc's entry format)."""
    return (
        following is not None
        and following.startswith("   ")
        and len(paragraph) <= 100
        and not paragraph.rstrip().endswith((":", "."))
        and _DEFINITION.fullmatch(paragraph) is not None
        and paragraph.split()[-1] not in _FUNCTION_WORDS  # prose such as "was translated to"
    )


def _chunks(paragraphs: list[str]) -> list[str]:
    """Group prose paragraphs (with the code blocks that follow them) into answer-sized chunks."""
    chunks: list[list[str]] = []
    current: list[str] = []
    size = 0
    for paragraph in paragraphs:
        is_code = paragraph[:1].isspace()
        text = clean_paragraph(paragraph)
        if current and not is_code and size + len(text) > MAX_ANSWER_CHARS:
            chunks.append(current)
            current, size = [], 0
        current.append(text)
        size += len(text) + 2
    if current:
        chunks.append(current)
    out = []
    for chunk in chunks:
        text = truncate(chunk)
        if len(text) >= MIN_ANSWER_CHARS:
            out.append(text)
    return out


def topic_items() -> Iterator[Item]:
    """Items from ``pydoc_data.topics``, in sorted topic order."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        sections = list(_sections(topics[key]))
        title = sections[0][0] or key
        for heading, body in sections:
            if not heading:
                heading = title
            subject = _sentence_subject(heading)
            if heading != title:
                subject = f"{subject} ({_sentence_subject(title)})"
            paragraphs = split_paragraphs(body)
            prose: list[str] = []
            i = 0
            while i < len(paragraphs):
                following = paragraphs[i + 1] if i + 1 < len(paragraphs) else None
                if _is_definition(paragraphs[i], following):
                    name = paragraphs[i].strip()
                    j = i + 1
                    while j < len(paragraphs) and paragraphs[j].startswith("   "):
                        j += 1
                    body = [clean_paragraph(_dedent(p, 3)) for p in paragraphs[i + 1 : j]]
                    answer = truncate(body)
                    if len(answer) >= MIN_ANSWER_CHARS:
                        yield Item("function", name, answer)
                    i = j
                    continue
                prose.append(paragraphs[i])
                i += 1
            for part, chunk in enumerate(_chunks(prose), start=1):
                yield Item("section" if part == 1 else "continuation", subject, chunk, part)


# --------------------------------------------------------------------------------------------------------
# Source 2: standard-library docstrings


def _import(name: str):
    """Import a module quietly; ``None`` when it is unavailable on this interpreter."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - any import failure just drops the module
        return None


#: C modules whose objects a Python module re-exports under its own name.
_EXTRA_HOMES = {"os": ("posix",)}


def _signature(display: str, obj) -> str:
    """``display(args)`` when the signature is short and free of object addresses, else ``""``."""
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""
    if "<" in sig or " at 0x" in sig or len(sig) > 100:
        return ""
    return f"{display}{sig}"


def _function_answer(display: str, obj) -> str:
    """Cleaned docstring, led by the call signature when it is known and the docstring does not show it."""
    doc = clean_docstring(getattr(obj, "__doc__", None))
    if not doc:
        return ""
    short_name = display.rsplit(".", 1)[-1]
    signature = _signature(display, obj)
    if signature and not doc.startswith(short_name + "(") and len(signature) + len(doc) <= MAX_ANSWER_CHARS:
        return f"`{signature}`\n\n{doc}"
    return doc


def _owned_by(obj, home: set[str]) -> bool:
    """True when ``obj`` is defined by one of the module names in ``home`` (or their submodules)."""
    owner = getattr(getattr(obj, "__func__", obj), "__module__", None)
    if not isinstance(owner, str):
        return False
    return owner in home or any(owner.startswith(h + ".") for h in home)


def docstring_items() -> Iterator[Item]:
    """Items from the docstrings of :data:`STDLIB_MODULES`, in sorted module then sorted name order."""
    seen: set[int] = set()
    for module_name in STDLIB_MODULES:
        module = _import(module_name)
        if module is None:
            continue
        last = module_name.rsplit(".", 1)[-1]
        home = {module_name, module.__name__, "_" + last, *_EXTRA_HOMES.get(module_name, ())}
        answer = clean_docstring(module.__doc__)
        if answer:
            yield Item("module", module_name, answer)
        prefix = "" if module_name == "builtins" else module_name + "."
        for attr in sorted(vars(module)):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr)
            if id(obj) in seen or not _owned_by(obj, home):
                continue
            if inspect.isclass(obj):
                seen.add(id(obj))
                answer = clean_docstring(obj.__doc__)
                if answer:
                    yield Item("class", prefix + attr, answer)
                yield from _method_items(prefix + attr, obj)
            elif callable(obj) and (inspect.isroutine(obj) or inspect.ismethod(obj)):
                seen.add(id(obj))
                answer = _function_answer(prefix + attr, obj)
                if answer:
                    yield Item("function", prefix + attr, answer)


def _method_items(class_display: str, cls) -> Iterator[Item]:
    """Public methods (including class and static methods) that ``cls`` defines itself."""
    for attr, raw in sorted(vars(cls).items()):
        if attr.startswith("_"):
            continue
        func = raw.__func__ if isinstance(raw, (classmethod, staticmethod)) else raw
        if not (inspect.isfunction(func) or inspect.ismethoddescriptor(func) or inspect.isbuiltin(func)):
            continue
        if isinstance(func, property):
            continue
        display = f"{class_display}.{attr}"
        answer = _function_answer(display, func)
        if answer:
            yield Item("function", display, answer)


# --------------------------------------------------------------------------------------------------------
# Conversations


def question_for(item: Item, rng: random.Random) -> str:
    """Render the question for ``item`` with a template picked by ``rng`` (one draw per item)."""
    templates = {
        "module": MODULE_TEMPLATES,
        "class": CLASS_TEMPLATES,
        "function": FUNCTION_TEMPLATES,
        "section": SECTION_TEMPLATES,
        "continuation": CONTINUATION_TEMPLATES,
        "source": SOURCE_TEMPLATES,
    }[item.kind]
    return rng.choice(templates).format(name=item.name, part=item.part)


def is_heldout(question: str) -> bool:
    """Deterministic ~5% hold-out by SHA-256 of the question text (independent of Python's hash seed)."""
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < HELDOUT_PER_MILLE


# --------------------------------------------------------------------------------------------------------
# Optional third source: the standard library's own code


def _source_of(node: ast.AST, lines: list[str]) -> str:
    """A function's source (decorators included), dedented and cut at a line end to MAX_SOURCE_CHARS."""
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    kept: list[str] = []
    size = 0
    for line in textwrap.dedent("\n".join(lines[first - 1 : node.end_lineno])).splitlines():
        if size + len(line) + 1 > MAX_SOURCE_CHARS:
            break
        kept.append(line.rstrip())
        size += len(line) + 1
    while kept and not kept[-1].strip():
        kept.pop()
    return "\n".join(kept)


def source_items() -> Iterator[Item]:
    """Every function and method of the standard library's non-test modules, as source code (sorted by path).

    Parsed with ``ast`` from the files (nothing is imported); about 13k items, 4.2M characters on 3.11.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if SOURCE_SKIP_DIRS & set(relative.parts):
            continue
        module = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = text.splitlines()
        for node in tree.body:
            named = []
            if isinstance(node, functions):
                named.append((f"{module}.{node.name}", node))
            elif isinstance(node, ast.ClassDef):
                named += [(f"{module}.{node.name}.{sub.name}", sub) for sub in node.body if isinstance(sub, functions)]
            for name, function in named:
                answer = _source_of(function, lines)
                if len(answer) >= MIN_SOURCE_CHARS:
                    yield Item("source", name, answer)


def _items(source_code: bool = False) -> Iterator[Item]:
    yield from topic_items()
    yield from docstring_items()
    if source_code:  # after the documentation, so its questions, templates and hold-out stay the same
        yield from source_items()


def build_conversations(source_code: bool = False) -> list[tuple[str, str, bool]]:
    """Every conversation as ``(question, answer, heldout)``, deduplicated, in build order.

    The result depends on which modules the interpreter has already imported (an imported submodule or a
    lazily created attribute adds names to its package), so :func:`corpus` runs this in a fresh
    interpreter.
    """
    rng = random.Random(TEMPLATE_SEED)
    seen_questions: set[str] = set()
    seen_answers: set[str] = set()
    out = []
    for item in _items(source_code):
        question = question_for(item, rng)
        q_key = " ".join(question.lower().split())
        a_key = " ".join(item.answer.split())
        if q_key in seen_questions or a_key in seen_answers:
            continue
        seen_questions.add(q_key)
        seen_answers.add(a_key)
        out.append((question, item.answer, is_heldout(question)))
    return out


@lru_cache(maxsize=2)
def _all_conversations(source_code: bool = False) -> tuple[tuple[str, str, bool], ...]:
    """:func:`build_conversations` run in a fresh, site-free interpreter, whatever the caller imported."""
    command = [sys.executable, "-S", "-s", "-B", str(Path(__file__).resolve()), "--json"]
    command += ["--source-code"] if source_code else []
    env = {"PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8"}
    result = subprocess.run(command, env=env, capture_output=True, check=True)
    return tuple((q, a, bool(h)) for q, a, h in json.loads(result.stdout.decode("utf-8")))


def to_messages(question: str, answer: str) -> dict:
    """One conversation in the JSONL chat format."""
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def corpus(split: str = "train", source_code: bool = False) -> list[dict]:
    """The conversations of one split: ``"train"`` (~95%), ``"heldout"`` (~5%) or ``"all"``.

    ``source_code`` adds :func:`source_items` (the standard library's functions as code answers).

    Each is ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}``, in a fixed order.
    """
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', not {split!r}")
    return [
        to_messages(q, a)
        for q, a, held in _all_conversations(source_code)
        if split == "all" or held == (split == "heldout")
    ]


if __name__ == "__main__":
    if sys.argv[1:2] == ["--json"] and sys.argv[2:] in ([], ["--source-code"]):
        conversations = build_conversations(source_code=sys.argv[2:] == ["--source-code"])
        sys.stdout.write(json.dumps(conversations, ensure_ascii=False))
    else:
        raise SystemExit("usage: chat_corpus.py --json [--source-code]  (from Python, use corpus(split))")
