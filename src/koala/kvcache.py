"""The KV cache of the decode loop and its edits: keep the verified path, drop finished rows, add joining rows.

transformers' DynamicCache appends by concatenation: every layer copies its whole cache on every forward (1-2 ms
of a ~40 ms one-token SmolLM2 step at 256-1,024 cached tokens on 2 CPU threads, growing with the context).
`ReservedCache` is a DynamicCache whose keys and values are views into a buffer with spare columns: appending
writes the new columns in place and the buffer doubles when full, so each column is copied O(1) times over a
generation. Everything that reads `layer.keys` / `layer.values` (attention, the edits below) sees ordinary tensors.
A cache may store another dtype than the model computes in: float64 for koala.exact_attention, which then reads
it as is instead of converting the whole cache on every forward (bf16, 30 layers, q=1: 3.6 -> 2.5 ms over 256
cached tokens, 10.0 -> 6.7 ms over 800).
"""
from __future__ import annotations

from functools import partial

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

MIN_COLUMNS = 256  # the first reservation: a typical prompt plus some replies fits before the first doubling


def _inside(view: torch.Tensor, buffer: torch.Tensor | None) -> bool:
    """Whether `view` is the leading columns of `buffer` (after in-place edits and cuts, not after a copy)."""
    return (buffer is not None and view.data_ptr() == buffer.data_ptr() and view.shape[:2] == buffer.shape[:2]
            and view.stride() == buffer.stride())


def _reserve(old: torch.Tensor, new: torch.Tensor, columns: int, dtype: torch.dtype | None) -> torch.Tensor:
    """A buffer of at least `columns` columns (doubling), holding `old` in its leading columns."""
    size = max(MIN_COLUMNS, 2 * columns)
    buffer = new.new_empty(*new.shape[:2], size, new.shape[-1], dtype=dtype or new.dtype)
    if old.numel():
        buffer[:, :, :old.shape[-2]] = old
    return buffer


class ReservedLayer(DynamicLayer):
    """One layer's keys/values as views into buffers with spare columns (see the module docstring), stored in
    `storage` (None: the dtype of the states written)."""

    def __init__(self, storage: torch.dtype | None = None) -> None:
        super().__init__()
        self.storage = storage

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.key_buffer = self.value_buffer = None
        n = self.keys.shape[-2] if self.keys.numel() else 0
        end = n + key_states.shape[-2]
        self.reserve(end, key_states, value_states)
        self.key_buffer[:, :, n:end] = key_states
        self.value_buffer[:, :, n:end] = value_states
        return self.extend(end)

    def reserve(self, end: int, key_like: torch.Tensor, value_like: torch.Tensor) -> None:
        """Make the buffers hold at least `end` columns, the current keys and values in their leading ones."""
        if not (_inside(self.keys, self.key_buffer) and _inside(self.values, self.value_buffer)
                and end <= self.key_buffer.shape[-2]):
            self.key_buffer = _reserve(self.keys, key_like, end, self.storage)
            self.value_buffer = _reserve(self.values, value_like, end, self.storage)

    def extend(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values become the buffers' first `end` columns (written in place before)."""
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values


class ReservedCache(DynamicCache):
    """A DynamicCache of ReservedLayers: appends in place, edits below work unchanged."""

    def __init__(self, storage: torch.dtype | None = None) -> None:
        Cache.__init__(self, layer_class_to_replicate=partial(ReservedLayer, storage))


@torch.inference_mode()  # the cache holds inference tensors, which may only be edited in place in this mode
def keep_paths(cache: DynamicCache, lengths: list[int], width: int, kept: list[list[int]]) -> list[int]:
    """Compact a batched cache after verification and return the new per-row lengths.

    Row b keeps its history [0, lengths[b]) and the block columns width + kept[b][j], moved in order to
    lengths[b] + j; the cache is then cut to the longest row, so it never holds more than the longest sequence.
    """
    moves = [(b, width + node, n + j) for b, (n, nodes) in enumerate(zip(lengths, kept))
             for j, node in enumerate(nodes) if width + node != n + j]  # (row, from column, to column)
    new = [n + len(nodes) for n, nodes in zip(lengths, kept)]
    end = max(new)
    for layer in cache.layers:
        if moves:
            r, s, d = torch.tensor(moves, dtype=torch.long, device=layer.keys.device).T
            layer.keys[r, :, d, :] = layer.keys[r, :, s, :]
            layer.values[r, :, d, :] = layer.values[r, :, s, :]
        layer.keys = layer.keys[..., :end, :]
        layer.values = layer.values[..., :end, :]
    return new


@torch.inference_mode()
def drop_rows(cache: DynamicCache, keep: list[int], length: int) -> None:
    """Keep only the batch rows `keep` of the cache, cut to `length` columns (finished sequences stop costing)."""
    for layer in cache.layers:
        idx = torch.tensor(keep, dtype=torch.long, device=layer.keys.device)
        layer.keys = layer.keys[idx, :, :length]
        layer.values = layer.values[idx, :, :length]


@torch.inference_mode()
def add_rows(cache: DynamicCache, count: int) -> None:
    """Append `count` empty rows (valid length 0) to the cache, for sequences joining a running batch."""
    for layer in cache.layers:
        if layer.is_initialized:
            layer.keys = torch.cat([layer.keys, layer.keys.new_zeros(count, *layer.keys.shape[1:])])
            layer.values = torch.cat([layer.values, layer.values.new_zeros(count, *layer.values.shape[1:])])
