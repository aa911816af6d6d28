"""Throughput of `spectool serve` with 1 and with N concurrent clients, measured with the `openai` client.

Starts `spectool serve --port 0 --draft DRAFT` in a subprocess, asks each of the first PROMPTS MT-Bench questions
(first turns, greedy, `--max-tokens` each) once with one client at a time, then REQUESTS requests (cycling over
the questions) from N threads at once, and prints the completion tokens per second of each run (all answers'
tokens over the wall time), the slowest answer's wall time, and the server's own acceptance figures. Greedy
answers must not depend on the concurrency: the script counts errors and answers that differ from their
one-client answer (exit 1 if any).

    python examples/serve_load.py --draft smollm2-eagle3 --clients 8 --max-tokens 64 --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def start_server(draft: str) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "spectool", "serve", "--draft", draft, "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=os.environ)
    line = process.stdout.readline()
    if "http://" not in line:
        process.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return process, "http://" + line.split("http://")[1].split()[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draft", default="smollm2-eagle3")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, help="concurrent requests in all, cycling over the prompts [prompts]")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import openai

    from spectool.bench import machine_description
    from spectool.bench_prompts import load_prompt_set

    questions = [p.messages for p in load_prompt_set("mt-bench", turns=1).prompts[: args.prompts]]
    process, url = start_server(args.draft)
    try:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=3600)
        model = client.models.list().data[0].id

        def ask(messages):
            started = time.perf_counter()
            try:
                answer = client.chat.completions.create(
                    model=model, messages=messages, temperature=0, max_tokens=args.max_tokens
                )
            except openai.OpenAIError:
                return None, time.perf_counter() - started
            return answer, time.perf_counter() - started

        ask(questions[0])  # warm-up: kernel plans, caches
        requests = args.requests or len(questions)
        runs, errors = {}, 0
        cycled = [questions[i % len(questions)] for i in range(requests)]
        for clients, batch in ((1, questions), (args.clients, cycled)):
            started = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                results = list(pool.map(ask, batch))
            wall = time.perf_counter() - started
            errors += sum(a is None for a, _ in results)
            answered = [a for a, _ in results if a is not None]
            extension = [a.model_extra["spectool"] for a in answered]
            runs[clients] = {
                "requests": len(batch),
                "tokens_per_second": round(sum(a.usage.completion_tokens for a in answered) / wall, 2),
                "slowest_answer_seconds": round(max(s for _, s in results), 2),
                "acceptance_length": round(sum(e["acceptance_length"] or 1 for e in extension) / len(extension), 3),
                "texts": [a.choices[0].message.content if a is not None else None for a, _ in results],
            }
        alone = runs[1]["texts"]
        mismatches = sum(t != alone[i % len(alone)] for i, t in enumerate(runs[args.clients]["texts"]))
        same = mismatches == 0 and errors == 0
    finally:
        process.terminate()
        process.wait(timeout=60)
    report = {
        "draft": args.draft,
        "model": model,
        "prompts": len(questions),
        "max_tokens": args.max_tokens,
        "machine": machine_description(),
        "runs": {str(k): {key: v for key, v in run.items() if key != "texts"} for k, run in runs.items()},
        "errors": errors,
        "mismatches": mismatches,
        "answers_equal_across_concurrency": same,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for clients, run in report["runs"].items():
            print(
                f"{clients} client(s): {run['tokens_per_second']} tok/s, slowest answer {run['slowest_answer_seconds']} s,"
                f" acceptance length {run['acceptance_length']}"
            )
        print(f"{errors} errors, {mismatches} mismatches against one-client answers; {report['machine']}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
