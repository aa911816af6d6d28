"""Write the tiny target's prompt files from its corpus (examples/tiny_target/chat_corpus.py).

    python examples/data/make_prompts.py --source-code    # the shipped files, byte for byte
    python examples/data/make_prompts.py                  # for a documentation-only target (no --source-code)

Writes, as {"prompt": ...} JSON lines:

* examples/data/train_prompts.jsonl: every training question of the target, in corpus order (with
  --source-code: shuffled by random.Random(0), so that any first N, as `spectool data regen --limit N` and
  the demo take them, mix documentation and source-code questions as the corpus does);
* examples/data/heldout_prompts.jsonl: every held-out question (never trained on, no overlap);
* spectool/assets/prompts/heldout.jsonl: `spectool bench`'s default set, the first 24 held-out questions
  (with --source-code: the first 12 source-code and the first 12 documentation questions, alternating).

The answers are then the target's own, regenerated with spectool (all 16,154 prompts: about 45 minutes on 2
CPU cores; the run resumes after a kill), and the demo trains on the first 800:

    spectool data regen --target spectool/assets/tiny-qwen3 --prompts examples/data/train_prompts.jsonl \\
        --out examples/data/regen_train.jsonl --batch-size 32
    head -n 800 examples/data/regen_train.jsonl > spectool/assets/data/demo_train.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "tiny_target"))

import chat_corpus  # noqa: E402

BENCH_PROMPTS = 24


def questions(split: str, source_code: bool) -> list[str]:
    return [c["messages"][0]["content"] for c in chat_corpus.corpus(split, source_code)]


def bench_set(heldout: list[str], source_code: bool) -> list[str]:
    """The default bench prompts: the first held-out questions, half of them code when the corpus has code."""
    if not source_code:
        return heldout[:BENCH_PROMPTS]
    openings = tuple(template.split("{name}")[0] for template in chat_corpus.SOURCE_TEMPLATES)
    code_questions = {question for question in heldout if question.startswith(openings)}
    docs = [q for q in heldout if q not in code_questions][: BENCH_PROMPTS // 2]
    code = [q for q in heldout if q in code_questions][: BENCH_PROMPTS - len(docs)]
    # Alternating, so that any first N (bench --limit, the demo's 8) mix both kinds.
    return [q for pair in zip(code, docs, strict=True) for q in pair]


def write(path: Path, prompts: list[str]) -> None:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8")
    print(f"{path.relative_to(ROOT)}: {len(prompts)} prompts")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source-code", action="store_true", help="the corpus of build.py --source-code")
    args = parser.parse_args()
    train, heldout = questions("train", args.source_code), questions("heldout", args.source_code)
    if set(train) & set(heldout):
        raise SystemExit("a question is in both splits; the corpus hold-out is broken")
    if args.source_code:
        random.Random(0).shuffle(train)
    write(ROOT / "examples" / "data" / "train_prompts.jsonl", train)
    write(ROOT / "examples" / "data" / "heldout_prompts.jsonl", heldout)
    write(ROOT / "spectool" / "assets" / "prompts" / "heldout.jsonl", bench_set(heldout, args.source_code))


if __name__ == "__main__":
    main()
