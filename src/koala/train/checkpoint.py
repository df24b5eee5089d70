"""A run's checkpoint: everything needed to continue bit-exactly (weights, both optimisers, step, RNG, lambda
scale), as safetensors + JSON in a directory replaced atomically."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from koala.atomic import atomic_dir

CKPT = "checkpoint"


def _opt_tensors(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict, list]:
    sd = opt.state_dict()
    tensors = {f"{prefix}.{pid}.{k}": v.detach().cpu().contiguous()
               for pid, st in sd["state"].items() for k, v in st.items()}
    return tensors, sd["param_groups"]


def _load_opt(opt: torch.optim.Optimizer, prefix: str, tensors: dict, groups: list) -> None:
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(out: Path, head, disc, opt_h, opt_d, state: dict) -> None:
    """Everything needed to continue bit-exactly, written to a temp dir and renamed (never half-written)."""
    from safetensors.torch import save_file

    tensors = {f"head.{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    h_opt, h_groups = _opt_tensors(opt_h, "opt_head")
    tensors.update(h_opt)
    d_groups = None
    if disc is not None:
        tensors.update({f"disc.{k}": v.detach().cpu().contiguous() for k, v in disc.state_dict().items()})
        d_opt, d_groups = _opt_tensors(opt_d, "opt_disc")
        tensors.update(d_opt)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    with atomic_dir(out / CKPT) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "opt_head_groups": h_groups,
                                                    "opt_disc_groups": d_groups}))


def load_checkpoint(out: Path, head, disc, opt_h, opt_d) -> dict:
    from safetensors.torch import load_file

    tensors = load_file(str(out / CKPT / "state.safetensors"))
    state = json.loads((out / CKPT / "state.json").read_text())
    head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
    _load_opt(opt_h, "opt_head", tensors, state["opt_head_groups"])
    if disc is not None:
        disc.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("disc.")})
        _load_opt(opt_d, "opt_disc", tensors, state["opt_disc_groups"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return state
