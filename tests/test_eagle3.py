"""The eagle3 head kind: aux-layer features from the verify forward, lossless drafting, training on a cache with
aux layers, and the EAGLE-3 export layout computed independently of the head's own code."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_target
from koala.acceptance import Sampling
from koala.decode import Decoder, Request, generate
from koala.drafters.base import Drafter
from koala.drafters.eagle import Eagle3Drafter
from koala.export import export_head, import_head
from koala.heads import HeadConfig
from koala.heads.checkpoint import build_head, load_head, save_head
from koala.hidden_cache import HiddenCache, build_cache, default_aux_layers, parse_aux_layers
from koala.train import train
from test_drafters_medusa import PROMPT
from test_train import distilled, small_cfg

AUX = [0, 1, 2]  # the tiny targets have 2 layers: embeddings, middle, final pre-norm state


def eagle3_head(target, layers=1, draft_vocab=None, scale=0.1, seed=0):
    torch.manual_seed(seed)
    cfg = HeadConfig.for_target(target, "eagle3", layers, draft_vocab=draft_vocab, aux_layers=AUX)
    head = build_head(cfg, target)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(scale * torch.randn_like(p))
    return head.eval()


def test_default_aux_layers_and_parsing():
    assert default_aux_layers(30) == (2, 15, 27)  # SmolLM2: what llama.cpp assumes for a 30-layer target
    assert parse_aux_layers("auto", 30) == (2, 15, 27)
    assert parse_aux_layers("1,4,30", 30) == (1, 4, 30) and parse_aux_layers("none", 30) == ()
    for bad in ("31", "a,b", "-1"):
        with pytest.raises(ValueError, match="--aux-layers"):
            parse_aux_layers(bad, 30)


@pytest.mark.parametrize("arch,layers,tree,reduced", [("llama", 1, "dynamic", False), ("llama", 2, "static", True),
                                                      ("qwen2", 3, "chain", True)])
def test_random_eagle3_head_is_lossless_under_greedy(arch, layers, tree, reduced):
    target = tiny_target(arch)
    vanilla = generate(target, PROMPT, max_new_tokens=20)
    head = eagle3_head(target, layers, list(range(1, 70)) if reduced else None)
    drafter = Eagle3Drafter(head, tree=tree, depth=3, top_k=3, total_tokens=8)
    out = generate(target, PROMPT, drafter, max_new_tokens=20)
    assert out.tokens == vanilla.tokens
    assert out.stats.drafted_tokens > 0
    assert drafter.cache.get_seq_length() == drafter.committed


def test_eagle3_sampling_runs(llama_target):
    head = eagle3_head(llama_target, 2, list(range(2, 90)))
    out = generate(llama_target, PROMPT, Eagle3Drafter(head, depth=3), Sampling(temperature=0.7), max_new_tokens=15,
                   seed=3)
    assert 1 <= len(out.tokens) <= 15


class Spy(Drafter):
    """Records what the loop hands to `observe`."""

    def __init__(self, layers=()):
        self.feature_layers, self.seen = tuple(layers), []

    def observe(self, hidden, next_ids):
        self.seen.append(hidden.clone())


def test_the_loop_hands_each_drafter_the_features_it_reads(llama_target):
    """One batch, one forward per step: a drafter reading layers [2, 0] gets exactly the inputs to those layers of
    a plain full forward over the committed tokens, its neighbour the final states."""
    decoder = Decoder(llama_target)
    spies = [Spy((2, 0)), Spy()]
    rows = [decoder.add(Request(PROMPT, spy, max_new_tokens=6)) for spy in spies]
    while decoder.busy:
        decoder.step()
    ids = torch.tensor([rows[0].ids[:-1]])
    with torch.inference_mode():
        out = llama_target.body(input_ids=ids, output_hidden_states=True)
    want = torch.cat([out.hidden_states[2], out.hidden_states[0]], dim=-1)[0]
    torch.testing.assert_close(torch.cat(spies[0].seen), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat(spies[1].seen), out.last_hidden_state[0], atol=1e-4, rtol=1e-4)


def test_eagle3_trains_on_a_cache_with_aux_layers(llama_target, tmp_path):
    data = distilled(tmp_path, llama_target, n=12)
    build_cache(llama_target, data, tmp_path / "plain", max_length=64, progress=False)
    with pytest.raises(ValueError, match="--aux-layers auto"):
        train(llama_target, HiddenCache(tmp_path / "plain"), tmp_path / "bad", small_cfg("eagle3", layers=1),
              progress=False)
    manifest = build_cache(llama_target, data, tmp_path / "aux", max_length=64, progress=False, aux_layers=(0, 1, 2))
    assert manifest["aux_layers"] == [0, 1, 2]
    cache = HiddenCache(tmp_path / "aux")
    batch = cache.batch([0])
    n = int(batch.valid.sum())
    with torch.inference_mode():
        out = llama_target.body(input_ids=batch.ids[:, :n], output_hidden_states=True)
    want = torch.cat([out.hidden_states[i] for i in (0, 1, 2)], dim=-1)[0]
    torch.testing.assert_close(batch.aux[0, :n], want, atol=2e-2, rtol=2e-3)  # stored as fp16
    with pytest.raises(ValueError, match="same --aux-layers"):
        build_cache(llama_target, data, tmp_path / "aux", max_length=64, progress=False, append=True)
    cfg = small_cfg("eagle3", layers=2, adversarial=True, max_steps=4)
    result = train(llama_target, cache, tmp_path / "run", cfg, progress=False)
    head = load_head(tmp_path / "run" / "head", llama_target)
    assert head.cfg.kind == "eagle3" and head.cfg.aux_layers == [0, 1, 2]
    assert "acc@2" in result["final_eval"] and "reg1" not in result["final_eval"]  # token-level loss only
    vanilla = generate(llama_target, PROMPT, max_new_tokens=12)
    assert generate(llama_target, PROMPT, Eagle3Drafter(head, depth=2), max_new_tokens=12).tokens == vanilla.tokens


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _engine_eagle3(t, cfg, aux, emb, pos):
    """The EAGLE-3 draft step as the engines define it, written from the exported tensors alone: fc on the
    concatenated target features, attention over [norm(embedding) | hidden_norm(fused)] with the fused state as
    residual, MLP, final norm, LM head over the draft vocabulary, d2t to target ids."""
    eps, nh, nkv = cfg["rms_norm_eps"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg["head_dim"] if cfg.get("head_dim") else cfg["hidden_size"] // nh
    h = aux @ t["fc.weight"].T
    x = torch.cat([_rms(emb, t["midlayer.input_layernorm.weight"], eps),
                   _rms(h, t["midlayer.hidden_norm.weight"], eps)], dim=-1)
    T = x.shape[0]
    q = (x @ t["midlayer.self_attn.q_proj.weight"].T).view(T, nh, hd).transpose(0, 1)
    k = (x @ t["midlayer.self_attn.k_proj.weight"].T).view(T, nkv, hd).transpose(0, 1)
    v = (x @ t["midlayer.self_attn.v_proj.weight"].T).view(T, nkv, hd).transpose(0, 1)
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
    ang = pos[:, None].float() * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(z):
        z1, z2 = z[..., :hd // 2], z[..., hd // 2:]
        return z * cos + torch.cat([-z2, z1], -1) * sin

    q, k = rope(q), rope(k)
    k, v = k.repeat_interleave(nh // nkv, 0), v.repeat_interleave(nh // nkv, 0)
    att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    h = h + att.transpose(0, 1).reshape(T, -1) @ t["midlayer.self_attn.o_proj.weight"].T
    m = _rms(h, t["midlayer.post_attention_layernorm.weight"], eps)
    act = torch.nn.functional.silu(m @ t["midlayer.mlp.gate_proj.weight"].T) * (m @ t["midlayer.mlp.up_proj.weight"].T)
    h = h + act @ t["midlayer.mlp.down_proj.weight"].T
    logits = _rms(h, t["norm.weight"], eps) @ t["lm_head.weight"].T
    draft = logits.argmax(-1)
    return h, draft + t["d2t"][draft]


def test_export_layout_computes_the_koala_head(llama_target, tmp_path):
    vocab = list(range(5, 100))
    head = eagle3_head(llama_target, 1, vocab, scale=0.2)
    save_head(head, tmp_path / "head", dtype=torch.float32)
    notes = export_head(tmp_path / "head", "llama.cpp-eagle3", tmp_path / "out", llama_target)
    assert any("--spec-type draft-eagle3" in n for n in notes)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    t = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["num_hidden_layers"] == 1
    assert cfg["draft_vocab_size"] == len(vocab) and cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == AUX
    assert t["d2t"].dtype == torch.int64 and (t["d2t"] + torch.arange(len(vocab))).tolist() == vocab
    assert t["t2d"].dtype == torch.bool and t["t2d"].nonzero().flatten().tolist() == vocab
    assert t["fc.weight"].shape == (64, 3 * 64) and t["midlayer.self_attn.q_proj.weight"].shape[1] == 2 * 64
    torch.manual_seed(1)
    aux, ids = torch.randn(7, 3 * 64), torch.randint(0, 128, (7,))
    emb = llama_target.model.get_input_embeddings().weight.detach()[ids]
    state, tokens = _engine_eagle3(t, cfg, aux, emb, torch.arange(7))
    with torch.no_grad():
        ours = head(aux[None], ids[None], torch.arange(7)[None])[0]
        our_tokens = head.lm_head.to_target(head.logits(ours).argmax(-1))
    torch.testing.assert_close(state, ours, atol=1e-4, rtol=1e-4)
    assert tokens.tolist() == our_tokens.tolist()
    back = import_head(tmp_path / "out", llama_target)
    for k, v in head.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_deeper_heads_are_refused_by_the_eagle3_layouts(llama_target, tmp_path):
    save_head(eagle3_head(llama_target, 2), tmp_path / "head")
    with pytest.raises(ValueError, match="exactly one draft decoder layer"):
        export_head(tmp_path / "head", "vllm-eagle3", tmp_path / "out", llama_target)
    save_head(eagle3_head(llama_target, 1), tmp_path / "h1")
    with pytest.raises(ValueError, match="holds eagle heads"):
        export_head(tmp_path / "h1", "vllm-eagle", tmp_path / "out", llama_target)


def test_drafter_for_an_eagle3_head_measures_its_plan_on_three_layer_features(llama_target, tmp_path, monkeypatch):
    """The factory path end to end: plan measured with 3d-wide synthetic features, prompt lookup first, gate; the
    wrappers pass the head's layers on, and greedy output stays the target's."""
    from koala.drafters import plan
    from koala.drafters.factory import drafter_for_head

    monkeypatch.setenv("KOALA_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(plan, "MAX_SPREAD", float("inf"))
    save_head(eagle3_head(llama_target, 1), tmp_path / "e3", extra={"acceptance": [0.9, 0.9]})
    drafter = drafter_for_head(tmp_path / "e3", llama_target, tree="chain", depth=2)
    assert drafter.feature_layers == tuple(AUX)
    vanilla = generate(llama_target, PROMPT, max_new_tokens=16)
    assert generate(llama_target, PROMPT, drafter, max_new_tokens=16).tokens == vanilla.tokens
