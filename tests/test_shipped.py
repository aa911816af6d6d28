"""The drafts shipped inside the package (spectool/assets/drafts) for the embedded tiny target: each finds its
target without --target, decodes losslessly, and keeps the acceptance length measured when it was shipped."""

from pathlib import Path

import pytest

from spectool import gguf
from spectool.bench_prompts import load_prompts
from spectool.decoding.engine import GenerationStats
from spectool.hub import ASSETS_DIR, DEFAULT_MODEL_DIR
from spectool.runtime import load_runtime

SHIPPED = ASSETS_DIR / "drafts"
REPO = Path(__file__).resolve().parents[1]
# Greedy acceptance length on the first 6 held-out prompts, 48 new tokens each, a little below what the
# shipped weights measured (README, "Results"); a random draft of the same shape stays near 1.0.
MIN_ACCEPTANCE = {"dspark": 1.8, "dflash": 1.8, "eagle3": 2.0}  # measured 1.93, 1.96, 2.21
#: Drafts shipped for a packaged real model (tests/test_real_model.py runs them).
REAL_DRAFTS = sorted(p.shipped_draft for p in gguf.PACKAGED if p.shipped_draft)


@pytest.fixture(scope="module")
def prompts():
    return load_prompts(ASSETS_DIR / "prompts" / "heldout.jsonl")[:6]


@pytest.mark.parametrize("method", sorted(MIN_ACCEPTANCE))
def test_shipped_draft_is_lossless_with_its_acceptance(method, prompts):
    runtime = load_runtime(SHIPPED / method)  # the target comes from the draft's spectool.json
    assert runtime.info.ref == "tiny" and runtime.info.directory == DEFAULT_MODEL_DIR  # recorded by its name
    assert runtime.draft.method == method and not runtime.warnings
    rounds = []
    for conversation in prompts:
        ids = runtime.prompt_ids(conversation)
        spec = list(runtime.engine.generate(ids, max_new_tokens=48, stop_token_ids=runtime.stop_token_ids))
        alone = list(runtime.target_engine.generate(ids, max_new_tokens=48, stop_token_ids=runtime.stop_token_ids))
        assert [t for r in spec for t in r.tokens] == [t for r in alone for t in r.tokens]
        rounds += spec
    assert GenerationStats(rounds).acceptance_length >= MIN_ACCEPTANCE[method]


def test_examples_link_to_the_shipped_drafts():
    for method in [*MIN_ACCEPTANCE, *REAL_DRAFTS]:
        link = REPO / "examples" / "drafts" / method
        assert link.resolve() == (SHIPPED / method).resolve()


def test_shipped_weights_stay_within_budget():
    real = [SHIPPED / name for name in REAL_DRAFTS]
    weights = sum(
        p.stat().st_size for p in ASSETS_DIR.rglob("*.safetensors") if not any(p.is_relative_to(r) for r in real)
    )
    assert weights <= 40 * 2**20, f"the tiny target and its drafts take {weights / 2**20:.1f} MiB"
    for directory in real:  # bfloat16, at most ~30 MB each
        size = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
        assert 0 < size <= 30 * 2**20, f"{directory.name} takes {size / 2**20:.1f} MiB"


def test_a_shipped_draft_loads_by_name_from_any_directory(tmp_path, monkeypatch):
    from spectool.checkpoint import load_draft
    from spectool.errors import UsageError
    from spectool.paths import shipped_drafts

    monkeypatch.chdir(tmp_path)
    assert shipped_drafts() == sorted([*MIN_ACCEPTANCE, *REAL_DRAFTS])
    assert load_draft("dspark").path == SHIPPED / "dspark"
    (tmp_path / "dspark").mkdir()  # an existing path wins over the shipped name
    with pytest.raises(UsageError, match="has no config.json"):
        load_draft("dspark")
    with pytest.raises(UsageError, match="drafts shipped with spectool: dflash, dspark, eagle3, smollm2-eagle3"):
        load_draft("no-such-draft")
