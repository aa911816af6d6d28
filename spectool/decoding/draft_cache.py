"""The draft's KV cache during decoding: one row per prompt, each row at its own length, preallocated.

A single prompt is a batch of one, and then the cache is a plain append-and-crop cache (one slice write per layer,
no padding, no mask). With several rows, row b's new keys/values go after row b's own cached positions; the
positions past a row's length hold padding that the proposer masks out and later rounds overwrite.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: Positions allocated at the first write (the cache then grows by doubling).
_INITIAL_CAPACITY = 64


class RaggedDraftCache:
    """A draft's keys/values for several rows of different lengths, preallocated.

    `update` (called by each draft layer, as a `DraftKVCache` is) writes the new positions of every row after that
    row's own length and returns the keys/values up to the longest row; `advance` then moves each row's length by
    its real (unpadded) count, and assigning `lengths` crops rows back (the EAGLE chain's speculative positions).
    """

    def __init__(self, num_layers: int, rows: int, device: torch.device) -> None:
        self.lengths = [0] * rows
        self.device = device
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self._index: torch.Tensor | None = None

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this call's `k`/`v` [B, heads, W, dim] for one layer; every row's cached keys/values after."""
        rows, heads, width, dim = k.shape
        end = max(self.lengths) + width
        keys = self.keys[layer_idx]
        if keys is None or keys.shape[2] < end:
            capacity = max(_INITIAL_CAPACITY, end * 2)
            grown_k = k.new_zeros(rows, heads, capacity, dim)
            grown_v = v.new_zeros(rows, heads, capacity, dim)
            if keys is not None:
                grown_k[:, :, : keys.shape[2]] = keys
                grown_v[:, :, : keys.shape[2]] = self.values[layer_idx]
            self.keys[layer_idx], self.values[layer_idx] = grown_k, grown_v
        if rows == 1:
            self.keys[layer_idx][:, :, end - width : end] = k
            self.values[layer_idx][:, :, end - width : end] = v
        else:
            if layer_idx == 0 or self._index is None:
                positions = torch.tensor(self.lengths, device=k.device)[:, None] + torch.arange(width, device=k.device)
                self._index = positions[:, None, :, None].expand(rows, heads, width, dim)
            self.keys[layer_idx].scatter_(2, self._index, k)
            self.values[layer_idx].scatter_(2, self._index, v)
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def advance(self, counts: Sequence[int]) -> None:
        """Each row keeps `counts[b]` more of the positions the last forward wrote."""
        self.lengths = [length + count for length, count in zip(self.lengths, counts, strict=True)]

    def positions(self, width: int) -> torch.Tensor:
        """[B, width]: the positions of `width` new tokens after each row's cached ones."""
        if len(self.lengths) == 1:
            return torch.arange(self.lengths[0], self.lengths[0] + width, device=self.device).unsqueeze(0)
        starts = torch.tensor(self.lengths, device=self.device)
        return starts[:, None] + torch.arange(width, device=self.device)

    def causal_mask(self, positions: torch.Tensor) -> torch.Tensor | None:
        """Boolean [B, 1, W, cached + W] for new tokens at `positions` [B, W]: each sees its row's cached positions
        and its own new ones up to itself. None for one row: the draft's own causal rule is the same mask."""
        if len(self.lengths) == 1:
            return None
        keys = max(self.lengths) + positions.shape[1]
        return (torch.arange(keys, device=self.device) <= positions[:, :, None]).unsqueeze(1)

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only these rows, in this order (finished rows leave a batched generation)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            if k is not None:
                self.keys[i], self.values[i] = k.index_select(0, index), v.index_select(0, index)
        self.lengths = [self.lengths[r] for r in rows]
