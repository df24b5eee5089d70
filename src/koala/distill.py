"""Self-distillation: the target answers a chat dataset's prompts, and its hidden states are kept as it goes.

A draft head must predict what *the target* would say, so its training text is the target's own replies (turn k's
prompt holds the target's earlier replies). Generation runs on `SlotModel`: a preallocated KV cache with one slot
per sequence, rows leaving as they finish and waiting prompts joining in their place, so the batch stays full and
nothing is concatenated or padded per token. The final hidden states of every token (prompt from the prefill,
reply from the decode steps) are written into a hidden-state cache as shards, so training needs no second target
pass. Each record is keyed by its position in the input file; a shard and its records are published together by an
atomic manifest rewrite, so a killed run resumes exactly where its last shard ended.

Output directory: manifest.json + shardNNNN/ (koala-hidden-cache format, see hidden_cache.py), and
conversations.jsonl (the distilled text, in record order of completion; rewritten from the shards on resume).
"""
from __future__ import annotations

import json
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from koala.args import add_target_args, non_negative_float, non_negative_int, positive_int
from koala.atomic import write_json_atomic, write_text_atomic
from koala.build import target_from_args
from koala.data import Conversation, ReadStats, read_conversations, read_distilled, write_sharegpt
from koala.hidden_cache import (FORMAT, MANIFEST, SHARD_TOKENS, greedy_from_ids, parse_aux_layers, shard_records,
                                tokenize_conversation, write_shard)
from koala.slots import SlotModel

TEXT = "conversations.jsonl"


@dataclass
class DistillConfig:
    max_conversations: int | None = None
    max_turns: int = 1
    max_new_tokens: int = 256
    batch_size: int = 64  # rows decoded together (KV-cache slots)
    temperature: float = 0.0
    max_prompt_tokens: int = 1024
    shard_tokens: int = SHARD_TOKENS  # tokens per published shard (the resume granularity)
    prefill_tokens: int = 8192  # prompt tokens per prefill forward when rows join
    pool_factor: int = 16  # prompts read ahead (x batch_size) and sorted by length
    seed: int = 0
    aux_layers: tuple[int, ...] = ()  # also keep the inputs to these target layers (for eagle3 heads)

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_new_tokens", "batch_size", "max_prompt_tokens", "shard_tokens",
                     "prefill_tokens", "pool_factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, not {getattr(self, name)}.")
        if not self.temperature >= 0:  # also refuses NaN
            raise ValueError(f"--temperature must be >= 0, not {self.temperature}.")


@dataclass
class DistillStats:
    conversations: int = 0
    turns: int = 0
    new_tokens: int = 0
    tokens: int = 0
    already_done: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    truncated_replies: int = 0
    seconds: float = 0.0

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


@dataclass
class Job:
    """One assistant turn to generate: the conversation so far and its prompt ids."""

    conv: Conversation
    turn: int
    messages: list[dict]  # the conversation so far (system, earlier turns) + this turn's user message
    prompt: list[int]
    prompt_mask: list[bool]  # True on earlier assistant-written tokens of the prompt
    counts: list[int]  # new tokens of earlier turns
    finish: list[str]
    context: int = 0  # earlier turns taken from an --after file: in the prompt, not trained on again


@dataclass
class Row:
    """A job in a cache slot: its tokens so far, hidden states, and whether its last token is final."""

    job: Job
    ids: list[int]
    hidden: list[torch.Tensor]
    new: int = 0
    final: str | None = None  # "eos" / "length" once the last token is chosen (it is still fed once)


def make_job(target, conv: Conversation, turn: int, history: list[dict], cfg: DistillConfig,
             counts: list[int], finish: list[str], stats: DistillStats, context: int = 0) -> Job | None:
    """The job for user turn `turn` of `conv` after `history`, or None (counted) when it cannot be asked; the
    first `context` replies of `history` are masked out (an earlier distillation trains on them)."""
    users = conv.user_turns
    if turn >= len(users) or turn >= cfg.max_turns or not users[turn].strip():
        return None
    messages = history + [{"role": "user", "content": users[turn]}]
    where = "first turn" if turn == 0 else "later turn"
    try:
        prompt = target.encode(messages)
        prev_ids, prev_mask = tokenize_conversation(target, history, context=context) if turn else ([], [])
    except (ValueError, UnicodeError) as e:
        stats.skip(f"cannot tokenise ({where}): {type(e).__name__}")
        return None
    if len(prompt) > cfg.max_prompt_tokens:
        stats.skip(f"prompt over --max-prompt-tokens ({where})")
        return None
    if len(prompt) + cfg.max_new_tokens + 1 > target.max_length:
        stats.skip(f"prompt + reply over the target's context ({where})")
        return None
    if prompt[:len(prev_ids)] != prev_ids:
        stats.skip("chat template not prefix-stable (later turn)")
        return None
    mask = prev_mask + [False] * (len(prompt) - len(prev_ids))
    return Job(conv, turn, messages, prompt, mask, counts, finish, context)


class Generator:
    """Continuous batched generation over SlotModel: `run` yields finished rows with their hidden states."""

    def __init__(self, target, cfg: DistillConfig) -> None:
        self.target, self.cfg = target, cfg
        self.capacity = cfg.max_prompt_tokens + cfg.max_new_tokens + 1
        self.model = SlotModel(target.model, cfg.batch_size, self.capacity, cfg.aux_layers)
        self.d = int(target.config.hidden_size)  # forward's first d columns are the final states
        self.gen = torch.Generator().manual_seed(cfg.seed)

    def _next(self, hidden: torch.Tensor) -> list[int]:
        logits = self.target.logits(hidden)
        if self.cfg.temperature == 0:
            return logits.argmax(-1).tolist()
        probs = torch.softmax(logits / self.cfg.temperature, dim=-1)
        return torch.multinomial(probs.cpu(), 1, generator=self.gen)[:, 0].tolist()

    def _choose(self, row: Row, token: int) -> None:
        row.ids.append(token)
        row.new += 1
        if token in self.target.eos_ids:
            row.final = "eos"
        elif row.new >= self.cfg.max_new_tokens:
            row.final = "length"

    def _admit(self, rows: list[Row], queue: deque) -> None:
        """Prefill waiting jobs into the free slots (few forwards of at most prefill_tokens tokens each)."""
        dev = self.target.device
        while queue and len(rows) < self.cfg.batch_size:
            group: list[Job] = []
            while queue and len(rows) + len(group) < self.cfg.batch_size:
                width = max([len(queue[0].prompt)] + [len(j.prompt) for j in group])
                if group and width * (len(group) + 1) > self.cfg.prefill_tokens:
                    break
                group.append(queue.popleft())
            width = max(len(j.prompt) for j in group)
            ids = torch.zeros(len(group), width, dtype=torch.long)
            for i, j in enumerate(group):
                ids[i, :len(j.prompt)] = torch.tensor(j.prompt)
            pos = torch.arange(width).expand(len(group), width)
            h = self.model.forward(len(rows), ids.to(dev), pos.to(dev))
            first = self._next(h[torch.arange(len(group)), [len(j.prompt) - 1 for j in group], :self.d])
            for i, j in enumerate(group):
                row = Row(j, list(j.prompt), [h[i, :len(j.prompt)].to(torch.float16).cpu()])
                self._choose(row, first[i])
                rows.append(row)

    def run(self, jobs: Iterator[Job], more: deque) -> Iterator[tuple[Row, torch.Tensor]]:
        """Generate every job of `jobs` and of `more` (follow-up turns pushed by the caller while this runs);
        yields each finished row with the hidden states (n_tokens, d, fp16) of all its tokens, followed on the last
        axis by its aux-layer states when cfg.aux_layers names some."""
        dev = self.target.device
        rows: list[Row] = []
        while True:
            if len(rows) < self.cfg.batch_size:
                queue = more
                while len(queue) < self.cfg.batch_size - len(rows):
                    job = next(jobs, None)
                    if job is None:
                        break
                    queue.append(job)
                if len(rows) <= self.cfg.batch_size * 7 // 8 or not rows:
                    self._admit(rows, queue)
            if not rows:
                return
            ids = torch.tensor([[r.ids[-1]] for r in rows], device=dev)
            pos = torch.tensor([[len(r.ids) - 1] for r in rows], device=dev)
            h = self.model.forward(0, ids, pos)[:, 0]
            h16 = h.to(torch.float16).cpu()
            live = [i for i, r in enumerate(rows) if r.final is None]
            nxt = self._next(h[live, :self.d]) if live else []
            for i, r in enumerate(rows):
                r.hidden.append(h16[i:i + 1])
            for i, tok in zip(live, nxt):
                self._choose(rows[i], tok)
            done = [i for i, r in enumerate(rows) if r.final is not None and i not in live]
            for i in sorted(done, reverse=True):  # the last token was just fed: the row is complete
                row = rows[i]
                yield row, torch.cat(row.hidden)
                last = len(rows) - 1
                if i != last:
                    self.model.move(last, i, len(rows[last].ids))
                    rows[i] = rows[last]
                rows.pop()


def _resume(out: Path) -> tuple[dict | None, set[int]]:
    """(manifest, keys of the published records), or (None, {}) for a new directory. conversations.jsonl is
    rewritten to exactly the published records (dropping lines of a run killed between its append and the
    manifest)."""
    file = out / MANIFEST
    if not file.is_file():
        return None, set()
    manifest = json.loads(file.read_text())
    records = shard_records(out, manifest["shards"])
    write_text_atomic(out / TEXT, "".join(json.dumps(r) + "\n" for r in records))
    return manifest, {int(r["key"]) for r in records}


def _merge_skips(manifest: dict, skipped: dict[str, int]) -> None:
    """Skips are properties of records, and every run (a resumed one too) reads the file from its start and
    meets the same skipped records again: the larger count is the count."""
    for k, v in skipped.items():
        manifest["skipped"][k] = max(v, manifest["skipped"].get(k, 0))


def _first_job(target, conv: Conversation, earlier: dict[int, Conversation] | None, cfg: DistillConfig,
               stats: DistillStats) -> Job | None:
    """The first turn this run generates for `conv`: its first user turn, or with an --after file (`earlier`)
    the turn after the replies distilled there (which stay in the prompt, masked out)."""
    if earlier is None:
        return make_job(target, conv, 0, [m for m in conv.messages[:1] if m["role"] == "system"], cfg, [], [],
                        stats)
    old = earlier.get(conv.index)
    if old is None:
        stats.skip("not in the --after file")
        return None
    if old.finish[-1:] != ["eos"]:
        stats.skip("--after reply cut at its length limit (no later turn)")
        return None
    turns = len(old.finish)
    if turns >= cfg.max_turns or turns >= len(conv.user_turns):
        stats.skip("no later user turn (or --max-turns reached)")
        return None
    counts = [0] * turns  # a record's new_tokens: what this run generated, per turn
    return make_job(target, conv, turns, old.messages, cfg, counts, list(old.finish), stats, context=turns)


def distill(target, data: str | Path, out: str | Path, cfg: DistillConfig, progress: bool = True,
            after: str | Path | None = None) -> DistillStats:
    """Run (or resume) self-distillation of `data` into the directory `out`; with `after` (an earlier run's
    records), continue its conversations from their next user turn instead of starting new ones."""
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ident = target.identity
    old, done = _resume(out)
    if old is not None and old["target"]["lm_head_sha256"] != ident["lm_head_sha256"]:
        raise ValueError(f"{out} was distilled from another target ({old.get('target_name')}); use a new --out.")
    if old is not None and tuple(old.get("aux_layers", ())) != tuple(cfg.aux_layers):
        raise ValueError(f"{out} holds aux layers {old.get('aux_layers', [])}; resume with the same --aux-layers.")
    stats = DistillStats(already_done=len(done))
    read = ReadStats()
    earlier = read_distilled(after) if after is not None else None
    more: deque = deque()

    def jobs() -> Iterator[Job]:
        """First-turn jobs, read ahead `pool` at a time and sorted by prompt length: rows decoded together then
        have similar lengths, and attention never spans far past a row's own keys."""
        n, pool = len(done), []
        for conv in read_conversations(data, read):
            if cfg.max_conversations is not None and n >= cfg.max_conversations:
                break
            if conv.index in done:
                continue
            job = _first_job(target, conv, earlier, cfg, stats)
            if job is not None:
                n += 1
                pool.append(job)
            if len(pool) == cfg.batch_size * cfg.pool_factor:
                yield from sorted(pool, key=lambda j: len(j.prompt))
                pool = []
        yield from sorted(pool, key=lambda j: len(j.prompt))

    manifest = old or {"format": FORMAT, "source": str(data), "target": ident, "target_name": target.name,
                       "hidden_size": int(target.config.hidden_size), "dtype": "float16",
                       "max_length": cfg.max_prompt_tokens + cfg.max_new_tokens,
                       "aux_layers": list(cfg.aux_layers), "sequences": 0, "tokens": 0,
                       "loss_tokens": 0, "cut_sequences": 0, "cut_tokens": 0, "skipped": {}, "shards": [],
                       "seconds": 0.0, "bytes": 0}
    pending: list[tuple[dict, list[int], list[bool], np.ndarray]] = []
    pending_tokens = 0
    start = time.perf_counter()
    seconds0 = manifest["seconds"]

    def publish() -> None:
        nonlocal pending_tokens
        if not pending:
            return
        d = manifest["hidden_size"]
        shard = write_shard(out / f"shard{len(manifest['shards']):04d}",
                            [(p[1], p[2], greedy_from_ids(np.asarray(p[1]), np.asarray(p[2]))) for p in pending],
                            [p[3][:, :d] for p in pending], [p[0] for p in pending],
                            [p[3][:, d:] for p in pending] if cfg.aux_layers else None)
        with open(out / TEXT, "a", encoding="utf-8") as f:
            for p in pending:
                f.write(json.dumps(p[0]) + "\n")
        manifest["shards"].append(shard)
        manifest["sequences"] += len(pending)
        manifest["tokens"] += shard["tokens"]
        manifest["loss_tokens"] += sum(int(sum(p[2])) for p in pending)
        manifest["seconds"] = round(seconds0 + time.perf_counter() - start, 1)
        manifest["bytes"] += shard["bytes"]
        _merge_skips(manifest, stats.skipped)
        write_json_atomic(out / MANIFEST, manifest)
        pending.clear()
        pending_tokens = 0

    total = None if cfg.max_conversations is None else max(cfg.max_conversations - len(done), 0)
    bar = tqdm(total=total, unit="conv", disable=not progress, mininterval=5, file=sys.stderr)
    for row, hidden in Generator(target, cfg).run(jobs(), more):
        job = row.job
        new = row.ids[len(job.prompt):]
        reply_ids = new[:-1] if row.final == "eos" else new
        reply = target.tokenizer.decode(reply_ids, skip_special_tokens=True)
        counts, finish = job.counts + [row.new], job.finish + [row.final]
        stats.turns += 1
        stats.new_tokens += row.new
        stats.truncated_replies += row.final == "length"
        history = job.messages + [{"role": "assistant", "content": reply}]
        follow = make_job(target, job.conv, job.turn + 1, history, cfg, counts, finish, stats, job.context) \
            if row.final == "eos" else None
        if follow is not None:
            more.append(follow)
            continue
        # A reply cut at max_new_tokens has no end-of-turn token: the mask covers exactly what the target wrote.
        record = json.loads(write_sharegpt(Conversation(job.conv.id, history), new_tokens=counts, finish=finish))
        record["key"] = job.conv.index
        if job.context:
            record["context_turns"] = job.context
        ids, mask = row.ids, job.prompt_mask + [True] * len(new)
        pending.append((record, ids, mask, hidden.numpy()))
        pending_tokens += len(ids)
        stats.conversations += 1
        stats.tokens += len(ids)
        bar.update(1)
        stats.seconds = time.perf_counter() - start
        bar.set_postfix(tok=stats.new_tokens, tok_s=f"{stats.tokens_per_s:.0f}", refresh=False)
        if pending_tokens >= cfg.shard_tokens:
            publish()
    publish()
    bar.close()
    stats.seconds = time.perf_counter() - start
    for reason, n in read.skipped.items():
        stats.skip(f"input: {reason}", n)
    if stats.skipped and manifest["shards"]:
        _merge_skips(manifest, stats.skipped)
        write_json_atomic(out / MANIFEST, manifest)
    return stats


def _run(args) -> int:

    target = target_from_args(args, verifies=False)
    cfg = DistillConfig(args.max_conversations, args.max_turns, args.max_new_tokens, args.batch_size,
                        args.temperature, args.max_prompt_tokens, shard_tokens=args.shard_tokens, seed=args.seed,
                        aux_layers=parse_aux_layers(args.aux_layers, target.config.num_hidden_layers))
    if args.threads:
        torch.set_num_threads(args.threads)
    stats = distill(target, args.data, args.out, cfg, after=args.after)
    print(json.dumps({"out": str(args.out), "conversations_written": stats.conversations,
                      "already_done": stats.already_done, "turns": stats.turns, "new_tokens": stats.new_tokens,
                      "tokens": stats.tokens, "replies_cut_at_max_new_tokens": stats.truncated_replies,
                      "seconds": round(stats.seconds, 1), "new_tokens_per_s": round(stats.tokens_per_s, 1),
                      "skipped": stats.skipped}))
    return 0


def add_command(sub) -> None:

    p = sub.add_parser("distill", help="the target answers a chat dataset; text + hidden states kept (resumable)")
    p.add_argument("--data", required=True, help="ShareGPT JSON/JSONL(.gz), MT-bench or Spec-Bench question file")
    p.add_argument("--out", required=True, help="output directory (a hidden-state cache + conversations.jsonl); "
                                                "records already there are skipped")
    p.add_argument("--max-conversations", type=positive_int, default=None, help="stop once the output holds this many")
    p.add_argument("--max-turns", type=positive_int, default=1, help="user turns answered per conversation")
    p.add_argument("--after", default=None,
                   help="an earlier run's records (its conversations.jsonl, or a packed .jsonl.gz): continue each "
                        "of its conversations whose replies ended normally at the next user turn (up to "
                        "--max-turns), its replies kept in the prompt and not trained on again")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="per assistant reply")
    p.add_argument("--max-prompt-tokens", type=positive_int, default=1024, help="longer prompts are skipped (counted)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="sequences decoded together")
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--shard-tokens", type=positive_int, default=SHARD_TOKENS,
                   help="tokens per published shard: what a kill loses at most")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--aux-layers", default="none",
                   help="also keep the inputs to these target layers, for eagle3 heads: 'auto' ([2, N//2, N-3]), "
                        "'none', or ids like 2,15,27")
    add_target_args(p)
    p.set_defaults(func=_run)
