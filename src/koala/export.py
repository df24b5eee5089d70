"""`koala export`: write a trained head in the checkpoint layout vLLM or SGLang loads, and read such a dir back.

Formats (layouts and the reasons for each choice are in docs/export.md):
- vllm-eagle / sglang-eagle: an EAGLE-1 style llama draft model (fc + decoder layers, no final norm). The engines
  concatenate (embedding, feature) where KOALA concatenates (feature, embedding), so fc's column halves are swapped.
  Both engines drop layer 0's input RMSNorm, which KOALA keeps; to stay exact we prepend an all-zero decoder layer
  (a no-op residual) so that our first layer becomes the engine's layer 1, which has its input norm.
- vllm-medusa: vLLM's Medusa model (blocks.H.layers.J, one shared LM head, optional token_map for a reduced vocab).

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

from koala.args import add_target_args, target_from_args
from koala.atomic import atomic_dir
from koala.heads.checkpoint import CONFIG, WEIGHTS, build_head, check_compatible, load_head, read_config
from koala.heads.config import HeadConfig

EAGLE_FORMATS = ("vllm-eagle", "sglang-eagle")
FORMATS = (*EAGLE_FORMATS, "vllm-medusa")
EXPORT_FORMAT = "koala-export/1"
TOKEN_MAP = "token_map.pt"  # SGLang's --speculative-token-map file (it reads it with torch.load, weights_only)

# The decoder-layer weights of a llama-style layer, the only layer both engines' EAGLE-1 models build.
LLAMA_LAYER = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
               "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
               "input_layernorm.weight", "post_attention_layernorm.weight")
# llama config fields copied from the target's config into an exported EAGLE config
LLAMA_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "hidden_act", "rms_norm_eps", "max_position_embeddings", "initializer_range", "bos_token_id",
                "eos_token_id")  # rope settings are added by _rope_fields
ARCHITECTURES = {"vllm-eagle": "LlamaForCausalLM",  # vLLM prefixes "Eagle" itself (EagleLlamaForCausalLM)
                 "sglang-eagle": "LlamaForCausalLMEagle", "vllm-medusa": "MedusaModel"}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _stored_dtype(head_dir: Path) -> torch.dtype:
    """The dtype the KOALA head was saved in (exporting in it keeps the weights bit-exact)."""
    name = json.loads((head_dir / CONFIG).read_text()).get("dtype", "float16")
    return getattr(torch, name)


def _rope_fields(tcfg: dict) -> dict:
    """Rope settings in both spellings: `rope_parameters` (transformers 5) and rope_theta/rope_scaling (older)."""
    params = tcfg.get("rope_parameters") or {}
    out = {"rope_theta": tcfg.get("rope_theta", params.get("rope_theta", 10000.0))}
    scaling = tcfg.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    out["rope_scaling"] = scaling
    if params:
        out["rope_parameters"] = params
    return out


def _eagle_config(cfg: HeadConfig, fmt: str, dtype: torch.dtype) -> dict:
    tcfg = cfg.target_config
    data = {k: tcfg[k] for k in LLAMA_FIELDS if tcfg.get(k) is not None}
    data.update(_rope_fields(tcfg))
    data.update(architectures=[ARCHITECTURES[fmt]], model_type="llama", vocab_size=cfg.vocab_size,
                num_hidden_layers=cfg.layers + 1,  # + the no-op layer 0, see the module docstring
                tie_word_embeddings=False,  # SGLang aliases lm_head to embed_tokens when tied, then overwrites it
                attention_bias=False, mlp_bias=False, torch_dtype=_dtype_name(dtype), dtype=_dtype_name(dtype))
    return data


def _medusa_config(cfg: HeadConfig, dtype: torch.dtype) -> dict:
    return {"architectures": [ARCHITECTURES["vllm-medusa"]], "model_type": "medusa",
            "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size, "num_heads": cfg.num_heads,
            "num_hidden_layers": cfg.layers, "truncated_vocab_size": cfg.draft_vocab_size,
            "medusa_fc_bias": True,  # our residual blocks have biases (vLLM's default is no bias)
            "original_lm_head": True,  # one LM head shared by all heads, as in KOALA
            "max_paths": 64, "topk": 10, "torch_dtype": _dtype_name(dtype)}


def _check_kind(cfg: HeadConfig, fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"Unknown export format {fmt!r}; choose one of {FORMATS}.")
    want = "eagle" if fmt in EAGLE_FORMATS else "medusa"
    if cfg.kind != want:
        others = [f for f in FORMATS if (f in EAGLE_FORMATS) == (cfg.kind == "eagle")]
        raise ValueError(f"This is a {cfg.kind} head; format {fmt!r} holds {want} heads. Use one of {others}.")
    if want == "eagle" and cfg.own_lm_head:
        raise ValueError("This EAGLE head trained its own LM head copy, but vLLM's and SGLang's EAGLE-1 models "
                         "always use the target's LM head, so it cannot be exported exactly; train the head with "
                         "the frozen target LM head (own_lm_head off) to export it.")


def _eagle_tensors(head, target, fmt: str) -> dict[str, torch.Tensor]:
    """Engine-named tensors: swapped fc, zero layer 0, our layers shifted by one, the target embedding."""
    d = head.cfg.hidden_size
    fc = head.fc.weight.detach()
    tensors = {"fc.weight": torch.cat([fc[:, d:], fc[:, :d]], dim=1),
               "embed_tokens.weight": target.model.get_input_embeddings().weight.detach()}
    if fmt == "sglang-eagle":  # SGLang's fc has a bias (left uninitialised if absent); ours is bias-free
        tensors["fc.bias"] = torch.zeros(d, dtype=fc.dtype)
    for i, layer in enumerate(head.layers):
        state = layer.state_dict()
        if set(state) != set(LLAMA_LAYER):
            extra = sorted(set(state) ^ set(LLAMA_LAYER))
            raise ValueError(f"EAGLE export supports llama-style decoder layers only (llama, mistral targets); "
                             f"this head's {head.cfg.target.get('architecture')} layers differ in {extra[:4]}.")
        tensors.update({f"layers.{i + 1}.{k}": v.detach() for k, v in state.items()})
    for k in LLAMA_LAYER:  # the no-op layer: zero projections give zero attention and MLP outputs exactly
        if k != "input_layernorm.weight":
            like = tensors[f"layers.1.{k}"]
            tensors[f"layers.0.{k}"] = torch.ones_like(like) if "layernorm" in k else torch.zeros_like(like)
    return tensors


def _medusa_tensors(head) -> dict[str, torch.Tensor]:
    tensors = {}
    for h, blocks in enumerate(head.heads):
        for j, block in enumerate(blocks):
            tensors[f"blocks.{h}.layers.{j}.weight"] = block.linear.weight.detach()
            tensors[f"blocks.{h}.layers.{j}.bias"] = block.linear.bias.detach()
    tensors["lm_heads.0.weight"] = head.lm_head.weight.detach()  # already restricted to the draft vocab
    if head.cfg.draft_vocab is not None:
        tensors["token_map"] = torch.tensor(head.cfg.draft_vocab, dtype=torch.long)
    return tensors


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
    notes: list[str] = []
    if cfg.kind == "eagle":
        tensors, config = _eagle_tensors(head, target, fmt), _eagle_config(cfg, fmt, dtype)
        if cfg.draft_vocab is not None and fmt == "vllm-eagle":
            notes.append(f"vLLM's EAGLE-1 model has no reduced draft vocabulary: it will score all {cfg.vocab_size} "
                         f"tokens with the target LM head instead of this head's {cfg.draft_vocab_size}, so its "
                         f"drafts can differ from KOALA's (outputs stay exact; acceptance may change).")
    else:
        tensors, config = _medusa_tensors(head), _medusa_config(cfg, dtype)
    config["koala"] = {"format": EXPORT_FORMAT, "export_format": fmt, "head": cfg.to_dict(), "extra": extra}
    tensors = {k: (v.to("cpu", dtype) if v.is_floating_point() else v.cpu()).contiguous() for k, v in tensors.items()}
    files = {CONFIG: lambda p: p.write_text(json.dumps(config, indent=1)),
             WEIGHTS: lambda p: save_file(tensors, str(p), metadata={"format": "pt"})}
    if cfg.kind == "eagle" and cfg.draft_vocab is not None and fmt == "sglang-eagle":
        ids = torch.tensor(cfg.draft_vocab, dtype=torch.long)
        files[TOKEN_MAP] = lambda p: torch.save(ids, p)
        notes.append(f"Reduced draft vocabulary ({cfg.draft_vocab_size} tokens): start SGLang with "
                     f"--speculative-token-map {out / TOKEN_MAP}.")
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


def _take(tensors: dict[str, torch.Tensor], name: str, path: Path) -> torch.Tensor:
    if name not in tensors:
        raise ValueError(f"{path / WEIGHTS} lacks {name!r}; the export is incomplete or was edited.")
    return tensors.pop(name)


def _eagle_state(cfg: HeadConfig, config: dict, tensors: dict, path: Path) -> dict[str, torch.Tensor]:
    if config.get("num_hidden_layers") != cfg.layers + 1:
        raise ValueError(f"{path / CONFIG}: num_hidden_layers {config.get('num_hidden_layers')} does not match the "
                         f"koala block's {cfg.layers} layers + the no-op layer 0.")
    d = cfg.hidden_size
    fc = _take(tensors, "fc.weight", path)
    state = {"fc.weight": torch.cat([fc[:, d:], fc[:, :d]], dim=1)}
    pad = [_take(tensors, f"layers.0.{k}", path) for k in LLAMA_LAYER if "layernorm" not in k]
    if any(t.any() for t in pad) or tensors.pop("fc.bias", torch.zeros(1)).any():
        raise ValueError(f"{path / WEIGHTS}: layer 0 (or fc.bias) is not all zeros, so this is not the exact "
                         f"layout `koala export` writes; it cannot be turned back into a KOALA head.")
    tensors.pop("layers.0.post_attention_layernorm.weight", None)
    tensors.pop("embed_tokens.weight", None)  # KOALA re-attaches the target's embedding
    for i in range(cfg.layers):
        state.update({f"layers.{i}.{k}": _take(tensors, f"layers.{i + 1}.{k}", path) for k in LLAMA_LAYER})
    return state


def _medusa_state(cfg: HeadConfig, config: dict, tensors: dict, path: Path) -> dict[str, torch.Tensor]:
    if (config.get("num_heads"), config.get("num_hidden_layers")) != (cfg.num_heads, cfg.layers):
        raise ValueError(f"{path / CONFIG}: num_heads/num_hidden_layers do not match the koala block.")
    state = {f"heads.{h}.{j}.linear.{p}": _take(tensors, f"blocks.{h}.layers.{j}.{p}", path)
             for h in range(cfg.num_heads) for j in range(cfg.layers) for p in ("weight", "bias")}
    lm_head = _take(tensors, "lm_heads.0.weight", path)
    token_map = tensors.pop("token_map", None)
    if (token_map.tolist() if token_map is not None else None) != cfg.draft_vocab:
        raise ValueError(f"{path / WEIGHTS}: token_map does not match the koala block's draft vocabulary.")
    if cfg.own_lm_head:
        state["lm_head.weight"] = lm_head
    return state


def import_head(path: str | Path, target) -> torch.nn.Module:
    """Rebuild the KOALA head from a `koala export` directory (weights from its safetensors), for `target`."""
    path = Path(path)
    config, tensors = _read_export(path)
    try:
        cfg = HeadConfig.from_dict(config["koala"]["head"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path / CONFIG}: the koala block is malformed ({e}); re-export the head.") from e
    check_compatible(cfg, target, where=f"The exported head in {path}")
    read = _eagle_state if cfg.kind == "eagle" else _medusa_state
    state = read(cfg, config, tensors, path)
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
    notes = export_head(args.head, args.format, args.out, target_from_args(args), dtype, args.force)
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
