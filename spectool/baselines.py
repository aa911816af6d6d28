"""The baselines `spectool bench` times a draft against besides the target alone: HF `generate` (plain and with
prompt lookup, single and batched) and a method's reference package loop on the same checkpoint (the z-lab
`dflash` package). Each returns the answer tokens and the seconds they took."""

from __future__ import annotations

import time
from typing import Any

import torch

from spectool.decoding.accept import SamplingParams
from spectool.decoding.stops import StopStrings
from spectool.errors import SpectoolError, UsageError
from spectool.registry import get
from spectool.runtime import Runtime


def timed_hf(
    runtime: Runtime,
    ids: list[int],
    max_new_tokens: int,
    sampling: SamplingParams,
    stop_strings: StopStrings | None = None,
    **extra: Any,
):
    """HF generate (``extra``: e.g. prompt lookup); stop strings by the same rule as spectool's loop (HF's own
    ``stop_strings`` cannot read every tokenizer's vocabulary)."""
    if stop_strings is not None:
        extra["stopping_criteria"] = stop_criteria(stop_strings, len(ids))
    inputs = torch.tensor([ids], device=runtime.model.device)
    out, seconds = hf_generate(runtime, inputs, torch.ones_like(inputs), max_new_tokens, sampling, **extra)
    return out[0, len(ids) :].tolist(), seconds


def stop_criteria(stop_strings: StopStrings, prompt_width: int):
    """HF stopping criteria: a row is done once its answer (after `prompt_width`) holds a stop string."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAtStrings(StoppingCriteria):
        """Done rows: those whose answer holds one of the stop strings."""

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            done = [stop_strings.found_in(row[prompt_width:]) for row in input_ids.tolist()]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopAtStrings()])


def pad_id(runtime: Runtime) -> int:
    return runtime.tokenizer.pad_token_id or runtime.stop_token_ids[0]


def hf_generate(
    runtime: Runtime,
    inputs: torch.Tensor,
    mask: torch.Tensor,
    max_new_tokens: int,
    sampling: SamplingParams,
    **extra: Any,
) -> tuple[torch.Tensor, float]:
    """Timed HF generate with the same stop tokens and sampling as spectool's loops."""
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "eos_token_id": runtime.stop_token_ids}
    options["pad_token_id"] = pad_id(runtime)
    if sampling.greedy:
        options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        options.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    from transformers import GenerationConfig

    # The target's plain decoding, as spectool's loops do it: generation_config.json defaults such as a
    # repetition_penalty (Qwen2.5 ships 1.05) would change HF's greedy output, and transformers fills any option
    # left at its global default from the model's own config, so the model's config is swapped for a bare one.
    model, shipped = runtime.model, runtime.model.generation_config
    model.generation_config = GenerationConfig(bos_token_id=shipped.bos_token_id)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            out = model.generate(inputs, attention_mask=mask, **options, **extra)
    finally:
        model.generation_config = shipped
    return out, time.perf_counter() - start


def timed_hf_batch(
    runtime: Runtime,
    group: list[list[int]],
    max_new_tokens: int,
    sampling: SamplingParams,
    stop_strings: StopStrings | None = None,
):
    """HF generate over a left-padded batch; each row's answer ends at its first stop token, or with the token
    that completes a stop string (the rule of spectool's loops)."""
    model = runtime.model
    pad = pad_id(runtime)
    width = max(len(ids) for ids in group)
    inputs = torch.full((len(group), width), pad, dtype=torch.long, device=model.device)
    mask = torch.zeros_like(inputs)
    for row, ids in enumerate(group):
        inputs[row, width - len(ids) :] = torch.tensor(ids, device=model.device)
        mask[row, width - len(ids) :] = 1
    extra = {"stopping_criteria": stop_criteria(stop_strings, width)} if stop_strings is not None else {}
    out, seconds = hf_generate(runtime, inputs, mask, max_new_tokens, sampling, **extra)
    stops, answers = set(runtime.stop_token_ids), []
    for row in out[:, width:].tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
        if stop_strings is not None:
            end = next((i for i in range(1, end + 1) if stop_strings.completes_at(row, i)), end)
        answers.append(row[:end])
    return answers, seconds


def zlab_draft(runtime: Runtime):
    """The same DFlash checkpoint loaded by the z-lab `dflash` package."""
    if runtime.draft is None or "dflash-package" not in get(runtime.draft.method).package_baselines:
        raise UsageError("the dflash-package baseline needs a DFlash draft")
    try:
        from dflash.model import DFlashDraftModel
    except ImportError:
        raise UsageError("the dflash-package baseline needs the z-lab package: pip install --no-deps dflash") from None
    model = DFlashDraftModel.from_pretrained(runtime.draft.path, dtype=runtime.model.dtype)
    return model.to(runtime.model.device).eval()


def timed_zlab(zlab, runtime: Runtime, ids: list[int], max_new_tokens: int, sampling: SamplingParams):
    from dflash.model import dflash_generate

    inputs = torch.tensor([ids], device=runtime.model.device)
    forwards = []  # its stats need CUDA; count the target's forwards instead (the first one is the prefill)
    handle = runtime.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    start = time.perf_counter()
    try:
        with torch.no_grad():
            out = dflash_generate(
                zlab,
                runtime.model,
                inputs,
                max_new_tokens,
                runtime.stop_token_ids,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
            )
    except Exception as exc:  # third-party code tied to transformers versions: say whose failure it is
        raise SpectoolError(
            f"the z-lab dflash package failed in its own loop ({type(exc).__name__}: {exc}); it may not support "
            "this transformers version: drop dflash-package from --baselines"
        ) from None
    finally:
        handle.remove()
    seconds = time.perf_counter() - start
    new = out[0, len(ids) :].tolist()
    return new, seconds, (len(new) - 1, len(forwards) - 1)
