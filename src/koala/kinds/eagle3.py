"""The EAGLE-3 head kind: fused features of three target layers, K decoder layers, token-level training over
several steps on the head's own states (training-time test); exported in the EAGLE-3 layout that llama.cpp's
converter, vLLM and SGLang read (see docs/export.md).

Export layout (one directory, the same for the three engines): `fc.weight`, the decoder layer under `midlayer.`
with its `hidden_norm`, the final `norm.weight`, `lm_head.weight` over the draft vocabulary (the target LM head's
rows, since KOALA's heads score with the frozen target head), `d2t` (target id - draft id, int64) and `t2d` (a
bool mask over the target vocabulary). The engines build exactly one EAGLE-3 decoder layer, so only K = 1 heads
export; K > 1 would need the engines to run layers 2..K as ordinary decoder layers on the head's state.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from koala.drafters.eagle import Eagle3Drafter
from koala.heads.config import CONFIG, HeadConfig
from koala.heads.eagle3 import Eagle3Head
from koala.kinds import eagle
from koala.kinds.base import HeadKind, dtype_name, llama_config, take
from koala.losses import DraftVocab, StepOut

if TYPE_CHECKING:
    from koala.hidden_cache import Batch
    from koala.train.config import TrainConfig

FORMATS = ("llama.cpp-eagle3", "vllm-eagle3", "sglang-eagle3")
ARCHITECTURE = "LlamaForCausalLMEagle3"
LAYER = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
         "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
         "post_attention_layernorm.weight", "hidden_norm.weight")


def build(cfg: HeadConfig, target) -> Eagle3Head:
    model = target.model
    return Eagle3Head(cfg, model.get_input_embeddings().weight, model.get_output_embeddings().weight,
                      model.get_decoder().norm)


def train_step(head, batch: Batch, vocab: DraftVocab, cfg: TrainConfig, want_drafts: bool, train: bool = True,
               measure: bool = True) -> StepOut:
    """Step 0 reads the target's aux-layer inputs at t (and token t+1) and predicts token t+2; unrolled steps
    read the head's own states. Token-level loss only: the head's states need not match any target feature."""
    if batch.aux is None:
        raise ValueError("An eagle3 head trains on the inputs to three target layers, which this cache lacks: "
                         "rebuild it with `koala cache --aux-layers auto`.")
    return eagle.unrolled_step(head, batch, batch.aux, vocab, cfg, want_drafts, train, measure, regress=False)


def _config(cfg: HeadConfig, dtype: torch.dtype) -> dict:
    tcfg = cfg.target_config
    data = llama_config(tcfg)
    layers = list(cfg.aux_layers)
    data.update(architectures=[ARCHITECTURE], model_type="llama", num_hidden_layers=1,
                vocab_size=cfg.vocab_size, draft_vocab_size=cfg.draft_vocab_size,
                target_hidden_size=cfg.hidden_size, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                eagle_aux_hidden_state_layer_ids=layers,
                eagle_config={"eagle_aux_hidden_state_layer_ids": layers, "use_aux_hidden_state": True},
                torch_dtype=dtype_name(dtype), dtype=dtype_name(dtype))
    return data


def export(head, target, fmt: str, dtype: torch.dtype, out: Path) -> tuple[dict, dict, list[str], dict]:
    cfg = head.cfg
    if cfg.layers != 1:
        raise ValueError(f"EAGLE-3 engines build exactly one draft decoder layer (llama.cpp asserts it in "
                         f"src/models/eagle3.cpp), so a K={cfg.layers} head cannot be exported; export a K=1 eagle3 "
                         f"head (docs/export.md says what K > 1 would need).")
    draft = torch.arange(cfg.vocab_size) if cfg.draft_vocab is None else torch.tensor(cfg.draft_vocab)
    t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
    t2d[draft] = True
    tensors = {"fc.weight": head.fc.weight.detach(), "norm.weight": head.norm.weight.detach(),
               "lm_head.weight": head.lm_head.weight.detach(),
               "d2t": draft - torch.arange(len(draft)), "t2d": t2d}
    state = head.layers[0].state_dict()
    tensors.update({f"midlayer.{k}": state[k].detach() for k in LAYER})
    notes = [f"Reads the inputs to target layers {list(cfg.aux_layers)}; the draft vocabulary has "
             f"{cfg.draft_vocab_size} tokens (d2t maps them to target ids)."]
    if fmt == "llama.cpp-eagle3":
        notes.append(f"Convert with llama.cpp: python convert_hf_to_gguf.py {out} --target-model-dir TARGET_HF_DIR "
                     f"--outfile draft.gguf, then run with -md draft.gguf --spec-type draft-eagle3 (see "
                     f"docs/export.md; scripts/llamacpp_eagle3.py does the whole round trip).")
    return tensors, _config(cfg, dtype), notes, {}


def import_state(cfg: HeadConfig, config: dict, tensors: dict, path: Path) -> dict[str, torch.Tensor]:
    if config.get("num_hidden_layers") != 1 or cfg.layers != 1:
        raise ValueError(f"{path / CONFIG}: an EAGLE-3 export holds one decoder layer; the koala block says "
                         f"{cfg.layers}.")
    state = {"fc.weight": take(tensors, "fc.weight", path), "norm.weight": take(tensors, "norm.weight", path)}
    state.update({f"layers.0.{k}": take(tensors, f"midlayer.{k}", path) for k in LAYER})
    lm_head = take(tensors, "lm_head.weight", path)
    if cfg.own_lm_head:
        state["lm_head.weight"] = lm_head
    for name in ("d2t", "t2d", "embed_tokens.weight"):
        tensors.pop(name, None)  # the vocabulary map is in the koala block; the embedding is the target's
    return state


def blocks(keys: list[str]) -> dict[str, int]:
    """Decoder layers, as for EAGLE (the first one is the widened EAGLE-3 layer)."""
    return eagle.blocks(keys)


KIND = HeadKind("eagle3", build, Eagle3Drafter, train_step, lambda cfg: cfg.unroll + 1, blocks, FORMATS, export,
                import_state, aux=True)
