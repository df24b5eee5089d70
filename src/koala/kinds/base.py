"""What a kind of draft head declares once, so no other module switches on its name."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from koala.heads.config import WEIGHTS


@dataclass(frozen=True)
class HeadKind:
    """One kind of draft head: how to build, draft with, train, size-check and export it.

    build(cfg, target) -> a fresh head wired to the target's frozen weights.
    drafter: the Drafter class (its `defaults` and `default_acceptance` are the kind's drafting defaults).
    train_step(head, batch, vocab, cfg, want_drafts, train, measure) -> koala.losses.StepOut.
    depth(cfg) -> draft steps the training losses cover (acc@1..acc@depth).
    blocks(tensor names) -> {config field: value} a weight file pins down, checked before anything is allocated.
    formats: the `koala export` layouts; export(head, target, fmt, dtype, out dir) -> (tensors, config, notes for the
    user, {extra file name: writer});
    import_state(cfg, config, tensors, path) -> the head's state dict from such a layout.
    aux: the head reads the inputs to chosen target layers (EAGLE-3), so its training cache must hold them.
    """

    name: str
    build: Callable
    drafter: type
    train_step: Callable
    depth: Callable
    blocks: Callable[[list[str]], dict[str, int]]
    formats: tuple[str, ...]
    export: Callable
    import_state: Callable
    aux: bool = False


def take(tensors: dict[str, torch.Tensor], name: str, path: Path) -> torch.Tensor:
    """Remove and return a tensor an exported layout must hold, with an error naming the file otherwise."""
    if name not in tensors:
        raise ValueError(f"{path / WEIGHTS} lacks {name!r}; the export is incomplete or was edited.")
    return tensors.pop(name)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# llama config fields copied from the target's config into an exported EAGLE / EAGLE-3 config
LLAMA_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "hidden_act", "rms_norm_eps", "max_position_embeddings", "initializer_range", "bos_token_id",
                "eos_token_id")


def llama_config(tcfg: dict) -> dict:
    """The target config's llama fields, with rope settings in both spellings: `rope_parameters` (transformers 5)
    and rope_theta/rope_scaling (older engines read these)."""
    data = {k: tcfg[k] for k in LLAMA_FIELDS if tcfg.get(k) is not None}
    params = tcfg.get("rope_parameters") or {}
    data["rope_theta"] = tcfg.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = tcfg.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    data["rope_scaling"] = scaling
    if params:
        data["rope_parameters"] = params
    return data
