"""`spectool serve` as clients use it: the real `openai` client (and raw HTTP for what it cannot send) against a
server started on a free loopback port, with the shipped DSpark draft on the embedded tiny target."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

KEY = "test-key"
PROMPTS = [
    f"Tell me about {topic}." for topic in ("cats", "rivers", "numbers", "music", "trees", "ships", "bread", "snow")
]


class ServerProcess:
    """`spectool serve --port 0 ...` in a subprocess; its address read from the line it prints."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "spectool", "serve", "--port", "0", *args]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.log: list[str] = []
        threading.Thread(target=self._drain, args=(self.process.stderr,), daemon=True).start()
        line = self.process.stdout.readline()  # blocks until the server listens (or exits)
        if "http://" not in line:
            self.process.kill()
            raise AssertionError(f"the server did not start: {line!r} {self.log}")
        self.url = line.split("http://")[1].split()[0]  # 127.0.0.1:PORT/v1
        self.base = "http://" + self.url.removesuffix("/v1")
        self.rest: list[str] = []
        threading.Thread(target=self._drain, args=(self.process.stdout, self.rest), daemon=True).start()

    def _drain(self, stream, into: list[str] | None = None) -> None:
        for line in stream:
            (self.log if into is None else into).append(line)

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://{self.url}", api_key=key, max_retries=0, timeout=120)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def server():
    process = ServerProcess("--draft", "dspark", "--verify", "full", "--api-key", KEY)
    yield process
    assert process.stop() == 0


def chat(client: openai.OpenAI, prompt: str, **kwargs):
    kwargs = {"temperature": 0, "max_tokens": 40, **kwargs}
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}], **kwargs)


def streamed(client: openai.OpenAI, prompt: str, **kwargs) -> tuple[str, list]:
    chunks = list(chat(client, prompt, stream=True, **kwargs))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list()] == ["tiny"]
    health = httpx.get(f"{server.base}/health").json()  # open without the key: for load balancers' probes
    assert health["status"] == "ok"


def test_greedy_answers_equal_chat_prompt_streamed_or_not(server):
    client = server.client()
    whole = chat(client, PROMPTS[0])
    text, chunks = streamed(client, PROMPTS[0], stream_options={"include_usage": True})
    cli = subprocess.run(
        [sys.executable, "-m", "spectool", "chat", "--prompt", PROMPTS[0], "-n", "40", "--plain"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True,
    )  # fmt: skip
    assert cli.stdout.startswith(whole.choices[0].message.content + "\n")
    assert text == whole.choices[0].message.content
    assert whole.choices[0].finish_reason == chunks[-2].choices[0].finish_reason
    assert whole.usage.completion_tokens == chunks[-1].usage.completion_tokens <= 40
    extension = whole.model_extra["spectool"]
    assert extension["drafted_tokens"] > 0 and extension["acceptance_length"] >= 1
    assert chunks[-2].model_extra["spectool"]["drafted_tokens"] == extension["drafted_tokens"]


def test_eight_concurrent_streams_each_get_their_own_answer(server):
    client = server.client()
    alone = [streamed(client, p)[0] for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: streamed(server.client(), p)[0], PROMPTS))
    assert together == alone
    assert len(set(alone)) > 1


def test_a_stop_string_ends_the_text_before_it(server):
    client = server.client()
    full = chat(client, PROMPTS[1]).choices[0].message.content
    words = full.split()
    stop = words[len(words) // 2]
    expected = full[: full.index(stop)]
    answer = chat(client, PROMPTS[1], stop=[stop])
    assert (answer.choices[0].message.content, answer.choices[0].finish_reason) == (expected, "stop")
    assert streamed(client, PROMPTS[1], stop=stop)[0] == expected


def test_sampling_with_a_seed_repeats_and_text_completions_work(server):
    client = server.client()
    first, second = (chat(client, PROMPTS[2], temperature=0.8, seed=7).choices[0].message.content for _ in "ab")
    assert first == second
    done = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0)
    pieces = client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in pieces if c.choices) == done.choices[0].text
    assert done.object == "text_completion" and done.usage.completion_tokens == 12


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, 400, None),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}, 400,
         "context_length_exceeded"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "word " * 3000}]}, 400, "context_length_exceeded"),
        ({"model": "tiny", "messages": []}, 400, None),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400, None),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, None),
    ],
)  # fmt: skip
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, body, status, code):
    response = httpx.post(f"{server.base}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"] and error["type"] and error["code"] == code
    assert chat(server.client(), "hi", max_tokens=3).choices[0].message.content is not None


def test_malformed_json_and_a_wrong_key(server):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    response = httpx.post(f"{server.base}/v1/chat/completions", content=b"{not json", headers=headers)
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        chat(server.client(key="wrong"), "hi")
    assert httpx.get(f"{server.base}/v1/models").status_code == 401


def test_a_client_leaving_mid_stream_frees_the_engine(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPTS[3]}], "max_tokens": 1500,
            "temperature": 0, "stream": True}  # fmt: skip
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{server.base}/v1/chat/completions", json=body, headers=headers) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break  # one piece of text came: leave
    start = time.monotonic()
    assert chat(server.client(), "hi", max_tokens=3).choices[0].message.content is not None
    assert time.monotonic() - start < 30
    deadline = time.monotonic() + 10
    while not any("client left" in line for line in server.log) and time.monotonic() < deadline:
        time.sleep(0.1)
    stopped = [line for line in server.log if "client left" in line]
    assert stopped and "1500 new tokens" not in stopped[0]


def test_sigterm_finishes_the_answer_under_way_and_exits_0():
    process = ServerProcess("--draft", "dspark")
    result: list = []
    client = process.client(key="unused")
    reader = threading.Thread(target=lambda: result.append(streamed(client, PROMPTS[4], max_tokens=300)))
    reader.start()
    deadline = time.monotonic() + 60
    while not httpx.get(f"{process.base}/health").json()["answering"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.stop() == 0
    reader.join(timeout=60)
    text, chunks = result[0]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length") and text
    assert "stopped on SIGTERM after 1 answer" in "".join(process.rest)


def test_serve_refuses_bad_usage_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from spectool.cli import app

    result = CliRunner().invoke(app, ["serve", "--draft", str(tmp_path / "none")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["serve", "--port", "70000"])
    assert result.exit_code == 2 and "--port" in result.output
