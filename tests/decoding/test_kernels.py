"""Matrix kernels chosen by measurement: every form computes F.linear's product, the choice follows the timings
(padding, column copies within their memory share, F.linear unless beaten by the margin), plans are cached per
machine, and the lean forward through forced plans keeps the transformers forward's logits and greedy tokens."""

import json

import pytest
import torch
import torch.nn.functional as F

from spectool.decoding import fast_target, kernels, native
from spectool.decoding.engine import Engine
from spectool.decoding.kernels import MEASURED_TOKENS, Choice, KernelPlan, PlannedLinear, choose, plan_for
from spectool.target import FrozenTarget
from tests.decoding.test_engine import PROMPTS, reference_greedy, run
from tests.decoding.test_fast_target import CONFIGS, assert_same, both, build


@pytest.mark.parametrize("form", kernels.FORMS)
@pytest.mark.parametrize("bias", [False, True])
def test_every_form_and_padding_computes_the_linear_product(form, bias):
    if form == "native" and native.library() is None:
        pytest.skip(f"no native kernel: {native.unavailable_reason()}")
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 32, generator=gen)
    b = torch.randn(48, generator=gen) if bias else None
    table = {1: Choice(form, 2), 2: Choice(form, 2), 3: Choice(form, 4), 6: Choice(form, 6)}
    linear = PlannedLinear(weight, b, table, column=form == "col")
    for shape in ((1, 1, 32), (1, 3, 32), (2, 3, 32), (1, 5, 32), (4, 32)):  # 5 tokens: not in the table
        x = torch.randn(*shape, generator=gen)
        out = linear(x)
        assert out.shape == (*shape[:-1], 48) and out.is_contiguous()
        torch.testing.assert_close(out, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)
    x = torch.randn(1, 3, 32, generator=gen).transpose(0, 1)  # a strided input (3 rows of one token)
    torch.testing.assert_close(linear(x), F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def test_a_column_form_needs_the_column_copy_and_the_copy_is_made_once():
    weight = torch.randn(8, 4)
    with pytest.raises(ValueError, match="column-major"):
        PlannedLinear(weight, None, {1: Choice("col", 1)}, column=False)
    first = PlannedLinear(weight, None, {1: Choice("col", 1)}, column=True)
    second = PlannedLinear(weight, None, {}, column=True)
    assert first.column.data_ptr() == second.column.data_ptr()
    assert first.column.stride() == (1, 8) and torch.equal(first.column, weight)


def timings(linear, wx, col):
    """Per-call seconds per form, each a list over MEASURED_TOKENS (a scalar repeats)."""
    return {
        form: (list(values) if isinstance(values, list) else [values] * len(MEASURED_TOKENS))
        for form, values in (("linear", linear), ("wx", wx), ("col", col))
    }


def test_choose_pads_to_a_cheaper_count_and_keeps_linear_within_the_margin():
    # wx costs 5 at 1 token and 2 from 2 tokens up; linear costs 1 per token (as measured: 1 2 3 4 5 6 7 8 10 12 16)
    linear = [float(m) for m in MEASURED_TOKENS]
    wx = [5.0] + [2.0] * (len(MEASURED_TOKENS) - 1)
    plan = choose({"mlp": timings(linear, wx, 100.0)}, {"mlp": 1000})
    table = plan.tables["mlp"]
    assert 1 not in table  # linear (1.0) is cheapest at one token
    assert 2 not in table  # wx ties linear at 2 tokens: a tie is no reason to leave F.linear
    assert table[3] == Choice("wx", 3) and table[9] == Choice("wx", 10) and table[16] == Choice("wx", 16)
    assert plan.columns == frozenset()
    near = choose({"mlp": timings(linear, [x * 0.99 for x in linear], 100.0)}, {"mlp": 1000})
    assert near.tables["mlp"] == {}  # 1% faster is noise: F.linear stays


def test_choose_takes_the_native_kernel_where_it_is_fastest_and_then_keeps_no_column_copy():
    linear = [float(m) for m in MEASURED_TOKENS]
    forms = timings(linear, 50.0, 0.8)  # the column copy would beat F.linear at one token...
    forms["native"] = [0.5] * 6 + [20.0] * (len(MEASURED_TOKENS) - 6)  # ...but the native kernel beats both
    plan = choose({"mlp": forms}, {"mlp": 1000})
    assert plan.columns == frozenset()
    assert all(plan.tables["mlp"][m] == Choice("native", m) for m in range(1, 7))
    assert 7 not in plan.tables["mlp"] and 16 not in plan.tables["mlp"]  # F.linear's 7.0 beats 20.0 there
    assert choose({"mlp": timings(linear, 50.0, 100.0)}, {"mlp": 1000}).tables["mlp"] == {}  # native not timed


def test_choose_keeps_the_native_kernel_within_the_margin_and_never_pads_it():
    """Within MARGIN of the fastest form the native kernel is taken (a token's products then do not depend on the
    rows beside it); beyond the margin the faster form wins; a cheaper larger count never pads the native kernel."""
    linear = [10.0] * len(MEASURED_TOKENS)
    forms = timings(linear, 1.0, 100.0)
    forms["native"] = [1.02] * 3 + [1.5] * 3 + [0.5] * (len(MEASURED_TOKENS) - 6)
    table = choose({"mlp": forms}, {"mlp": 1000}).tables["mlp"]
    assert [table[m] for m in (1, 2, 3)] == [Choice("native", m) for m in (1, 2, 3)]  # 1.02 vs wx's 1.0
    assert [table[m] for m in (4, 5, 6)] == [Choice("wx", m) for m in (4, 5, 6)]  # 1.5 vs 1.0: not padded to 7
    assert table[9] == Choice("native", 9) and table[16] == Choice("native", 16)


def test_choose_pads_up_when_a_larger_count_is_faster():
    wx = [4.0, 9.0, 9.0, 3.0] + [20.0] * (len(MEASURED_TOKENS) - 4)  # 4 rows cost less than 1, 2 or 3
    plan = choose({"head": timings(10.0, wx, 100.0)}, {"head": 1000})
    assert [plan.tables["head"][m] for m in (1, 2, 3, 4)] == [Choice("wx", 4)] * 4
    assert 5 not in plan.tables["head"]  # linear (10) beats padding 5 rows to 16 (20) or wx at 5 (20)


def test_column_copies_go_to_the_best_saving_per_byte_within_the_memory_share():
    # at one token the column copy saves 6 for "head" (600 bytes) and 3 for "mlp" (100 bytes): per byte, mlp first
    measured = {"head": timings(10.0, 10.0, [4.0] + [50.0] * 10), "mlp": timings(5.0, 5.0, [2.0] + [50.0] * 10)}
    sizes = {"head": 600, "mlp": 100, "rest": 1500}
    measured["rest"] = timings(1.0, 1.0, 9.0)
    plan = choose(measured, sizes)  # share 0.25 of 2200 = 550 bytes: mlp fits, head does not
    assert plan.columns == frozenset({"mlp"})
    assert plan.tables["mlp"][1] == Choice("col", 1) and 1 not in plan.tables["head"]
    assert all(c.form != "col" for m, c in plan.tables["mlp"].items() if m > 1)  # 50 there: linear or wx win
    bigger = choose(measured, {"head": 600, "mlp": 100, "rest": 3000})  # 925 bytes: both fit
    assert bigger.columns == frozenset({"mlp", "head"}) and bigger.tables["head"][1] == Choice("col", 1)


def test_a_plan_survives_its_json_and_refuses_a_malformed_one():
    plan = KernelPlan({"qkv": {1: Choice("wx", 2), 3: Choice("col", 4)}}, frozenset({"qkv"}), {})
    again = KernelPlan.from_json(json.loads(json.dumps(plan.to_json())))
    assert again.tables == plan.tables and again.columns == plan.columns
    for bad in ({**plan.to_json(), "version": 0}, {**plan.to_json(), "tables": {"qkv": {"3": ["wx", 2]}}}):
        with pytest.raises(ValueError):
            KernelPlan.from_json(bad)


@pytest.fixture
def weights(monkeypatch, tmp_path):
    """Two small 'layers' of two kinds and a head, with the small-model rule off and a fresh cache."""
    monkeypatch.setenv("SPECTOOL_CACHE", str(tmp_path))
    monkeypatch.delenv("SPECTOOL_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "_PLANS", {})
    gen = torch.Generator().manual_seed(0)
    return {
        "qkv": [torch.randn(96, 32, generator=gen) for _ in range(2)],
        "down": [torch.randn(32, 64, generator=gen) for _ in range(2)],
        "lm_head": [torch.randn(200, 32, generator=gen)],
    }


def test_small_models_keep_f_linear(weights):
    assert plan_for(weights) is kernels.PLAIN


def test_a_plan_is_measured_once_per_machine_and_read_back(weights, monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "SMALL_MODEL_BYTES", 0)
    lines = []
    plan = plan_for(weights, report=lines.append)
    assert len(lines) == 1 and "once" in lines[0]
    assert set(plan.timings) == {"qkv", "down", "lm_head"} and plan.measured_seconds > 0
    assert all(len(v) == len(MEASURED_TOKENS) for t in plan.timings.values() for v in t.values())
    stored = json.loads((tmp_path / "kernels.json").read_text())
    (key,) = stored
    assert kernels.cpu_name() in key and "qkv=96x32x2" in key and "lm_head=200x32x1" in key
    assert not any(hasattr(w, kernels._COLUMN_ATTRIBUTE) for ws in weights.values() for w in ws)  # temporary copies

    monkeypatch.setattr(kernels, "_PLANS", {})  # a new process: the file answers
    monkeypatch.setattr(kernels, "measure_plan", lambda _w: pytest.fail("measured again"))
    assert plan_for(weights, report=lines.append).tables == plan.tables and len(lines) == 1

    monkeypatch.setattr(kernels, "_PLANS", {})
    (tmp_path / "kernels.json").write_text("{not json")
    monkeypatch.setattr(kernels, "measure_plan", lambda _w: kernels.PLAIN)
    assert plan_for(weights) is kernels.PLAIN  # a broken cache file is measured again, not an error

    monkeypatch.setattr(kernels, "_PLANS", {})
    monkeypatch.setenv("SPECTOOL_KERNELS", "plain")
    monkeypatch.setattr(kernels, "measure_plan", lambda _w: pytest.fail("measured"))
    assert plan_for(weights) is kernels.PLAIN


def forced(form: str, rows_for) -> KernelPlan:
    """Every kind through `form`, token count m padded to rows_for(m)."""
    table = {m: Choice(form, rows_for(m)) for m in range(1, 17)}
    kinds = ("qkv", "o", "gate_up", "down", "lm_head")
    return KernelPlan({k: dict(table) for k in kinds}, frozenset(kinds if form == "col" else ()), {})


PLANS = {
    "wx": forced("wx", lambda m: m),
    "wx-padded": forced("wx", lambda m: 16 if m > 8 else max(2, m + m % 2)),
    "col": forced("col", lambda m: m),
    "linear-padded": forced("linear", lambda m: 16),
    "native": forced("native", lambda m: m),
}


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("name", ["qwen3", "llama-biases"])
def test_the_lean_forward_through_forced_plans_matches_transformers(plan, name, monkeypatch):
    if plan == "native" and native.library() is None:
        pytest.skip(f"no native kernel: {native.unavailable_reason()}")
    monkeypatch.setattr(fast_target, "plan_for", lambda *_a, **_k: PLANS[plan])
    model = build(CONFIGS[name]())
    slow, fast = both(model, [0, model.config.num_hidden_layers - 1])
    assert fast.kernel_plan is PLANS[plan]
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 256, (1, 9), generator=gen)
    assert_same(slow.forward(prompt), fast.forward(prompt))
    for width in (1, 2, 3, 5, 8, 12):
        block = torch.randint(0, 256, (1, width), generator=gen)
        assert_same(slow.forward(block), fast.forward(block))
    for prompt in PROMPTS:
        tokens, _ = run(Engine(FrozenTarget(model, [])), prompt, max_new_tokens=20)
        assert tokens == reference_greedy(model, prompt, 20)


@pytest.mark.parametrize("method", ["eagle3", "dspark", "eagle1"])
def test_a_planned_draft_proposes_what_the_plain_draft_proposes(method, monkeypatch, qwen3_target, qwen3_config):
    """`plan_draft` sends each of the draft's linear layers through its kind's choice (here forced to wx on an
    even row count): the drafts and their rounds are those of the same draft without a plan."""
    from tests.decoding.test_engine import make_engine

    plain = make_engine(method, qwen3_target, qwen3_config)
    planned = make_engine(method, qwen3_target, qwen3_config)
    table = {m: Choice("wx", 16 if m > 8 else m + m % 2) for m in range(1, 17)}

    def forced_plan(weights, **_options):
        assert all(kind.startswith("draft.") for kind in weights) and weights
        return KernelPlan({kind: dict(table) for kind in weights}, frozenset(), {})

    monkeypatch.setattr(kernels, "plan_for", forced_plan)
    plan = kernels.plan_draft(planned.proposer.draft)
    linears = [m for m in planned.proposer.draft.modules() if isinstance(m, torch.nn.Linear)]
    assert len(plan.tables) == len(linears) and all(isinstance(m.forward, PlannedLinear) for m in linears)
    for prompt in PROMPTS:
        expected, expected_stats = run(plain, prompt, max_new_tokens=20)
        tokens, stats = run(planned, prompt, max_new_tokens=20)
        assert tokens == expected == reference_greedy(qwen3_target, prompt, 20)
        assert [r.num_accepted for r in stats.rounds] == [r.num_accepted for r in expected_stats.rounds]


def test_a_draft_saved_in_bf16_reads_bf16_copies_and_proposes_the_same(monkeypatch, qwen3_target, qwen3_config):
    """A draft whose weights are all exact in bfloat16 (saved in bf16, loaded in float32) reads bf16 copies through
    the native kernel: no layer is timed, and the drafts and rounds are those of the same draft through F.linear."""
    from tests.decoding.test_engine import make_engine

    if native.library() is None:
        pytest.skip(f"no native kernel: {native.unavailable_reason()}")
    engines = [make_engine("eagle3", qwen3_target, qwen3_config) for _ in range(2)]
    for engine in engines:
        with torch.no_grad():
            for module in engine.proposer.draft.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.copy_(module.weight.to(torch.bfloat16).float())
    plain, halved = engines
    monkeypatch.setattr(kernels, "plan_for", lambda *_a, **_k: pytest.fail("a bf16 draft needs no timing"))
    assert kernels.plan_draft(halved.proposer.draft) is kernels.PLAIN
    linears = [m for m in halved.proposer.draft.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m.forward, kernels.HalfStoredLinear) for m in linears)
    assert all(m.forward.half.dtype == torch.bfloat16 for m in linears)
    for prompt in PROMPTS:
        expected, expected_stats = run(plain, prompt, max_new_tokens=20)
        tokens, stats = run(halved, prompt, max_new_tokens=20)
        assert tokens == expected == reference_greedy(qwen3_target, prompt, 20)
        assert [r.num_accepted for r in stats.rounds] == [r.num_accepted for r in expected_stats.rounds]
    with pytest.raises(ValueError, match="does not hold exactly"):
        kernels.HalfStoredLinear(torch.randn(4, 8), None)


def test_a_draft_beside_a_small_target_keeps_f_linear(weights, monkeypatch, qwen3_target, qwen3_config):
    """`load_runtime` plans the draft only where the target's products have a plan; `plan_draft` itself times a
    draft of any size (it runs after the target evicted it), unless kernels are turned off."""
    from tests.decoding.test_engine import make_engine

    engine = make_engine("eagle3", qwen3_target, qwen3_config)
    assert not engine.session.kernel_plan.tables  # a tiny target: plain
    monkeypatch.setenv("SPECTOOL_KERNELS", "plain")
    assert kernels.plan_draft(engine.proposer.draft) is kernels.PLAIN


@pytest.mark.parametrize("method", ["dflash", "eagle3"])
def test_a_borrowed_target_lm_head_runs_through_the_targets_plan(method, monkeypatch):
    """DFlash drafts a block through the target's lm_head: where the target's products have a plan, `load_runtime`
    gives the proposer the session's planned head (EAGLE-3 has its own head, planned with the draft). Either way
    the answers and the acceptance are those of the plain run."""
    from spectool.runtime import load_runtime

    def run_answers(runtime):
        prompt = runtime.prompt_ids([{"role": "user", "content": "Tell me about ships."}])
        return run(runtime.engine, prompt, max_new_tokens=24)

    plain = load_runtime(method, verify="full")
    assert not plain.engine.session.kernel_plan.tables
    expected, expected_stats = run_answers(plain)
    monkeypatch.setattr(fast_target, "plan_for", lambda *_a, **_k: PLANS["wx-padded"])
    monkeypatch.setattr(kernels, "plan_for", lambda weights, **_k: forced("wx", lambda m: m + m % 2))
    planned = load_runtime(method, verify="full")
    borrowed = getattr(planned.engine.proposer, "lm_head", None) is planned.engine.session.head_op
    assert borrowed == (method == "dflash")
    tokens, stats = run_answers(planned)
    assert tokens == expected
    assert [r.num_accepted for r in stats.rounds] == [r.num_accepted for r in expected_stats.rounds]
