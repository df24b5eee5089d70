import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaModel

from conftest import tiny_target
from koala.cli import main
from koala.decode import generate
from koala.drafters.eagle import EagleDrafter
from koala.drafters.medusa import MedusaDrafter
from koala.export import export_head, import_head
from koala.heads import HeadConfig
from koala.heads.checkpoint import load_head, save_head
from koala.heads.checkpoint import build_head

K = 2  # layers per head in these tests

# Expected layouts, written down from the engines' loaders (read, not copied):
# - vLLM vllm/model_executor/models/llama_eagle.py: LlamaModel has embed_tokens, layers.N (layer 0 built with
#   disable_input_layernorm -> nn.Identity), fc = Linear(2d, d, bias=False) applied to cat(embeds, hidden); no final
#   norm; no lm_head (shared from the target); its loader indexes params_dict[name] so unknown names fail.
#   vllm/transformers_utils/configs/eagle.py turns architectures "LlamaForCausalLM" into "EagleLlamaForCausalLM".
# - SGLang python/sglang/srt/models/llama_eagle.py: same structure, architecture "LlamaForCausalLMEagle", fc has a
#   bias (default nn.Linear), layer 0's input_layernorm replaced by identity, lm_head weights never loaded (the
#   EAGLE worker sets embed/head from the target, head rows restricted by --speculative-token-map).
# - vLLM vllm/model_executor/models/medusa.py + transformers_utils/configs/medusa.py: blocks.H.layers.J (+ bias when
#   medusa_fc_bias), lm_heads.0.weight loaded as the shared lm_head when original_lm_head, optional int token_map
#   with truncated_vocab_size rows; config model_type "medusa", architectures ["MedusaModel"].
LAYER = {"self_attn.q_proj.weight": ("d", "d"), "self_attn.k_proj.weight": ("kv", "d"),
         "self_attn.v_proj.weight": ("kv", "d"), "self_attn.o_proj.weight": ("d", "d"),
         "mlp.gate_proj.weight": ("i", "d"), "mlp.up_proj.weight": ("i", "d"), "mlp.down_proj.weight": ("d", "i"),
         "input_layernorm.weight": ("d",), "post_attention_layernorm.weight": ("d",)}
EAGLE_LAYOUT = {
    "vllm-eagle": {"config": {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                              "tie_word_embeddings": False},
                   "top": {"fc.weight": ("d", "2d"), "embed_tokens.weight": ("V", "d")}},
    "sglang-eagle": {"config": {"architectures": ["LlamaForCausalLMEagle"], "model_type": "llama",
                                "tie_word_embeddings": False},
                     "top": {"fc.weight": ("d", "2d"), "fc.bias": ("d",), "embed_tokens.weight": ("V", "d")}},
}
MEDUSA_CONFIG = {"architectures": ["MedusaModel"], "model_type": "medusa", "medusa_fc_bias": True,
                 "original_lm_head": True}


def _sizes(target):
    c = target.model.config
    return {"d": c.hidden_size, "2d": 2 * c.hidden_size, "i": c.intermediate_size, "V": c.vocab_size,
            "kv": c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)}


def _head_dir(target, tmp_path, kind, name="head", **kw):
    torch.manual_seed(1)
    head = build_head(HeadConfig.for_target(target, kind, K, **kw), target)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return save_head(head, tmp_path / name, extra={"acceptance": [0.6, 0.4]})


@pytest.mark.parametrize("fmt", ["vllm-eagle", "sglang-eagle"])
def test_eagle_layout_matches_engine(llama_target, tmp_path, fmt):
    src = _head_dir(llama_target, tmp_path, "eagle")
    export_head(src, fmt, tmp_path / "out", llama_target)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    n = _sizes(llama_target)
    expected = {k: tuple(n[s] for s in shape) for k, shape in EAGLE_LAYOUT[fmt]["top"].items()}
    for i in range(K + 1):
        expected.update({f"layers.{i}.{k}": tuple(n[s] for s in shape) for k, shape in LAYER.items()
                         if not (i == 0 and k == "input_layernorm.weight")})  # the engines drop it on layer 0
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    assert {k: config[k] for k in EAGLE_LAYOUT[fmt]["config"]} == EAGLE_LAYOUT[fmt]["config"]
    assert (config["num_hidden_layers"], config["vocab_size"], config["hidden_size"]) == (K + 1, n["V"], n["d"])
    assert config["torch_dtype"] == "float16" and all(v.dtype == torch.float16 for v in tensors.values())
    head = load_head(src, llama_target)
    d = n["d"]  # fc columns: engines take cat(embedding, feature), KOALA cat(feature, embedding)
    assert torch.equal(tensors["fc.weight"][:, :d].float(), head.fc.weight[:, d:])
    assert not any(tensors[f"layers.0.{k}"].any() for k in LAYER if "layernorm" not in k)


def _engine_eagle(out, features, ids, pos):
    """The exported EAGLE dir run the way the engines run it: fc(cat(embed, feature)), layer 0 without its
    input norm, no final norm. Built from HF llama modules and the exported config/weights only."""
    config = json.loads((out / "config.json").read_text())
    tensors = {k: v.float() for k, v in load_file(str(out / "model.safetensors")).items()}
    fields = {k: v for k, v in config.items() if k not in ("koala", "architectures", "model_type", "dtype")}
    model = LlamaModel(LlamaConfig(**fields, attn_implementation="sdpa")).eval()
    model.layers[0].input_layernorm = torch.nn.Identity()
    model.norm = torch.nn.Identity()
    missing = model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("fc.")}, strict=False)
    assert missing.unexpected_keys == [] and missing.missing_keys == []  # every engine weight is present
    x = torch.cat([model.embed_tokens(ids), features], dim=-1) @ tensors["fc.weight"].T + tensors.get("fc.bias", 0)
    return model(inputs_embeds=x, position_ids=pos).last_hidden_state


@pytest.mark.parametrize("fmt,arch", [("vllm-eagle", "llama"), ("sglang-eagle", "llama"), ("vllm-eagle", "mistral")])
def test_exported_eagle_computes_the_koala_head(tmp_path, fmt, arch):
    # the no-op layer 0 and the fc swap must make the engine-style forward equal KOALA's (fp32 export: exact math)
    target = tiny_target(arch)
    src = _head_dir(target, tmp_path, "eagle")
    export_head(src, fmt, tmp_path / "out", target, dtype=torch.float32)
    head = load_head(src, target)
    torch.manual_seed(3)
    feats, ids = torch.randn(1, 7, head.cfg.hidden_size), torch.randint(0, head.cfg.vocab_size, (1, 7))
    pos = torch.arange(7)[None]
    with torch.no_grad():
        torch.testing.assert_close(_engine_eagle(tmp_path / "out", feats, ids, pos), head(feats, ids, pos),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("draft_vocab", [None, list(range(90, 2, -1))])
def test_medusa_layout_and_forward_match_vllm(llama_target, tmp_path, draft_vocab):
    src = _head_dir(llama_target, tmp_path, "medusa", num_heads=3, draft_vocab=draft_vocab)
    export_head(src, "vllm-medusa", tmp_path / "out", llama_target, dtype=torch.float32)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    n = _sizes(llama_target)
    vd = len(draft_vocab) if draft_vocab else n["V"]
    expected = {f"blocks.{h}.layers.{j}.{p}": (n["d"], n["d"]) if p == "weight" else (n["d"],)
                for h in range(3) for j in range(K) for p in ("weight", "bias")}
    expected["lm_heads.0.weight"] = (vd, n["d"])
    if draft_vocab:
        expected["token_map"] = (vd,)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    assert {k: config[k] for k in MEDUSA_CONFIG} == MEDUSA_CONFIG
    assert (config["num_heads"], config["num_hidden_layers"], config["vocab_size"], config["truncated_vocab_size"]) \
        == (3, K, n["V"], vd)
    # vLLM semantics: x + SiLU(W x + b) per block, shared LM head, logits scattered to token_map (rest -inf)
    head = load_head(src, llama_target)
    hidden = torch.randn(5, n["d"])
    for h in range(3):
        x = hidden
        for j in range(K):
            x = x + torch.nn.functional.silu(x @ tensors[f"blocks.{h}.layers.{j}.weight"].T
                                             + tensors[f"blocks.{h}.layers.{j}.bias"])
        logits = x @ tensors["lm_heads.0.weight"].T
        with torch.no_grad():
            ours = head(hidden[None])[0, :, h]
        torch.testing.assert_close(logits, ours, atol=1e-5, rtol=1e-5)
        if draft_vocab:
            assert tensors["token_map"].tolist() == draft_vocab


@pytest.mark.parametrize("kind,fmt,kw", [("eagle", "vllm-eagle", {}), ("eagle", "sglang-eagle", {}),
                                         ("eagle", "vllm-eagle", {"draft_vocab": list(range(2, 80))}),
                                         ("medusa", "vllm-medusa", {"draft_vocab": list(range(2, 80))}),
                                         ("medusa", "vllm-medusa", {"own_lm_head": True})])
def test_round_trip_is_exact_and_decodes_identically(llama_target, tmp_path, kind, fmt, kw):
    src = _head_dir(llama_target, tmp_path, kind, **kw)
    export_head(src, fmt, tmp_path / "out", llama_target)
    original, back = load_head(src, llama_target), import_head(tmp_path / "out", llama_target)
    assert back.cfg == original.cfg and back.extra == {"acceptance": [0.6, 0.4]}
    assert original.state_dict().keys() == back.state_dict().keys()
    for k, v in original.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    drafter = EagleDrafter if kind == "eagle" else MedusaDrafter
    runs = [generate(llama_target, "w5 w9 w7", drafter(h, tree="static", depth=2, top_k=2, total_tokens=6),
                     max_new_tokens=24) for h in (original, back)]
    assert runs[0].tokens == runs[1].tokens
    assert runs[0].stats.accepted_lengths == runs[1].stats.accepted_lengths


def test_sglang_token_map_and_vllm_reduced_vocab_note(llama_target, tmp_path):
    src = _head_dir(llama_target, tmp_path, "eagle", draft_vocab=list(range(2, 80)))
    notes = export_head(src, "sglang-eagle", tmp_path / "sg", llama_target)
    assert torch.load(tmp_path / "sg" / "token_map.pt", weights_only=True).tolist() == list(range(2, 80))
    assert "--speculative-token-map" in notes[0]
    notes = export_head(src, "vllm-eagle", tmp_path / "vl", llama_target)
    assert not (tmp_path / "vl" / "token_map.pt").exists() and "no reduced draft vocabulary" in notes[0]


def test_clear_errors(llama_target, tmp_path):
    medusa, eagle = _head_dir(llama_target, tmp_path, "medusa", "m"), _head_dir(llama_target, tmp_path, "eagle", "e")
    with pytest.raises(ValueError, match="Unknown export format 'onnx'"):
        export_head(eagle, "onnx", tmp_path / "x", llama_target)
    with pytest.raises(ValueError, match="medusa head; format 'vllm-eagle' holds eagle heads.*vllm-medusa"):
        export_head(medusa, "vllm-eagle", tmp_path / "x", llama_target)
    with pytest.raises(ValueError, match="eagle head; format 'vllm-medusa'"):
        export_head(eagle, "vllm-medusa", tmp_path / "x", llama_target)
    own = _head_dir(llama_target, tmp_path, "eagle", "own", own_lm_head=True)
    with pytest.raises(ValueError, match="own LM head"):
        export_head(own, "sglang-eagle", tmp_path / "x", llama_target)
    qwen = tiny_target("qwen2")
    with pytest.raises(ValueError, match="llama-style decoder layers only.*q_proj.bias"):
        export_head(_head_dir(qwen, tmp_path, "eagle", "q"), "vllm-eagle", tmp_path / "x", qwen)
    export_head(eagle, "vllm-eagle", tmp_path / "out", llama_target)
    with pytest.raises(ValueError, match="not empty.*--force"):
        export_head(eagle, "vllm-eagle", tmp_path / "out", llama_target)
    export_head(eagle, "sglang-eagle", tmp_path / "out", llama_target, overwrite=True)
    assert not list(tmp_path.glob(".out.tmp*"))


def test_import_rejects_foreign_or_edited_exports(llama_target, tmp_path):
    with pytest.raises(FileNotFoundError, match="koala export"):
        import_head(tmp_path, llama_target)
    out = tmp_path / "out"
    export_head(_head_dir(llama_target, tmp_path, "eagle"), "vllm-eagle", out, llama_target)
    with pytest.raises(ValueError, match="trained for a target"):
        import_head(out, tiny_target("llama", seed=7))
    tensors = load_file(str(out / "model.safetensors"))
    tensors["layers.0.self_attn.o_proj.weight"][0, 0] = 1.0  # no longer the no-op layer
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match="layer 0 .* not all zeros"):
        import_head(out, llama_target)
    config = json.loads((out / "config.json").read_text())
    del config["koala"]  # what an EAGLE checkpoint from elsewhere looks like
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="only heads written by `koala export`"):
        import_head(out, llama_target)


def test_cli_export(saved_tiny_dir, tmp_path, capsys):
    from koala.target import load_target

    src = _head_dir(load_target(str(saved_tiny_dir)), tmp_path, "medusa")
    argv = ["export", "--head", str(src), "--format", "vllm-medusa", "--out", str(tmp_path / "out"),
            "--target", str(saved_tiny_dir)]
    assert main(argv) == 0 and (tmp_path / "out" / "model.safetensors").is_file()
    assert main(argv) == 2 and "pass --force" in capsys.readouterr().err
    assert main([*argv[:4], "vllm-eagle", *argv[5:]]) == 2
    assert "holds eagle heads" in capsys.readouterr().err
