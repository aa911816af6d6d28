"""The decoding loops on a GPU (skipped without CUDA; run them on a machine that has one).

Exact equality is checked in float32: in bfloat16 a verify forward over k tokens and k forwards over one token
may round a near-tie differently, which is a property of the arithmetic, not of the loop."""

import pytest
import torch
from transformers import Qwen3ForCausalLM

from spectool.decoding.batch import BatchEngine
from spectool.decoding.engine import Engine, TargetSession
from spectool.decoding.fast_target import FastTargetSession
from spectool.decoding.proposers import make_proposer
from spectool.drafts import build_draft
from spectool.target import FrozenTarget
from tests.conftest import tiny_qwen3_config
from tests.decoding.test_engine import LAYER_IDS, PROMPTS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def cuda_target(dtype):
    torch.manual_seed(0)
    return Qwen3ForCausalLM(tiny_qwen3_config()).eval().to("cuda", dtype)


def test_lean_forward_tracks_transformers_in_bf16():
    target = cuda_target(torch.bfloat16)
    slow, fast = TargetSession(FrozenTarget(target, [0])), FastTargetSession(FrozenTarget(target, [0]))
    prompt = torch.tensor([PROMPTS[2]], device="cuda")
    (a, _), (b, _) = slow.forward(prompt), fast.forward(prompt)
    torch.testing.assert_close(b.float(), a.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("method", ["dflash", "dspark", "eagle3"])
def test_speculative_equals_target_alone_on_cuda(method):
    target = cuda_target(torch.float32)
    torch.manual_seed(1)
    options = {"block_size": 4, "mask_token_id": 255} if method in ("dflash", "dspark") else {}
    draft = build_draft(method, target.config, target_layer_ids=LAYER_IDS[method], **options).eval().to("cuda")
    if method == "dspark":
        draft.copy_target_weights(target)
    spec = Engine(FrozenTarget(target, LAYER_IDS[method]), make_proposer(method, draft, target))
    alone = Engine(FrozenTarget(target, []))
    for prompt in PROMPTS:
        ours = [t for r in spec.generate(prompt, max_new_tokens=24) for t in r.tokens]
        assert ours == [t for r in alone.generate(prompt, max_new_tokens=24) for t in r.tokens]
    batched = BatchEngine(FrozenTarget(target, LAYER_IDS[method]), make_proposer(method, draft, target))
    rows = batched.generate(PROMPTS, max_new_tokens=24)
    alone_rows = BatchEngine(FrozenTarget(target, [])).generate(PROMPTS, max_new_tokens=24)
    assert [r.tokens for r in rows] == [r.tokens for r in alone_rows]
