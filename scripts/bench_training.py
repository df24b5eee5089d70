"""Throughput of the training half: distillation (new tokens/s, hidden states kept) and head training tokens/s.

Not a test: numbers depend on the machine and its load (pause other jobs while it runs). Example:
    .venv/bin/python scripts/bench_training.py --cache runs/distill/sharegpt --steps 6 --threads 2 \
        --configs medusa:1 eagle:1:u0 eagle:1 eagle:2:adv --distill-batches 64 --distill-conversations 256
A config is HEAD:K[:adv][:full][:uN] (full = the whole target vocabulary instead of --draft-vocab; uN = EAGLE
unroll N, default 2). Training tokens/s counts every (non-padding) window position, the first step excluded.
Distillation tokens/s counts generated tokens over the whole run (prefill of every prompt included).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from koala.adversarial import AdvConfig
from koala.hidden_cache import HiddenCache
from koala.target import load_target
from koala.train import TrainConfig, train
from koala.train.data import BatchStream, split_indices, windows


def bench_train(target, cache, spec: str, steps: int, batch: int, draft_vocab: int, seq_len: int,
                bf16: bool) -> dict:
    parts = spec.split(":")
    head, layers, flags = parts[0], int(parts[1]), set(parts[2:])
    unroll = next((int(f[1:]) for f in flags if f.startswith("u")), 2)
    cfg = TrainConfig(head=head, layers=layers, adversarial="adv" in flags, adv=AdvConfig(start=0, warmup=1),
                      draft_vocab=None if "full" in flags else draft_vocab, max_steps=steps, batch_size=batch,
                      max_seq_len=seq_len, eval_sequences=0, eval_every=10**9, log_every=10**9, save_every=10**9,
                      unroll=unroll, bf16=bf16)
    # tokens of the steps after the first, from the same deterministic batch stream train() uses
    train_idx, _ = split_indices(len(cache), 0)
    stream = BatchStream(windows(cache, train_idx, seq_len, cfg.depth + 1), batch, cfg.seed)
    tokens = sum(cache.batch(stream.indices_at(s)).tokens for s in range(1, steps))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        first = {}

        orig = cache.batch

        def batch_fn(idx):
            if "t" not in first:
                first["t"] = time.perf_counter()  # the first batch load starts step 0
            elif "t1" not in first:
                first["t1"] = time.perf_counter()  # the second load starts step 1
            return orig(idx)

        cache.batch = batch_fn
        try:
            manifest = train(target, cache, tmp, cfg, progress=False)
        finally:
            cache.batch = orig
        total = time.perf_counter() - t0
    timed = max(manifest["train_seconds"] - (first["t1"] - first["t"]), 1e-9)
    return {"config": spec, "bf16": manifest["autocast_bf16"], "draft_vocab": cfg.draft_vocab, "steps": steps,
            "batch": batch,
            "tokens_per_s": round(tokens / timed, 1), "s_per_step": round(timed / (steps - 1), 2),
            "head_MB_fp16": round(manifest["head_bytes"] / 1e6, 2), "wall_s": round(total, 1)}


def bench_distill(target, data: str, batches: list[int], conversations: int, new_tokens: int) -> list[dict]:
    from koala.distill import DistillConfig, distill

    rows = []
    for b in batches:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = DistillConfig(max_conversations=conversations, batch_size=b, max_new_tokens=new_tokens,
                                max_prompt_tokens=512)
            st = distill(target, data, tmp, cfg, progress=False)
        rows.append({"distill_batch": b, "conversations": st.conversations, "new_tokens": st.new_tokens,
                     "tokens_incl_prompts": st.tokens, "seconds": round(st.seconds, 1),
                     "new_tokens_per_s": round(st.tokens_per_s, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", help="a cache directory from `koala distill` / `koala cache` (training benchmarks)")
    p.add_argument("--configs", nargs="*", default=["medusa:1", "medusa:2:adv", "eagle:1", "eagle:2:adv"])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--fp32", dest="bf16", action="store_false", help="train without bf16 autocast")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--draft-vocab", type=int, default=8192)
    p.add_argument("--distill-data", default="../shared/data/sharegpt/sharegpt_v3_prefix_conversations.jsonl.gz")
    p.add_argument("--distill-batches", default="", help="comma-separated batch sizes, e.g. 32,64")
    p.add_argument("--distill-conversations", type=int, default=256)
    p.add_argument("--distill-new-tokens", type=int, default=320)
    p.add_argument("--dtype", default="bfloat16", help="target dtype (distillation and training labels)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    target = load_target(dtype=args.dtype)
    print(json.dumps({"threads": torch.get_num_threads()}))
    if args.cache:
        cache = HiddenCache(args.cache)
        for spec in args.configs:
            print(json.dumps(bench_train(target, cache, spec, args.steps, args.batch_size, args.draft_vocab,
                                         args.max_seq_len, args.bf16)), flush=True)
    if args.distill_batches:
        bench_distill(target, args.distill_data, [int(b) for b in args.distill_batches.split(",")],
                      args.distill_conversations, args.distill_new_tokens)


if __name__ == "__main__":
    main()
