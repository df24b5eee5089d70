#!/usr/bin/env bash
# Round 23 (AVX2 EPYC, 2 cores): the eagle3 heads continued on the later turns in round 22 against the shipped
# eagle3 heads, in one run: bf16 target, the 26 Spec-Bench questions (2 per category), 128 new tokens, greedy,
# 2 threads, three timed runs per question (median kept), nothing else running (the background cache build is
# paused with kill -STOP). eagle3-r22-2node forces the 2-node depth-1 tree on the K=1 head whose own plan, by the
# planner's 3% margin for smaller plans, is a chain of 1: the same head both ways tests that margin.
set -e
cd "$(dirname "$0")/../../.."
H=heads/smollm2-135m
R=runs/round22
.venv/bin/koala bench --questions ../shared/data/spec_bench/question.jsonl --limit-per-category 2 \
  --max-new-tokens 128 --threads 2 --dtype bfloat16 --runs 3 \
  --method eagle3=$H/eagle3 --method eagle3-koala=$H/eagle3-koala \
  --method eagle3-koala-r22=$R/eagle3-koala/head \
  --method eagle3-r22=$R/eagle3/head --method "eagle3-r22-2node=$R/eagle3/head:tree=dynamic,depth=1,total_tokens=2" \
  --out docs/results/round23/bench
