"""Run under ``torchrun --nproc-per-node 2``: for each method, the loss, metrics and draft gradients computed with
the frozen target's decoder layers sharded over the processes (`shard_frozen_target`) equal those computed with the
whole target in the same process. Each process reads a different batch (the trainer gives each its own rows).
Prints one ``ok METHOD`` line per method on rank 0; exits non-zero on the first difference."""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
from transformers import Qwen3Config, Qwen3ForCausalLM

from spectool.target import FrozenTarget
from spectool.training.distributed import init_distributed, shard_frozen_target
from spectool.training.objectives import make_objective
from tests.training.objectives.conftest import make_draft

#: Tolerances: the same float32 products, summed in another order only where a layer's weight is gathered.
RTOL, ATOL = 1e-5, 1e-6
OPTIONS = {"dflash": dict(num_anchors=4), "dspark": dict(num_anchors=4), "eagle3": dict(ttt_steps=2)}


def main() -> int:
    context = init_distributed("cpu")
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=512, tie_word_embeddings=False,
    )  # fmt: skip
    whole = Qwen3ForCausalLM(config).eval().requires_grad_(False)
    sharded = copy.deepcopy(whole)
    kept, total = shard_frozen_target(sharded, context)
    assert kept < total, (kept, total)
    generator = torch.Generator().manual_seed(100 + context.rank)
    ids = torch.randint(0, 240, (2, 24), generator=generator)
    mask = torch.ones_like(ids)
    loss_mask = mask.clone()
    loss_mask[:, :4] = 0
    for method in ("eagle1", "eagle3", "dflash", "dspark"):
        results = []
        for target in (whole, sharded):
            draft = make_draft(method, whole, seed=3)
            objective = make_objective(method, draft, **OPTIONS.get(method, {}))
            frozen = FrozenTarget(target, objective.target_layer_ids)
            batch = frozen.capture(ids, mask, loss_mask, return_logits=objective.needs_target_logits)
            out = objective(
                batch, target_lm_head=target.lm_head, target_embed=target.get_input_embeddings(),
                generator=torch.Generator().manual_seed(5),
            )  # fmt: skip
            out.loss.backward()
            grads = {n: p.grad.clone() for n, p in draft.named_parameters() if p.grad is not None}
            results.append((float(out.loss), {k: float(v) for k, v in out.metrics.items()}, grads))
        (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = results
        assert abs(loss_a - loss_b) <= RTOL * abs(loss_a) + ATOL, (method, loss_a, loss_b)
        assert metrics_a.keys() == metrics_b.keys() and grads_a.keys() == grads_b.keys() and grads_a, method
        for key in metrics_a:
            assert abs(metrics_a[key] - metrics_b[key]) <= RTOL * abs(metrics_a[key]) + ATOL, (method, key)
        for name in grads_a:
            assert torch.allclose(grads_a[name], grads_b[name], rtol=RTOL, atol=ATOL), (method, name)
        if context.is_main:
            print(f"ok {method} loss {loss_a:.6f} (kept {kept} of {total} bytes)", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
