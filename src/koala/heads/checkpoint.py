"""Saving and loading draft heads: config.json + model.safetensors, trainable weights only (no pickle).

The frozen target weights (LM head, embedding) are not stored; `load_head` re-attaches them from the target after
checking that the head was trained for this very target.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from koala.atomic import atomic_dir
from koala.heads.config import CONFIG, WEIGHTS, HeadConfig
from koala.kinds import kind
from koala.kinds.base import dtype_name

FORMAT = "koala-head/1"


def build_head(cfg: HeadConfig, target) -> torch.nn.Module:
    """A freshly initialised head for `target` (a koala Target), wired to its frozen LM head / embedding."""
    return kind(cfg.kind).build(cfg, target)


def save_head(head: torch.nn.Module, out_dir: str | Path, dtype: torch.dtype = torch.float16,
              extra: dict | None = None) -> Path:
    """Write config.json and model.safetensors into `out_dir`, atomically (a tmp dir renamed into place).

    `extra` is free-form JSON metadata kept under "extra" (e.g. {"acceptance": [per-depth rates]} from training,
    which the tree-size chooser uses); it comes back as `head.extra` from load_head.
    """
    out = Path(out_dir)
    tensors = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).clone().contiguous()
               for k, v in head.state_dict().items()}
    meta = {"format": FORMAT, "dtype": dtype_name(dtype), "config": head.cfg.to_dict(),
            "extra": extra or {}}
    with atomic_dir(out) as tmp:
        (tmp / CONFIG).write_text(json.dumps(meta, indent=1))
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
    return out


def read_config(path: str | Path) -> tuple[HeadConfig, dict]:
    """(HeadConfig, extra) from a head directory, with clear errors for missing or malformed files."""
    path = Path(path)
    file = path / CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a koala head directory (no {CONFIG}); pass the directory that "
                                f"`koala train` wrote.")
    try:
        meta = json.loads(file.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r} is not {FORMAT!r}")
        cfg = HeadConfig.from_dict(meta["config"])
        kind(cfg.kind)
        return cfg, dict(meta.get("extra") or {})
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{file} is not a valid koala head config ({e}); re-save the head.") from e


def check_compatible(cfg: HeadConfig, target, where: str = "the head") -> None:
    """Raise ValueError naming both sides when the head was trained for another target."""
    mine, theirs = cfg.target, target.identity
    for key in ("architecture", "hidden_size", "vocab_size", "lm_head_sha256"):
        if mine.get(key) != theirs[key]:
            raise ValueError(f"{where} was trained for a target with {key} {mine.get(key)!r}, but the target "
                             f"{getattr(target, 'name', '?')!r} has {key} {theirs[key]!r}; use the target it was "
                             f"trained for.")


def _check_header(file: Path, cfg: HeadConfig) -> None:
    """Compare the config with the weight file's header before anything is allocated (a config that claims
    100,000 layers must fail here, not after gigabytes of parameters)."""
    try:
        with safe_open(str(file), "pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{file} is not a readable safetensors file ({e}); re-save or re-train the head.") from e
    held = kind(cfg.kind).blocks(keys)
    said = {k: getattr(cfg, k) for k in held}
    if held != said:
        raise ValueError(f"{file} does not match its config ({CONFIG} says {said}; the weights hold {held}); the "
                         f"files are corrupt or from different heads.")


def load_head(path: str | Path, target) -> torch.nn.Module:
    """Load a head for `target` (a koala Target), in the target's dtype and device, in eval mode. Refuses a
    config that disagrees with its weight file (checked before allocating) and non-finite weights."""
    path = Path(path)
    cfg, extra = read_config(path)
    check_compatible(cfg, target, where=f"The head in {path}")
    file = path / WEIGHTS
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing; the head directory is incomplete (re-save the head).")
    _check_header(file, cfg)
    try:
        tensors = load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{file} is not a readable safetensors file ({e}); re-save or re-train the head.") from e
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{file} has non-finite weights (NaN or inf) in {bad[:3]}; re-train or re-save the head.")
    head = build_head(cfg, target)
    expected = head.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{file} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]}, "
                         f"wrong shape {wrong[:3]}); the files are corrupt or from different heads.")
    head.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})
    head.extra = extra
    return head.eval().requires_grad_(False)
