"""Shared fixtures: tiny random causal LMs of several families, wrapped as koala Targets."""
from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PreTrainedTokenizerFast, Qwen2Config

from koala.target import Target

VOCAB = 128
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


def tiny_config(arch: str = "llama", vocab: int = VOCAB, **kw):
    """A 2-layer model with peaked random weights (few near-ties, so greedy comparisons are meaningful)."""
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  initializer_range=0.2, eos_token_id=1, bos_token_id=0, pad_token_id=vocab - 1, tie_word_embeddings=False)
    common.update(kw)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
    if arch == "mistral":
        common.setdefault("sliding_window", None)
    return cls(**common)


def tiny_tokenizer(vocab: int = VOCAB) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: 'w5' is id 5; ids 0/1 are <s>/</s>; the last id is <unk>, also used as padding."""
    words = {"<s>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, vocab - 4)},
             **{w: vocab - 4 + j for j, w in enumerate(["<user>", "<assistant>", "<system>", "<unk>"])}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_target(arch: str = "llama", seed: int | None = None, **kw) -> Target:
    torch.manual_seed(seed if seed is not None else sum(map(ord, arch)))
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kw), attn_implementation="sdpa")
    return Target(model, tiny_tokenizer(kw.get("vocab", VOCAB)), f"tiny-{arch}")


@pytest.fixture(params=["llama", "qwen2", "mistral"])
def any_target(request) -> Target:
    return tiny_target(request.param)


@pytest.fixture
def llama_target() -> Target:
    return tiny_target("llama")


@pytest.fixture
def saved_tiny_dir(tmp_path):
    """A tiny llama saved as a local HF directory (safetensors + tokenizer), loadable by load_target(path)."""
    target = tiny_target("llama")
    target.model.save_pretrained(tmp_path)
    target.tokenizer.save_pretrained(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def smollm2() -> Target:
    """The real default target in fp32 (slow: first load converts the GGUF, later loads are ~1 s). fp32 whatever
    "auto" picks on this CPU, so the suite checks the same thing everywhere."""
    from koala.target import load_target

    return load_target(dtype="float32")
