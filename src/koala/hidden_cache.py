"""The training inputs of a draft head: token ids, an assistant-only loss mask, and the target's final hidden states.

Heads never need the target's *body* during training, only its final normed hidden states (their input) and the
target's next-token distributions (their labels), which are just those states through the frozen LM head. So one
target pass over the distilled data is stored (fp16, memory-mapped .npy shards + manifest.json) and every training
run and ablation reuses it; labels are recomputed from the cached states when a loss needs them (storing 49k-way
distributions would be ~100x larger). `OnlineSource` is the same interface with the target in the loop (no disk).
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from koala.args import add_target_args, positive_int
from koala.atomic import atomic_dir, write_json_atomic
from koala.build import target_from_args
from koala.data import ReadStats, read_conversations
from koala.invariant_linear import c_kernel

FORMAT = "koala-hidden-cache/2"
SHARD_ARRAYS = ("hidden", "ids", "mask", "greedy", "offsets")
AUX = "aux"  # optional shard array: the inputs to chosen target layers, concatenated (EAGLE-3 style heads)
MANIFEST = "manifest.json"
# Tokens per shard, which is what a killed build loses at most: 1 << 16 is ~4-5 minutes of caching or distilling on
# the 2-core AVX2 EPYC (~250 tok/s in fp32) and ~300 MB with three aux layers. Round 23: a session that ended 171K
# tokens into a build with 1 << 18-token shards threw away 18 minutes.
SHARD_TOKENS = 1 << 16


def default_aux_layers(num_layers: int) -> tuple[int, int, int]:
    """Low, middle and high target layers whose inputs an EAGLE-3 style head reads: [2, N//2, N-3], the ids
    llama.cpp's EAGLE-3 support assumes when a draft names none ([2, 15, 27] for a 30-layer target)."""
    return 2, num_layers // 2, num_layers - 3


def parse_aux_layers(text: str, num_layers: int) -> tuple[int, ...]:
    """--aux-layers: "auto" (default_aux_layers), "none", or comma-separated ids in [0, num_layers]."""
    if text == "none":
        return ()
    if text == "auto":
        return default_aux_layers(num_layers)
    try:
        ids = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--aux-layers takes 'auto', 'none' or comma-separated layer ids, not {text!r}.") from None
    if not ids or any(not 0 <= i <= num_layers for i in ids):
        raise ValueError(f"--aux-layers ids must lie in [0, {num_layers}] (the target has {num_layers} layers), "
                         f"got {text!r}.")
    return ids


@dataclass
class TokenStats:
    """What tokenisation kept and cut (reported; nothing is dropped silently)."""

    sequences: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    cut_sequences: int = 0
    cut_tokens: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n


def _template(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    return [int(i) for i in (ids if isinstance(ids, list) else ids["input_ids"])]


def tokenize_conversation(target, messages: list[dict], cut: list[bool] | None = None, context: int = 0,
                          ) -> tuple[list[int], list[bool]]:
    """Chat-templated ids of a whole conversation and a mask that is True on assistant-written tokens.

    The span of assistant turn i is what the template adds between "prompt up to i + generation prompt" and
    "conversation up to i", cut after its end-of-turn token (the target emits that token, but not the template's
    separator after it). A reply that was cut at a length limit (`cut[k]` for the k-th assistant turn) never
    emitted an end token, so none is masked for it. The first `context` assistant turns are not masked (another
    record trains on them). Raises ValueError when the template is not prefix-stable.
    """
    turn = 0
    tok = target.tokenizer
    ids: list[int] = []
    mask: list[bool] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _template(tok, messages[:i], True)
        full = _template(tok, messages[:i + 1], False)
        if prompt[:len(ids)] != ids or full[:len(prompt)] != prompt:
            raise ValueError("the chat template is not prefix-stable across turns")
        span = full[len(prompt):]
        ends = [j for j, t in enumerate(span) if t in target.eos_ids]
        keep = ends[-1] + 1 if ends else len(span)
        if ends and cut is not None and turn < len(cut) and cut[turn]:
            keep = ends[-1]
        keep = 0 if turn < context else keep
        turn += 1
        mask += [False] * (len(prompt) - len(ids)) + [True] * keep + [False] * (len(span) - keep)
        ids = full
    return ids, mask


def tokenize_records(target, data: str | Path, max_length: int, stats: TokenStats,
                     max_sequences: int | None = None, skip_keys: set[int] = frozenset(),
                     cuts: dict[int, int] | None = None) -> list[tuple[int, list[int], list[bool]]]:
    """(key, ids, mask) of a distilled file, cut to max_length (cuts and skips counted in `stats`, and the tokens
    cut per key in `cuts` if given); the key is the conversation's position in the file, and conversations whose
    key is in `skip_keys` (already cached) are passed over."""
    read = ReadStats()
    out = []
    for conv in read_conversations(data, read):
        if max_sequences is not None and len(out) >= max_sequences:
            break
        if conv.index in skip_keys:
            continue
        try:
            ids, mask = tokenize_conversation(target, conv.messages, [f == "length" for f in conv.finish],
                                              conv.context)
        except ValueError:
            stats.skip("chat template not prefix-stable")
            continue
        except UnicodeError:
            stats.skip("text the tokenizer cannot encode (e.g. a lone surrogate)")
            continue
        if len(ids) > max_length:
            stats.cut_sequences += 1
            stats.cut_tokens += len(ids) - max_length
            if cuts is not None:
                cuts[conv.index] = len(ids) - max_length
            ids, mask = ids[:max_length], mask[:max_length]
        if sum(mask[1:]) == 0:  # position 0 is never predicted
            stats.skip("no assistant tokens (within max length)")
            continue
        out.append((conv.index, ids, mask))
        stats.sequences += 1
        stats.tokens += len(ids)
        stats.loss_tokens += sum(mask)
    for reason, n in read.skipped.items():
        stats.skip(f"input: {reason}", n)
    return out


def tokenize_file(target, data: str | Path, max_length: int, stats: TokenStats,
                  max_sequences: int | None = None) -> list[tuple[list[int], list[bool]]]:
    """Tokenised conversations of a distilled file (see tokenize_records), without their keys."""
    return [(ids, mask) for _, ids, mask in tokenize_records(target, data, max_length, stats, max_sequences)]


def greedy_from_ids(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The target's argmax next token per position for text the target generated greedily: where token t+1 is
    the target's (mask), its argmax at t *was* token t+1; -1 elsewhere (not needed there)."""
    out = np.full(len(ids), -1, dtype=np.int32)
    out[:-1] = np.where(mask[1:], ids[1:], -1)
    return out


@torch.inference_mode()
def greedy_from_hidden(target, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) argmax of the target's next-token logits (full vocabulary, fp32) at positions t whose next token is
    supervised (mask[:, t+1]); -1 elsewhere. For text the target did not write (teacher-forced data)."""
    need = torch.zeros_like(mask)
    need[:, :-1] = mask[:, 1:]
    out = torch.full(mask.shape, -1, dtype=torch.long)
    rows = need.nonzero(as_tuple=True)
    logits = _fp32_logits(target)
    for a in range(0, rows[0].numel(), 4096):
        r = (rows[0][a:a + 4096], rows[1][a:a + 4096])
        out[r] = logits(hidden[r]).argmax(-1).cpu()
    return out


def _fp32_logits(target) -> Callable[[torch.Tensor], torch.Tensor]:
    """Rows of the target's dtype -> fp32 logits with fp32 accumulation. On koala's C kernel (it writes fp32 from
    bf16 rows: the same products, about 5x faster than an fp32 copy of the weight here), else an fp32 matmul."""
    kernel = c_kernel(target.lm_head)
    if kernel is not None:
        return lambda h: kernel(h.to(target.dtype), torch.float32)
    w = target.lm_head.weight.float().T  # once per call, not per chunk
    return lambda h: h.to(w.device, torch.float32) @ w


def _span(item, length) -> tuple[int, int, int]:
    """A batch item is a sequence index (the whole sequence) or (index, start, stop): a window of it."""
    return (item, 0, length(item)) if isinstance(item, int) else item


@dataclass
class Batch:
    """Right-padded batch: ids/loss_mask/valid (B, T), hidden (B, T, d) final normed target states, greedy
    (B, T): the target's argmax next token after position t (-1 where unknown or unneeded), and aux (B, T, n*d):
    the inputs to the cache's aux layers, concatenated (None when the cache has none)."""

    ids: torch.Tensor
    loss_mask: torch.Tensor
    valid: torch.Tensor
    hidden: torch.Tensor
    greedy: torch.Tensor
    aux: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return int(self.valid.sum())

    def to(self, device) -> "Batch":
        return Batch(*(None if t is None else t.to(device) for t in (self.ids, self.loss_mask, self.valid,
                                                                   self.hidden, self.greedy, self.aux)))


def _tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x))  # a copy: mmaps are read-only


def _pad(seqs: list[tuple[np.ndarray, ...]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, mask, valid, greedy of (ids, mask[, greedy]) sequences, right-padded."""
    width = max(len(s[0]) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    valid = torch.zeros(len(seqs), width, dtype=torch.bool)
    greedy = torch.full((len(seqs), width), -1, dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s[0])
        ids[i, :n] = _tensor(s[0])
        mask[i, :n] = _tensor(s[1])
        valid[i, :n] = True
        if len(s) > 2:
            greedy[i, :n] = _tensor(s[2])
    return ids, mask, valid, greedy


@torch.inference_mode()
def target_hidden(target, ids: torch.Tensor, valid: torch.Tensor,
                  aux_layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Final normed hidden states for a right-padded batch (padding sits after the real tokens, so causal
    attention keeps it from changing them), and the inputs to `aux_layers` concatenated (None if none asked)."""
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    out = target.body(input_ids=ids, position_ids=pos, attention_mask=valid.long(), use_cache=False,
                      output_hidden_states=bool(aux_layers))
    aux = torch.cat([out.hidden_states[i] for i in aux_layers], dim=-1) if aux_layers else None
    return out.last_hidden_state, aux


class OnlineSource:
    """Training sequences with the target in the loop: hidden states computed per batch, nothing on disk."""

    def __init__(self, target, sequences: list[tuple[list[int], list[bool]]]) -> None:
        self.target = target
        self.sequences = sequences

    def __len__(self) -> int:
        return len(self.sequences)

    def length(self, i: int) -> int:
        return len(self.sequences[i][0])

    def tokens(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ids, mask and greedy next tokens (the sequences are the target's own greedy text)."""
        ids, mask = np.asarray(self.sequences[i][0], dtype=np.int32), np.asarray(self.sequences[i][1], dtype=bool)
        return ids, mask, greedy_from_ids(ids, mask)

    def batch(self, items: list) -> Batch:
        """Hidden states are computed over each sequence's whole prefix, then the window is cut out."""
        spans = [_span(it, self.length) for it in items]
        ids, mask, valid, _ = _pad([tuple(x[:b] for x in self.sequences[i]) for i, _, b in spans])
        dev = self.target.device
        hidden = target_hidden(self.target, ids.to(dev), valid.to(dev))[0].float().cpu()
        greedy = greedy_from_hidden(self.target, hidden, mask)
        cut = [(ids[r, a:b], mask[r, a:b], greedy[r, a:b]) for r, (_, a, b) in enumerate(spans)]
        ids, mask, valid, greedy = _pad(cut)
        h = hidden.new_zeros(*ids.shape, hidden.shape[-1])
        for r, (_, a, b) in enumerate(spans):
            h[r, :b - a] = hidden[r, a:b]
        return Batch(ids, mask, valid, h, greedy)


class HiddenCache:
    """One or more cache directories written by `koala distill` or `build_cache`, read as one source and
    memory-mapped (the OS pages in only what a batch touches)."""

    def __init__(self, paths: str | Path | list) -> None:
        self.paths = [Path(p) for p in (paths if isinstance(paths, (list, tuple)) else [paths])]
        self.manifests = [self._manifest(p) for p in self.paths]
        self.manifest = self.manifests[0]
        for p, m in zip(self.paths[1:], self.manifests[1:]):
            if m["target"].get("lm_head_sha256") != self.target.get("lm_head_sha256"):
                raise ValueError(f"{p} was built from another target than {self.paths[0]}; they cannot be mixed.")
        layers = {tuple(m.get("aux_layers", ())) for m in self.manifests}
        # caches with different aux layers mix only without them
        self.aux_layers: tuple[int, ...] = layers.pop() if len(layers) == 1 else ()
        self._index: list[tuple[int, int, int]] = []  # (shard, start, end) per sequence
        self._shards = []
        for path, manifest in zip(self.paths, self.manifests):
            for shard in manifest["shards"]:
                d = path / shard["name"]
                names = SHARD_ARRAYS + ((AUX,) if self.aux_layers else ())
                arrays = {k: np.load(d / f"{k}.npy", mmap_mode="r") for k in names}
                off = arrays["offsets"]
                self._index += [(len(self._shards), int(off[i]), int(off[i + 1])) for i in range(len(off) - 1)]
                self._shards.append(arrays)

    @staticmethod
    def _manifest(path: Path) -> dict:
        file = path / MANIFEST
        if not file.is_file():
            raise FileNotFoundError(f"{path} is not a hidden-state cache (no {MANIFEST}); build one with "
                                    f"`koala distill --out {path}` or `koala cache --out {path}`.")
        manifest = json.loads(file.read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{file} has format {manifest.get('format')!r}, expected {FORMAT!r}: it was "
                             f"written by another koala version; rebuild it.")
        return manifest

    @property
    def target(self) -> dict:
        return self.manifest["target"]

    def __len__(self) -> int:
        return len(self._index)

    def length(self, i: int) -> int:
        _, a, b = self._index[i]
        return b - a

    def tokens(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ids, loss mask and the target's greedy next tokens of sequence i."""
        s, a, b = self._index[i]
        sh = self._shards[s]
        return sh["ids"][a:b], sh["mask"][a:b], sh["greedy"][a:b]

    def batch(self, items: list) -> Batch:
        spans = [_span(it, self.length) for it in items]
        ids, mask, valid, greedy = _pad([tuple(x[a:b] for x in self.tokens(i)) for i, a, b in spans])
        d = self.manifest["hidden_size"]
        hidden = torch.zeros(*ids.shape, d)
        aux = torch.zeros(*ids.shape, d * len(self.aux_layers)) if self.aux_layers else None
        for row, (i, a, b) in enumerate(spans):
            s, start, _ = self._index[i]
            for name, out in (("hidden", hidden), (AUX, aux)):
                if out is not None:
                    out[row, :b - a] = torch.from_numpy(
                        np.array(self._shards[s][name][start + a:start + b], dtype=np.float32))
        return Batch(ids, mask, valid, hidden, greedy, aux)


def write_shard(dirpath: Path, seqs: list[tuple[list[int], list[bool], np.ndarray]], hidden: list[np.ndarray],
                records: list[dict], aux: list[np.ndarray] | None = None) -> dict:
    """Write one shard directory atomically: ids, loss mask, greedy next tokens, offsets, hidden states (fp16),
    optionally the aux-layer states (fp16), and one small record per sequence (at least its "key", the position
    of its conversation in the source)."""
    lengths = [len(s[0]) for s in seqs]
    with atomic_dir(dirpath) as tmp:
        np.save(tmp / "greedy.npy", np.concatenate([np.asarray(s[2], dtype=np.int32) for s in seqs]))
        np.save(tmp / "hidden.npy", np.concatenate(hidden).astype(np.float16, copy=False))
        if aux:
            np.save(tmp / f"{AUX}.npy", np.concatenate(aux).astype(np.float16, copy=False))
        np.save(tmp / "ids.npy", np.concatenate([np.asarray(s[0], dtype=np.int32) for s in seqs]))
        np.save(tmp / "mask.npy", np.concatenate([np.asarray(s[1], dtype=np.bool_) for s in seqs]))
        np.save(tmp / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        (tmp / "records.json").write_text(json.dumps(records))
        size = sum(f.stat().st_size for f in tmp.iterdir())
    return {"name": dirpath.name, "sequences": len(seqs), "tokens": int(sum(lengths)), "bytes": size}


def shard_records(cache_dir: Path, shards: list[dict]) -> list[dict]:
    """The per-sequence records of the listed shards, in cache order (each has at least its "key", the sequence's
    position in the source file)."""
    return [r for sh in shards for r in json.loads((Path(cache_dir) / sh["name"] / "records.json").read_text())]


def build_cache(target, data: str | Path, out: str | Path, max_length: int = 1024, batch_tokens: int = 8192,
                shard_tokens: int = SHARD_TOKENS, max_sequences: int | None = None,
                append: bool = False, progress: bool = True, aux_layers: tuple[int, ...] = ()) -> dict:
    """One target pass over `data` into the cache directory `out` (also the inputs to `aux_layers`, if any).

    A new cache is written to out.tmp and renamed when complete; a build that was killed resumes from the shards
    out.tmp holds (the same batches as an uninterrupted run: shards end at batch boundaries). With append=True an
    existing cache gets new shards for the conversations it does not hold yet (so caching can follow a
    distillation that is still running). The manifest is rewritten atomically after every shard, so a kill loses
    at most the shard in progress.
    """
    from tqdm import tqdm

    out = Path(out)
    old = None
    work = out.with_name(out.name + ".tmp")
    if (out / MANIFEST).exists():
        if not append:
            raise ValueError(f"{out} already holds a cache; pass a new --out, --append, or delete it.")
        work = out
    if (work / MANIFEST).exists():
        old = json.loads((work / MANIFEST).read_text())
        if old["source"] != str(data) and work != out:
            raise ValueError(f"{work} holds an unfinished cache of {old['source']}; delete it to cache {data}.")
        if old["target"]["lm_head_sha256"] != target.identity["lm_head_sha256"]:
            raise ValueError(f"{work} was built from another target ({old.get('target_name')}); cannot add to it.")
        if old["max_length"] != max_length:
            raise ValueError(f"{work} uses max_length {old['max_length']}; continue with the same --max-length.")
        if tuple(old.get("aux_layers", ())) != tuple(aux_layers):
            raise ValueError(f"{work} holds aux layers {old.get('aux_layers', [])}; continue with the same "
                             f"--aux-layers.")
        if work != out and progress:
            print(f"Resuming the unfinished cache in {work}: {old['sequences']} sequences done.", file=sys.stderr)
    start = time.perf_counter()
    stats = TokenStats()
    done = {int(r["key"]) for r in shard_records(work, old["shards"])} if old else set()
    cuts: dict[int, int] = {}
    seqs = tokenize_records(target, data, max_length, stats, max_sequences, skip_keys=done, cuts=cuts)
    if not seqs:
        if old is None:
            raise ValueError(f"No usable conversation in {data} ({stats.skipped or 'empty file'}).")
        if work == out:
            return old
    if old is None:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][1]))  # similar lengths per batch: little padding
    shards = list((old or {}).get("shards", []))
    pending_h, pending_a, pending_s = [], [], []
    written = TokenStats()  # what the shards written by this run hold

    def manifest() -> dict:
        def total(key: str) -> int:
            return (old or {}).get(key, 0) + getattr(written, key)

        # every pass reads the whole file, so it meets the records an earlier pass over the same file skipped
        skipped = dict((old or {}).get("skipped", {})) if old and old["source"] != str(data) else {}
        for k, v in stats.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
        return {
            "format": FORMAT, "source": str(data), "target": target.identity, "target_name": target.name,
            "hidden_size": int(target.config.hidden_size), "dtype": "float16", "max_length": max_length,
            "aux_layers": list(aux_layers),
            "sequences": total("sequences"), "tokens": total("tokens"), "loss_tokens": total("loss_tokens"),
            "cut_sequences": total("cut_sequences"), "cut_tokens": total("cut_tokens"), "skipped": skipped,
            "shards": shards, "seconds": round((old or {}).get("seconds", 0) + time.perf_counter() - start, 1),
            "bytes": sum(sh["bytes"] for sh in shards),
        }

    bar = tqdm(total=stats.tokens, unit="tok", disable=not progress, mininterval=5, file=sys.stderr)
    i = 0
    while i < len(order):
        j = i + 1
        while j < len(order) and len(seqs[order[j]][1]) * (j - i + 1) <= batch_tokens:
            j += 1
        chunk = [seqs[k] for k in order[i:j]]
        ids, mask, valid, _ = _pad([(s[1], s[2]) for s in chunk])
        hidden, aux = target_hidden(target, ids.to(target.device), valid.to(target.device), aux_layers)
        hidden = hidden.float().cpu()
        greedy = greedy_from_hidden(target, hidden, mask).numpy()
        for row, s in enumerate(chunk):
            pending_h.append(hidden[row, :len(s[1])].to(torch.float16).numpy())
            if aux is not None:
                pending_a.append(aux[row, :len(s[1])].to(torch.float16).cpu().numpy())
            pending_s.append((s[0], s[1], s[2], greedy[row, :len(s[1])]))
        bar.update(int(valid.sum()))
        if sum(len(s[1]) for s in pending_s) >= shard_tokens or j == len(order):
            shards.append(write_shard(work / f"shard{len(shards):04d}", [s[1:] for s in pending_s],
                                      pending_h, [{"key": s[0]} for s in pending_s], pending_a))
            for key, ids, mask, _ in pending_s:
                written.sequences += 1
                written.tokens += len(ids)
                written.loss_tokens += sum(mask)
                written.cut_sequences += key in cuts
                written.cut_tokens += cuts.get(key, 0)
            write_json_atomic(work / MANIFEST, manifest())
            pending_h, pending_a, pending_s = [], [], []
        i = j
    bar.close()
    final = manifest()
    write_json_atomic(work / MANIFEST, final)
    if work != out:
        work.replace(out)
    return final


def _run(args) -> int:

    target = target_from_args(args, verifies=False)
    aux_layers = parse_aux_layers(args.aux_layers, target.config.num_hidden_layers)
    manifest = build_cache(target, args.data, args.out, args.max_length, args.batch_tokens, args.shard_tokens,
                           max_sequences=args.max_sequences, append=args.append, aux_layers=aux_layers)
    print(json.dumps({k: v for k, v in manifest.items() if k not in ("shards", "target")}, indent=1))
    return 0


def add_command(sub) -> None:

    p = sub.add_parser("cache", help="store the target's hidden states over distilled data for head training")
    p.add_argument("--data", required=True, help="distilled conversations (JSONL from `koala distill`)")
    p.add_argument("--out", required=True,
                   help="new cache directory (built in OUT.tmp; run the same command again to resume a killed build)")
    p.add_argument("--max-length", type=positive_int, default=1024, help="tokens per conversation; longer ones are cut")
    p.add_argument("--max-sequences", type=positive_int, default=None)
    p.add_argument("--batch-tokens", type=positive_int, default=8192, help="tokens per target forward pass")
    p.add_argument("--shard-tokens", type=positive_int, default=SHARD_TOKENS,
                   help="tokens per shard: what a kill loses at most (shards end at batch boundaries)")
    p.add_argument("--append", action="store_true",
                   help="add the conversations of --data that the existing cache in --out does not hold yet")
    p.add_argument("--aux-layers", default="none",
                   help="also store the inputs to these target layers, for eagle3 heads: 'auto' (low, middle, "
                        "high: [2, N//2, N-3]), 'none', or ids like 2,15,27 (costs n x the hidden-state disk)")
    add_target_args(p)
    p.set_defaults(func=_run)
