"""`koala export`: write a trained head in the checkpoint layout vLLM or SGLang loads, and read such a dir back.

Each head kind declares its layouts and their tensor mappings (koala.kinds.*; the reasons for each choice are in
docs/export.md): vllm-eagle / sglang-eagle (an EAGLE-1 style llama draft model) and vllm-medusa.

config.json also carries a "koala" block (the HeadConfig and export details) so `import_head` can rebuild the exact
KOALA head; the engines ignore unknown config keys.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from koala.args import add_target_args
from koala.atomic import atomic_dir
from koala.build import target_from_args
from koala.heads.checkpoint import build_head, check_compatible, load_head, read_config
from koala.heads.config import CONFIG, WEIGHTS, HeadConfig
from koala.kinds import KINDS, kind

EXPORT_FORMAT = "koala-export/1"
FORMATS = {fmt: k for k in KINDS.values() for fmt in k.formats}  # export layout -> the head kind it holds


def _stored_dtype(head_dir: Path) -> torch.dtype:
    """The dtype the KOALA head was saved in (exporting in it keeps the weights bit-exact)."""
    name = json.loads((head_dir / CONFIG).read_text()).get("dtype", "float16")
    return getattr(torch, name)


def _check_kind(cfg: HeadConfig, fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"Unknown export format {fmt!r}; choose one of {tuple(FORMATS)}.")
    if FORMATS[fmt].name != cfg.kind:
        raise ValueError(f"This is a {cfg.kind} head; format {fmt!r} holds {FORMATS[fmt].name} heads. Use one of "
                         f"{kind(cfg.kind).formats}.")


def _write_dir(out: Path, files: dict[str, Callable[[Path], object]], overwrite: bool) -> None:
    """Write files into `out` through a temporary dir renamed into place (never a half-written export)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"{out} exists and is not empty; choose another --out or pass --force.")
    if out.exists() and not out.is_dir():
        out.unlink()
    with atomic_dir(out) as tmp:
        for name, write in files.items():
            write(tmp / name)


def export_head(head_dir: str | Path, fmt: str, out_dir: str | Path, target, dtype: torch.dtype | None = None,
                overwrite: bool = False) -> list[str]:
    """Export the KOALA head in `head_dir` (trained for `target`) to `out_dir` in format `fmt`.

    dtype defaults to the head's stored dtype, which keeps its weights bit-exact. Returns notes for the user:
    what the engine will do differently from KOALA, if anything.
    """
    head_dir, out = Path(head_dir), Path(out_dir)
    cfg, extra = read_config(head_dir)
    _check_kind(cfg, fmt)
    head = load_head(head_dir, target)
    dtype = dtype or _stored_dtype(head_dir)
    tensors, config, notes, extra_files = kind(cfg.kind).export(head, target, fmt, dtype, out)
    config["koala"] = {"format": EXPORT_FORMAT, "export_format": fmt, "head": cfg.to_dict(), "extra": extra}
    tensors = {k: (v.to("cpu", dtype) if v.is_floating_point() else v.cpu()).contiguous() for k, v in tensors.items()}
    files = {CONFIG: lambda p: p.write_text(json.dumps(config, indent=1)),
             WEIGHTS: lambda p: save_file(tensors, str(p), metadata={"format": "pt"}), **extra_files}
    _write_dir(out, files, overwrite)
    return notes


def _read_export(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    file = path / CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG}; pass a directory written by `koala export`.")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON ({e}).") from e
    meta = config.get("koala") if isinstance(config, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{file} has no koala export block: only heads written by `koala export` can be imported "
                         f"(an engine's own EAGLE-1 checkpoint has no input norm on layer 0, which KOALA heads keep).")
    try:
        tensors = load_file(str(path / WEIGHTS), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path / WEIGHTS} is missing or unreadable ({e}); re-export the head.") from e
    return config, tensors


def import_head(path: str | Path, target) -> torch.nn.Module:
    """Rebuild the KOALA head from a `koala export` directory (weights from its safetensors), for `target`."""
    path = Path(path)
    config, tensors = _read_export(path)
    try:
        cfg = HeadConfig.from_dict(config["koala"]["head"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path / CONFIG}: the koala block is malformed ({e}); re-export the head.") from e
    check_compatible(cfg, target, where=f"The exported head in {path}")
    state = kind(cfg.kind).import_state(cfg, config, tensors, path)
    if tensors:
        raise ValueError(f"{path / WEIGHTS} has unexpected tensors {sorted(tensors)[:4]}; it was edited.")
    head = build_head(cfg, target)
    expected = head.state_dict()
    wrong = [k for k in expected if k not in state or state[k].shape != expected[k].shape]
    if wrong:
        raise ValueError(f"{path / WEIGHTS} does not fit its config (missing or wrong shape: {wrong[:4]}).")
    head.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    head.extra = dict(config["koala"].get("extra") or {})
    return head.eval().requires_grad_(False)


def _export(args: argparse.Namespace) -> int:

    dtype = getattr(torch, args.weights_dtype) if args.weights_dtype else None
    notes = export_head(args.head, args.format, args.out, target_from_args(args, verifies=False), dtype, args.force)
    for note in notes:
        print(f"koala: note: {note}", file=sys.stderr)
    print(f"exported {args.head} as {args.format} to {args.out} (serving: see docs/export.md)")
    return 0


def add_command(sub) -> None:

    p = sub.add_parser("export", help="write a trained head in the layout vLLM or SGLang loads")
    p.add_argument("--head", required=True, help="a koala head directory (config.json + model.safetensors)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="output directory (must be new or empty unless --force)")
    p.add_argument("--weights-dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="dtype of the written weights (default: the head's stored dtype, bit-exact)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out directory")
    add_target_args(p)
    p.set_defaults(func=_export)
