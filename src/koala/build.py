"""Turn parsed command-line options (the groups in koala.args) into the objects every command needs: the target, the
drafter and the sampling settings."""
from __future__ import annotations

import argparse

from koala.acceptance import Sampling
from koala.drafters import Drafter, PromptLookupDrafter
from koala.drafters.factory import drafter_for_head
from koala.target import Target, load_target, resolve_dtype


def target_from_args(args: argparse.Namespace, verifies: bool = True) -> Target:
    """The --target in the --dtype asked for. verifies=False for commands that never verify drafts (distill,
    cache, train, export): they keep SDPA in bf16 (koala.exact_attention only costs them time), and their "auto"
    dtype is the one for wide batches (bf16 where the CPU multiplies bf16, else fp32). Commands that verify and were
    given a --head get bf16 for "auto" on AMX CPUs."""
    dtype = resolve_dtype(args.dtype, args.device, drafting=verifies and bool(getattr(args, "head", None)),
                          wide=not verifies)
    return load_target(args.target, args.device, dtype, args.trust_remote_code, exact_attention=verifies)


def sampling_from_args(args: argparse.Namespace) -> Sampling:
    return Sampling(args.temperature, args.top_p, args.top_k)


def drafter_from_args(args: argparse.Namespace, target: Target) -> Drafter:
    """The drafter asked for on the command line: a head directory wins, else --drafter."""
    if args.head:
        return drafter_for_head(args.head, target, tree=args.tree, depth=args.depth, top_k=args.draft_top_k,
                                total_tokens=args.total_tokens, gate=args.gate,
                                **({} if args.lookup is None else {"lookup": args.lookup}))
    if args.drafter == "pld":
        return PromptLookupDrafter()
    return Drafter()
