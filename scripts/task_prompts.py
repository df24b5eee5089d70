"""Spec-Bench-style task prompts built from ShareGPT text, for `koala distill` (MT-bench question format).

The reference heads learn from the target's answers to ShareGPT first turns, and score lowest on the Spec-Bench
tasks those rarely ask for: summarization (acc@1 0.34) and retrieval-augmented answers (0.41), against 0.45-0.53
elsewhere (docs/training.md). This writes prompts of those shapes whose text comes from ShareGPT, never from a
benchmark:

- summarize: "Summarize: " and one ShareGPT assistant reply of prose (no code), 150-900 words.
- rag: 3-5 passages (the first 120 words of ShareGPT replies: the one that answered the question, the others drawn
  from other conversations), shuffled, one per line, then the user question they answer.

    .venv/bin/python scripts/task_prompts.py ../shared/data/sharegpt/sharegpt_v3_prefix_conversations.jsonl.gz \\
        --out runs/task-prompts.jsonl --per-task 1500
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from koala.atomic import write_text_atomic
from koala.data import ReadStats, read_conversations


def _prose(text: str, lo: int, hi: int) -> bool:
    """A reply worth summarizing or quoting: lo-hi words, no code block."""
    return "```" not in text and lo <= len(text.split()) <= hi


def _passage(text: str, words: int = 120) -> str:
    return " ".join(text.split()[:words])


def task_prompts(path: str | Path, per_task: int, seed: int = 0) -> tuple[list[dict], ReadStats]:
    """Up to `per_task` prompts of each task, each conversation used for at most one, deterministic in `seed`."""
    stats = ReadStats()
    pairs = []  # (first user turn, first assistant reply) of every readable conversation
    for conv in read_conversations(path, stats):
        msgs = [m for m in conv.messages if m["role"] != "system"]
        if len(msgs) >= 2 and msgs[1]["role"] == "assistant":
            pairs.append((conv.id, msgs[0]["content"].strip(), msgs[1]["content"].strip()))
    rng = random.Random(seed)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    replies = [i for i in order if _prose(pairs[i][2], 60, 100_000)]  # distractor passages
    out: list[dict] = []
    counts = {"summarize": 0, "rag": 0}
    for i in order:
        cid, question, reply = pairs[i]
        if counts["summarize"] < per_task and _prose(reply, 150, 900):
            task, prompt = "summarize", "Summarize: " + reply
        elif counts["rag"] < per_task and _prose(reply, 60, 100_000) and len(question.split()) <= 40 \
                and "```" not in question:
            others = [j for j in rng.sample(replies, 6) if j != i][:rng.randint(2, 4)]
            passages = [_passage(pairs[j][2]) for j in others + [i]]
            rng.shuffle(passages)
            task, prompt = "rag", "\n".join(passages) + "\n" + question
        else:
            continue
        counts[task] += 1
        out.append({"question_id": f"{task}-{cid}", "category": task, "turns": [prompt]})
        if min(counts.values()) >= per_task:
            break
    return out, stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sharegpt", help="ShareGPT conversations (JSON/JSONL, .gz allowed)")
    p.add_argument("--out", required=True, help="MT-bench-format JSONL for `koala distill --data`")
    p.add_argument("--per-task", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    prompts, stats = task_prompts(args.sharegpt, args.per_task, args.seed)
    write_text_atomic(Path(args.out), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in prompts))
    tasks = {t: sum(r["category"] == t for r in prompts) for t in ("summarize", "rag")}
    print(f"wrote {len(prompts)} prompts to {args.out}: {tasks}; read {stats.kept} conversations, "
          f"skipped {sum(stats.skipped.values())} {stats.skipped or ''}")


if __name__ == "__main__":
    main()
