"""Training objectives, one module per draft family, each readable top to bottom like its paper's section.

An objective is built with its draft and hyper-parameters (``make_objective(method, draft, **hparams)``) and called
once per batch of target features::

    objective = make_objective(method, draft)  # a registered method's name
    target = FrozenTarget(model, objective.target_layer_ids)
    batch = target.capture(input_ids, attention_mask, loss_mask, return_logits=objective.needs_target_logits)
    out = objective(batch, target_lm_head=model.lm_head, target_embed=model.get_input_embeddings(),
                    generator=generator, position_ids=position_ids, document_ids=document_ids)
    out.loss.backward(); log(out.metrics)

Methods and classes (each class's constructor takes its hyper-parameters with their defaults; those a user may
set are the method's declared objective options, `DraftMethod.options`):

* ``eagle1``: ``Eagle1Objective``
* ``eagle3``: ``Eagle3Objective``, the only one that needs target logits
* ``dflash``: ``DFlashObjective``
* ``dspark``: ``DSparkObjective``

Every objective reports ``loss``, its components, ``acc@k``, ``prefix@k`` and ``acceptance_length`` (bonus token
included), with the same meaning for every method (draft position k = the k-th drafted token, counted over the
chains or blocks supervised through k): ``acc@k`` is the top-1 hit rate at position k, ``prefix@k`` the rate at
which positions 1..k ALL hit (what greedy verification accepts through k), and the greedy acceptance length is
``1 + sum_k prefix@k``. The module docstrings say exactly what each one measures.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from spectool.errors import UsageError
from spectool.registry import get

from .base import Documents, Objective, ObjectiveOutput
from .blocks import default_gamma, sample_anchors
from .dflash import DFlashObjective
from .dspark import DSparkObjective
from .eagle1 import Eagle1Objective
from .eagle3 import Eagle3Objective, build_draft_vocab, count_supervised_tokens


def make_objective(method: str, draft: nn.Module, **hparams: Any) -> Objective:
    """The objective of ``method`` (a registered method's name) for ``draft``; unknown methods or
    hyper-parameters are usage errors."""
    cls = get(method).objective_class()
    accepted = [name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "draft")]
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        raise UsageError(f"unknown {method} objective option(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}")
    return cls(draft, **hparams)


__all__ = [
    "DFlashObjective",
    "DSparkObjective",
    "Documents",
    "Eagle1Objective",
    "Eagle3Objective",
    "Objective",
    "ObjectiveOutput",
    "build_draft_vocab",
    "count_supervised_tokens",
    "default_gamma",
    "make_objective",
    "sample_anchors",
]
