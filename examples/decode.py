"""spectool's decoding engine from Python: one prompt round by round, then a batch of prompts.

    python examples/decode.py                 # the shipped DSpark draft and its tiny target
    python examples/decode.py --draft ./my-dflash-draft --max-new-tokens 64

Each round the draft proposes, the target verifies in one forward and keeps the agreeing prefix plus its own
token; `RoundEvent`s say what happened. The answer equals the target's own greedy decoding.
"""

from __future__ import annotations

import argparse

from spectool.decoding.batch import BatchEngine
from spectool.decoding.engine import GenerationStats
from spectool.runtime import load_runtime

QUESTIONS = ["What does the with statement do?", "How do I sort a list of tuples?", "What is a generator?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draft", default="dspark", help="draft directory, or a shipped draft's name")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()

    runtime = load_runtime(args.draft, device="cpu")  # the target comes from the draft's spectool.json
    prompts = [runtime.prompt_ids([{"role": "user", "content": q}]) for q in QUESTIONS]

    # One prompt, round by round: [accepted drafts] then the target's own token.
    rounds = []
    for event in runtime.engine.generate(
        prompts[0], max_new_tokens=args.max_new_tokens, stop_token_ids=runtime.stop_token_ids
    ):
        rounds.append(event)
        drafts = runtime.decode(event.tokens[: event.num_accepted])
        own = runtime.decode(event.tokens[event.num_accepted :])
        print(f"{event.kind:>10}  drafted {event.num_drafted}  accepted [{drafts}]  target: [{own}]")
    stats = GenerationStats(rounds)
    answer = [token for event in rounds for token in event.tokens]
    print(f"\n{runtime.decode(answer)}\nacceptance length {stats.acceptance_length:.2f}\n")

    # The same target alone gives the same answer (greedy decoding is lossless).
    alone = runtime.target_engine.generate(
        prompts[0], max_new_tokens=args.max_new_tokens, stop_token_ids=runtime.stop_token_ids
    )
    assert [token for event in alone for token in event.tokens] == answer

    # Several prompts at once (DFlash / DSpark drafts on Llama / Qwen-family targets).
    if runtime.draft.method in ("dflash", "dspark"):
        batch = BatchEngine(runtime.engine.session.target, runtime.engine.proposer)  # the same proposer, batched
        for question, row in zip(
            QUESTIONS,
            batch.generate(prompts, max_new_tokens=args.max_new_tokens, stop_token_ids=runtime.stop_token_ids),
            strict=True,
        ):
            tau = GenerationStats(row.rounds).acceptance_length
            print(f"{question}\n  -> {runtime.decode(row.tokens)[:100]!r}  (acceptance length {tau:.2f})")


if __name__ == "__main__":
    main()
