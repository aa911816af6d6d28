"""The frozen target and its hidden-state capture.

One forward pass of the target with forward hooks collects exactly the features a draft needs, without
``output_hidden_states=True`` (which keeps all N+1 hidden states alive). Layer ids follow one convention:

* id ``i`` in ``[0, N-2]``: the OUTPUT of decoder layer i, i.e. HF ``hidden_states[i + 1]``;
* id ``-1``: the embedding output, i.e. the stream entering layer 0 (HF ``hidden_states[0]``);
* id ``N-1``: the POST-final-norm hidden state (HF ``hidden_states[N]`` is already normed), not the raw output
  of the last layer.

Hooks exist only for the duration of one ``capture`` call and are always removed, even on error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

import torch
from torch import nn

from spectool.errors import SpectoolError, UsageError

FINAL_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f")


@dataclass
class TargetBatch:
    """What the target gives a draft trainer for a batch.

    ``target_hidden_states`` [B, S, K*H] concatenates the selected ids in order; ``target_last_hidden_states``
    [B, S, H] is the post-norm last hidden state (what lm_head consumes); ``target_logits`` [B, S, V] only when
    requested.
    """

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    target_hidden_states: torch.Tensor
    target_last_hidden_states: torch.Tensor
    attention_mask: torch.Tensor | None = None
    target_logits: torch.Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TargetBatch:
        """On ``device``; with ``dtype``, the floating tensors (features, logits) also cast to it."""

        def move(v: torch.Tensor) -> torch.Tensor:
            return v.to(device, dtype) if dtype is not None and v.is_floating_point() else v.to(device)

        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return TargetBatch(**{k: move(v) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})


def find_decoder(model: nn.Module) -> nn.Module:
    """The module that owns the decoder layers: ``model.model`` (causal LM), ``model`` itself (bare decoder),
    or ``model.model.language_model`` (multimodal)."""
    candidates = (
        getattr(getattr(model, "model", None), "language_model", None),
        getattr(model, "model", None),
        getattr(model, "language_model", None),
        model,
    )
    for candidate in candidates:
        if isinstance(candidate, nn.Module) and isinstance(getattr(candidate, "layers", None), nn.ModuleList):
            return candidate
    raise SpectoolError(
        f"cannot find the decoder layers of {type(model).__name__}: expected model.model.layers, model.layers or "
        "model.model.language_model.layers"
    )


def home_device(model: nn.Module) -> torch.device:
    """Where a target's input embedding runs: the device its tokens go to, and where the decoding engine keeps its
    tensors and the draft. For a model spread by accelerate (`hf_device_map`) the map says (an offloaded embedding
    runs on the CPU); otherwise the first parameter's device."""
    placement = getattr(model, "hf_device_map", None)
    if not placement:
        return next(model.parameters()).device
    embedding = model.get_input_embeddings()
    name = next(name for name, module in model.named_modules() if module is embedding)
    owners = [key for key in placement if key == "" or name == key or name.startswith(key + ".")]
    where = placement[max(owners, key=len)] if owners else next(iter(placement.values()))
    if isinstance(where, int):
        return torch.device("cuda", where)
    return torch.device("cpu" if where == "disk" else where)


class FrozenTarget:
    """A target model in eval mode with frozen weights, capturing the features at ``target_layer_ids``.

    An empty ``target_layer_ids`` captures only the post-norm last hidden state (EAGLE-1).
    """

    def __init__(self, model: nn.Module, target_layer_ids: Sequence[int]) -> None:
        self.model = model.eval()
        model.requires_grad_(False)
        self.decoder = find_decoder(model)
        self.layers: nn.ModuleList = self.decoder.layers
        self.final_norm = next(
            (
                getattr(self.decoder, n)
                for n in FINAL_NORM_NAMES
                if isinstance(getattr(self.decoder, n, None), nn.Module)
            ),
            None,
        )
        if self.final_norm is None:
            raise SpectoolError(f"cannot find the final norm of {type(model).__name__} (looked for {FINAL_NORM_NAMES})")
        self.num_layers = len(self.layers)
        ids = list(target_layer_ids)
        if any(not isinstance(i, int) or not -1 <= i <= self.num_layers - 1 for i in ids):
            raise UsageError(f"target layer ids must be integers in [-1, {self.num_layers - 1}], got {ids}")
        self.target_layer_ids = ids
        # The body is called rather than the full model so no full-vocabulary logits are computed unless asked.
        self._body = model.model if isinstance(getattr(model, "model", None), nn.Module) else model

    @property
    def lm_head(self) -> nn.Module | None:
        head = getattr(self.model, "lm_head", None)
        if head is None and hasattr(self.model, "get_output_embeddings"):
            head = self.model.get_output_embeddings()
        return head

    @property
    def embed_tokens(self) -> nn.Module:
        return self.model.get_input_embeddings()

    @contextlib.contextmanager
    def capture_hooks(self, store: dict[int | str, torch.Tensor]) -> Iterator[None]:
        """Fill ``store`` during forwards run inside the block (also used by the decoding engine, whose target
        forwards carry a KV cache); the hooks are removed on exit."""
        handles = []

        def keep(key: int | str):
            def hook(_module: nn.Module, _inputs: object, output: object) -> None:
                store[key] = output[0] if isinstance(output, tuple) else output

            return hook

        def keep_layer0_input(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            store[-1] = args[0] if args else kwargs["hidden_states"]

        try:
            for layer_id in set(self.target_layer_ids):
                if layer_id == -1:
                    handles.append(self.layers[0].register_forward_pre_hook(keep_layer0_input, with_kwargs=True))
                elif layer_id < self.num_layers - 1:
                    handles.append(self.layers[layer_id].register_forward_hook(keep(layer_id)))
            handles.append(self.final_norm.register_forward_hook(keep("final_norm")))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def features_from(self, store: dict[int | str, torch.Tensor]) -> torch.Tensor:
        """``[B, S, K*H]``: the selected ids from a store filled under ``capture_hooks`` (N-1 = post-norm)."""
        last = store["final_norm"]
        selected = [last if i == self.num_layers - 1 else store[i].to(last.device) for i in self.target_layer_ids]
        return torch.cat(selected, dim=-1) if selected else last.new_zeros(*last.shape[:-1], 0)

    @torch.no_grad()
    def capture(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        *,
        return_logits: bool = False,
    ) -> TargetBatch:
        """Run the target once over ``input_ids`` [B, S] and return the selected features.

        ``loss_mask`` defaults to ``attention_mask`` (or all ones).
        """
        store: dict[int | str, torch.Tensor] = {}
        with self.capture_hooks(store):
            self._body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=False)
        last = store["final_norm"]
        features = self.features_from(store)
        logits = None
        if return_logits:
            if self.lm_head is None:
                raise SpectoolError("this target has no lm_head; logits are unavailable")
            logits = self.lm_head(last)
        if loss_mask is None:
            loss_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        return TargetBatch(
            input_ids=input_ids,
            loss_mask=loss_mask,
            target_hidden_states=features,
            target_last_hidden_states=last,
            attention_mask=attention_mask,
            target_logits=logits,
        )

    __call__ = capture
