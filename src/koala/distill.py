"""Self-distillation: regenerate the assistant turns of a chat dataset with the target itself.

A draft head must predict what *the target* would say, not what ChatGPT said, so the training text is rewritten by
the target (turn k's prompt holds the target's own earlier replies). Generation is batched with left padding, the
output JSONL gets one line per finished conversation (ShareGPT form, with its id), and a restarted run skips the ids
already written, so the job can be stopped at any moment and resumed.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from koala.data import Conversation, ReadStats, read_conversations, write_sharegpt


@dataclass
class DistillConfig:
    max_conversations: int | None = None
    max_turns: int = 2
    max_new_tokens: int = 256
    batch_size: int = 16
    temperature: float = 0.0
    max_prompt_tokens: int = 1024
    pool_factor: int = 4  # conversations read ahead and sorted by prompt length, so a batch pads little
    seed: int = 0


@dataclass
class DistillStats:
    conversations: int = 0
    turns: int = 0
    new_tokens: int = 0
    already_done: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    truncated_replies: int = 0
    seconds: float = 0.0

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


def done_ids(out: Path) -> set[str]:
    """Ids already in the output; a truncated last line (killed mid-write) is cut off so appends stay valid JSONL."""
    if not out.is_file():
        return set()
    ids, good_end = set(), 0
    with open(out, "rb") as f:
        for line in f:
            try:
                ids.add(str(json.loads(line)["id"]))
                good_end += len(line)
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
                break
    if good_end != out.stat().st_size:
        with open(out, "r+b") as f:
            f.truncate(good_end)
        if good_end and not out.read_bytes().endswith(b"\n"):
            with open(out, "ab") as f:
                f.write(b"\n")
    return ids


@torch.inference_mode()
def generate_batch(target, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                   ) -> list[tuple[list[int], bool]]:
    """New tokens for each prompt (left-padded batch), cut at the first EOS; True = it stopped at EOS."""
    from transformers import GenerationConfig

    pad = target.tokenizer.pad_token_id
    pad = pad if pad is not None else min(target.eos_ids)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                           temperature=temperature if temperature > 0 else None, top_k=None, top_p=None,
                           eos_token_id=sorted(target.eos_ids), pad_token_id=pad)
    out = target.model.generate(input_ids=ids.to(target.device), attention_mask=mask.to(target.device),
                                generation_config=cfg)
    result = []
    for row in out[:, width:].tolist():
        stop = next((j for j, t in enumerate(row) if t in target.eos_ids), None)
        result.append((row[:stop] if stop is not None else row, stop is not None))
    return result


def _pools(convs: Iterable[Conversation], size: int) -> Iterator[list[Conversation]]:
    pool = []
    for c in convs:
        pool.append(c)
        if len(pool) == size:
            yield pool
            pool = []
    if pool:
        yield pool


def distill_pool(target, pool: list[Conversation], cfg: DistillConfig, stats: DistillStats,
                 on_batch=None) -> list[tuple[Conversation, list[int], list[str]]]:
    """Regenerate up to max_turns assistant turns for each conversation of the pool, turn by turn, batched."""
    system = {c.id: [m for m in c.messages[:1] if m["role"] == "system"] for c in pool}
    history = {c.id: list(system[c.id]) for c in pool}
    counts = {c.id: [] for c in pool}
    finish = {c.id: [] for c in pool}
    active = list(pool)
    for k in range(cfg.max_turns):
        jobs = []
        for c in active:
            users = c.user_turns
            if k >= len(users) or not users[k].strip():
                continue
            messages = history[c.id] + [{"role": "user", "content": users[k]}]
            ids = target.encode(messages)
            if len(ids) > cfg.max_prompt_tokens or len(ids) + cfg.max_new_tokens > target.max_length:
                stats.skip("prompt too long (first turn)" if k == 0 else "prompt too long (later turn)")
                continue
            jobs.append((c, messages, ids))
        jobs.sort(key=lambda j: len(j[2]))
        for b in range(0, len(jobs), cfg.batch_size):
            chunk = jobs[b:b + cfg.batch_size]
            outs = generate_batch(target, [j[2] for j in chunk], cfg.max_new_tokens, cfg.temperature)
            for (c, messages, _), (new, stopped) in zip(chunk, outs):
                reply = target.tokenizer.decode(new, skip_special_tokens=True)
                history[c.id] = messages + [{"role": "assistant", "content": reply}]
                counts[c.id].append(len(new) + int(stopped))
                finish[c.id].append("eos" if stopped else "length")
                stats.turns += 1
                stats.new_tokens += len(new) + int(stopped)
                stats.truncated_replies += int(not stopped)
            if on_batch:
                on_batch()
        active = [j[0] for j in jobs]
    done = []
    for c in pool:
        if counts[c.id]:
            done.append((Conversation(c.id, history[c.id]), counts[c.id], finish[c.id]))
    return done


def distill(target, data: str | Path, out: str | Path, cfg: DistillConfig, progress: bool = True) -> DistillStats:
    """Run (or resume) self-distillation of `data` into the JSONL file `out`."""
    from tqdm import tqdm

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    skip = done_ids(out)
    read = ReadStats()
    stats = DistillStats(already_done=len(skip))
    torch.manual_seed(cfg.seed)

    def todo() -> Iterator[Conversation]:
        n = len(skip)
        for c in read_conversations(data, read):
            if cfg.max_conversations is not None and n >= cfg.max_conversations:
                return
            if c.id in skip:
                continue
            n += 1
            yield c

    total = None if cfg.max_conversations is None else max(cfg.max_conversations - len(skip), 0)
    bar = tqdm(total=total, unit="conv", disable=not progress, mininterval=5, file=sys.stderr)
    start = time.perf_counter()

    def tick() -> None:
        stats.seconds = time.perf_counter() - start
        bar.set_postfix(tok=stats.new_tokens, tok_s=f"{stats.tokens_per_s:.0f}", refresh=False)
        bar.refresh()

    with open(out, "a", encoding="utf-8") as f:
        for pool in _pools(todo(), cfg.batch_size * cfg.pool_factor):
            for conv, counts, finish in distill_pool(target, pool, cfg, stats, tick):
                f.write(write_sharegpt(conv, new_tokens=counts, finish=finish) + "\n")
                stats.conversations += 1
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(pool))
            tick()
    bar.close()
    stats.seconds = time.perf_counter() - start
    for reason, n in read.skipped.items():
        stats.skip(f"input: {reason}", n)
    return stats


def _run(args) -> int:
    from koala.cli import target_from_args

    target = target_from_args(args)
    cfg = DistillConfig(args.max_conversations, args.max_turns, args.max_new_tokens, args.batch_size,
                        args.temperature, args.max_prompt_tokens, args.pool_factor, args.seed)
    stats = distill(target, args.data, args.out, cfg)
    skipped = ", ".join(f"{k}: {v}" for k, v in sorted(stats.skipped.items())) or "none"
    print(json.dumps({"out": str(args.out), "conversations_written": stats.conversations,
                      "already_done": stats.already_done, "turns": stats.turns, "new_tokens": stats.new_tokens,
                      "replies_cut_at_max_new_tokens": stats.truncated_replies,
                      "seconds": round(stats.seconds, 1), "tokens_per_s": round(stats.tokens_per_s, 1),
                      "skipped": stats.skipped}))
    print(f"skipped: {skipped}", file=sys.stderr)
    return 0


def add_command(sub) -> None:
    from koala.cli import add_target_args

    p = sub.add_parser("distill", help="regenerate a chat dataset's assistant turns with the target (resumable)")
    p.add_argument("--data", required=True, help="ShareGPT JSON/JSONL(.gz) or MT-bench question file")
    p.add_argument("--out", required=True, help="output JSONL (appended; ids already there are skipped)")
    p.add_argument("--max-conversations", type=int, default=None, help="stop once the output holds this many")
    p.add_argument("--max-turns", type=int, default=2, help="user turns answered per conversation")
    p.add_argument("--max-new-tokens", type=int, default=256, help="per assistant reply")
    p.add_argument("--max-prompt-tokens", type=int, default=1024, help="longer prompts are skipped (counted)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--pool-factor", type=int, default=4,
                   help="read batch-size x this many conversations ahead, sorted by length (output written per pool)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0)
    add_target_args(p)
    p.set_defaults(func=_run)
