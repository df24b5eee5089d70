"""What a training run reads: every cached token in windows, a fixed held-out split, batches that are a pure
function of (seed, step) (so resuming needs no iterator state), and the target's own argmax counts that choose
the draft vocabulary."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from koala.hidden_cache import HiddenCache, OnlineSource, TokenStats, tokenize_file


def windows(source, indices: list[int], max_len: int, context: int) -> list[tuple[int, int, int]]:
    """(sequence, start, stop) windows of at most max_len tokens that together train on every cached token: a
    window after the first starts `context` tokens before the previous one ended, so each (position, target
    token) pair with a gap of up to `context` lies inside one window."""
    out = []
    for i in indices:
        n, a = source.length(i), 0
        while True:
            b = min(n, a + max_len)
            out.append((i, a, b))
            if b == n:
                break
            a = b - context
    return out


def split_indices(n: int, eval_sequences: int) -> tuple[list[int], list[int]]:
    """(train, eval) sequence indices; the held-out set is fixed (independent of --seed) so runs compare."""
    g = torch.Generator().manual_seed(12345)
    perm = torch.randperm(n, generator=g).tolist()
    k = min(eval_sequences, max(n // 10, 1)) if n > 1 else 0
    return sorted(perm[k:]), sorted(perm[:k])


def epoch_batches(lengths: list[int], batch: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches (lists of item numbers) of one epoch: shuffled, grouped by similar length (less padding), in
    shuffled order."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    out = []
    group = batch * 16
    for a in range(0, len(perm), group):
        chunk = sorted(perm[a:a + group], key=lambda i: lengths[i])
        out += [chunk[b:b + batch] for b in range(0, len(chunk), batch)]
    order = torch.randperm(len(out), generator=g).tolist()
    return [out[i] for i in order]


class BatchStream:
    """The batch (of windows) for global step k, derived from (seed, k) alone: resuming needs no iterator state."""

    def __init__(self, items: list[tuple[int, int, int]], batch: int, seed: int, rank: int = 0,
                 world: int = 1) -> None:
        if len(items) < world:
            raise ValueError(f"Only {len(items)} training windows for {world} processes; use more data.")
        self.items, self.batch, self.seed = items, batch, seed
        self.rank, self.world = rank, world
        self.lengths = [b - a for _, a, b in items]
        self._epoch, self._batches = -1, []

    def per_epoch(self) -> int:
        return math.ceil(len(self.items) / self.batch)

    def indices_at(self, step: int) -> list[tuple[int, int, int]]:
        epoch, i = divmod(step, self.per_epoch())
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, epoch_batches(self.lengths, self.batch, self.seed, epoch)
        chosen = self._batches[i]
        mine = chosen[self.rank::self.world] or chosen[:1]
        return [self.items[j] for j in mine]


def greedy_counts(source, indices: list[int], vocab: int) -> torch.Tensor:
    """How often each token is the target's own argmax at a supervised position of these sequences (on
    teacher-forced text too, so the count reflects what the target says, not what the data says)."""
    counts = torch.zeros(vocab, dtype=torch.float64)
    for i in indices:
        greedy = np.asarray(source.tokens(i)[2], dtype=np.int64)
        counts += torch.bincount(torch.from_numpy(greedy[greedy >= 0]), minlength=vocab).double()
    return counts


def coverage(counts: torch.Tensor, draft_vocab: list[int] | None) -> float:
    """Share of the target's argmax tokens (by `counts`) inside the draft vocabulary: a ceiling on acc@1."""
    total = float(counts.sum())
    if draft_vocab is None or total == 0:
        return 1.0
    return float(counts[torch.tensor(draft_vocab)].sum()) / total


def source_from_paths(target, data: list[str], max_length: int):
    """Cache directories (read as one), or one distilled JSONL (then the target runs in the loop: online mode)."""
    paths = [Path(d) for d in data]
    if all(p.is_dir() for p in paths):
        cache = HiddenCache(paths)
        if cache.target.get("lm_head_sha256") != target.identity["lm_head_sha256"]:
            raise ValueError(f"The cache {paths[0]} was built from another target "
                             f"({cache.manifest.get('target_name')}); pass the same --target or rebuild the cache.")
        return cache
    if len(paths) > 1:
        raise ValueError("Several --data paths must all be cache directories (`koala distill` / `koala cache`).")
    return OnlineSource(target, tokenize_file(target, paths[0], max_length, TokenStats()))
