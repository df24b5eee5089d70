"""`koala` command line: a thin layer over the Python API.

Each feature module that offers a subcommand defines `add_command(subparsers)`; it is listed in COMMAND_MODULES.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from koala.args import add_drafter_args, add_sampling_args, add_target_args
from koala.build import drafter_from_args, sampling_from_args, target_from_args

COMMAND_MODULES = ("koala.cli", "koala.distill", "koala.hidden_cache", "koala.train.cli", "koala.chat",
                   "koala.serve", "koala.bench", "koala.calibrate", "koala.demo", "koala.export")


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
