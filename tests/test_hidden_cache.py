import json

import numpy as np
import pytest
import torch

from koala.hidden_cache import (HiddenCache, OnlineSource, TokenStats, build_cache, greedy_from_hidden,
                                tokenize_conversation, tokenize_file)


def _distilled(tmp_path, n=6):
    path = tmp_path / "distilled.jsonl"
    rows = []
    for i in range(n):
        conv = [{"from": "human", "value": f"w{5 + i} w6"}, {"from": "gpt", "value": f"w{7 + i} w8 w9"}]
        if i % 2:
            conv += [{"from": "human", "value": "w10"}, {"from": "gpt", "value": " ".join(["w11"] * (3 + i))}]
        rows.append(json.dumps({"id": str(i), "conversations": conv}))
    rows.append(json.dumps({"id": "long", "conversations": [{"from": "human", "value": " ".join(["w3"] * 50)},
                                                            {"from": "gpt", "value": "w4"}]}))
    path.write_text("\n".join(rows) + "\n")
    return path


def test_loss_mask_covers_assistant_tokens_and_end_of_turn(llama_target):
    msgs = [{"role": "user", "content": "w5 w6"}, {"role": "assistant", "content": "w7 w8"},
            {"role": "user", "content": "w9"}, {"role": "assistant", "content": "w10"}]
    ids, mask = tokenize_conversation(llama_target, msgs)
    tok = llama_target.tokenizer
    masked = [tok.convert_ids_to_tokens(i) for i, m in zip(ids, mask) if m]
    assert masked == ["w7", "w8", "</s>", "w10", "</s>"]
    assert ids == tok.apply_chat_template(msgs, tokenize=True)["input_ids"] or ids == tok.apply_chat_template(
        msgs, tokenize=True)


def test_cut_and_skip_counted(llama_target, tmp_path):
    stats = TokenStats()
    seqs = tokenize_file(llama_target, _distilled(tmp_path), 20, stats)
    assert len(seqs) == 6 and all(len(s[0]) <= 20 for s in seqs)
    assert stats.skipped == {"no assistant tokens (within max length)": 1}  # the long prompt leaves no reply
    assert stats.cut_sequences >= 1 and stats.cut_tokens > 0


def test_cache_matches_online_hidden_states(llama_target, tmp_path, atol=2e-3):
    data = _distilled(tmp_path)
    manifest = build_cache(llama_target, data, tmp_path / "cache", max_length=64, batch_tokens=40,
                           shard_tokens=30, progress=False)
    assert manifest["sequences"] == 7 and len(manifest["shards"]) > 1 and manifest["bytes"] > 0
    cache = HiddenCache(tmp_path / "cache")
    online = OnlineSource(llama_target, tokenize_file(llama_target, data, 64, TokenStats()))
    assert len(cache) == len(online) == 7
    # the cache is ordered by length; match sequences by their tokens
    by_ids = {tuple(np.asarray(cache.tokens(i)[0]).tolist()): i for i in range(len(cache))}
    order = [by_ids[tuple(s[0])] for s in online.sequences]
    a, b = cache.batch(order[:4]), online.batch([0, 1, 2, 3])
    assert torch.equal(a.ids, b.ids) and torch.equal(a.loss_mask, b.loss_mask) and torch.equal(a.valid, b.valid)
    assert torch.allclose(a.hidden[a.valid], b.hidden[b.valid], atol=atol, rtol=atol)
    # a single unpadded pass gives the same states as the padded batch
    one = online.batch([1])
    n = int(one.valid.sum())
    assert torch.allclose(one.hidden[0, :n], b.hidden[1, :n], atol=1e-5)
    with pytest.raises(ValueError, match="already holds a cache"):
        build_cache(llama_target, data, tmp_path / "cache", progress=False)


def test_not_a_cache(tmp_path):
    with pytest.raises(FileNotFoundError, match="koala cache"):
        HiddenCache(tmp_path)


def test_append_caches_only_new_conversations(llama_target, tmp_path):
    data = _distilled(tmp_path)
    lines = data.read_text().splitlines()
    part = tmp_path / "part.jsonl"
    part.write_text("\n".join(lines[:3]) + "\n")
    first = build_cache(llama_target, part, tmp_path / "c", max_length=64, progress=False)
    assert first["sequences"] == 3
    with pytest.raises(ValueError, match="same --max-length"):
        build_cache(llama_target, data, tmp_path / "c", max_length=32, append=True, progress=False)
    grown = build_cache(llama_target, data, tmp_path / "c", max_length=64, append=True, progress=False)
    fresh = build_cache(llama_target, data, tmp_path / "fresh", max_length=64, progress=False)
    assert grown["sequences"] == fresh["sequences"] == 7 and grown["tokens"] == fresh["tokens"]
    assert len(grown["shards"]) == 2 and len(HiddenCache(tmp_path / "c")) == 7
    assert build_cache(llama_target, data, tmp_path / "c", max_length=64, append=True, progress=False) == grown


def test_a_killed_build_resumes_into_the_same_cache(llama_target, tmp_path, monkeypatch):
    import koala.hidden_cache as hc

    data = _distilled(tmp_path)
    whole = build_cache(llama_target, data, tmp_path / "whole", max_length=64, batch_tokens=20, shard_tokens=10,
                        progress=False)
    assert len(whole["shards"]) >= 3
    write, written = hc.write_shard, []

    def killed_after_two(*a, **kw):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(write(*a, **kw))
        return written[-1]

    monkeypatch.setattr(hc, "write_shard", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_cache(llama_target, data, tmp_path / "c", max_length=64, batch_tokens=20, shard_tokens=10,
                    progress=False)
    assert not (tmp_path / "c").exists()
    assert json.loads((tmp_path / "c.tmp" / "manifest.json").read_text())["shards"] == written
    monkeypatch.setattr(hc, "write_shard", write)
    with pytest.raises(ValueError, match="unfinished cache"):
        build_cache(llama_target, tmp_path / "other.jsonl", tmp_path / "c", max_length=64, progress=False)
    resumed = build_cache(llama_target, data, tmp_path / "c", max_length=64, batch_tokens=20, shard_tokens=10,
                          progress=False)
    drop = ("seconds", "shards")
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in whole.items() if k not in drop}
    a, b = HiddenCache(tmp_path / "whole"), HiddenCache(tmp_path / "c")
    assert len(a) == len(b) == whole["sequences"]
    assert [s["tokens"] for s in resumed["shards"]] == [s["tokens"] for s in whole["shards"]]
    for i in range(len(a)):
        for x, y in zip(a.tokens(i), b.tokens(i)):
            assert np.array_equal(x, y)
    batch_a, batch_b = a.batch(list(range(len(a)))), b.batch(list(range(len(b))))
    assert torch.equal(batch_a.hidden, batch_b.hidden)


def test_koala_cache_publishes_shards_of_the_size_asked_for(saved_tiny_dir, tmp_path):
    """--shard-tokens sets how much work a kill can lose: a shard closes at the first batch boundary past it."""
    from koala.cli import main

    tmp_path = tmp_path / "work"  # (saved_tiny_dir lives in tmp_path itself)
    tmp_path.mkdir()
    data = _distilled(tmp_path)
    common = ["cache", "--data", str(data), "--target", str(saved_tiny_dir), "--max-length", "64",
              "--batch-tokens", "20", "--dtype", "float32"]
    assert main(common + ["--out", str(tmp_path / "small"), "--shard-tokens", "10"]) == 0
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    small, one = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("small", "one"))
    assert len(one["shards"]) == 1 and len(small["shards"]) >= 3
    assert all(sh["tokens"] >= 10 for sh in small["shards"][:-1])
    assert sum(sh["tokens"] for sh in small["shards"]) == one["tokens"] == small["tokens"]


@pytest.mark.slow
def test_smollm2_chat_template_mask(smollm2):
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke"}, {"role": "assistant", "content": "Why did the cat sit?"}]
    ids, mask = tokenize_conversation(smollm2, msgs)
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    texts = [smollm2.tokenizer.decode(s) for s in spans + ([cur] if cur else [])]
    assert texts == ["Hello! How can I help?<|im_end|>", "Why did the cat sit?<|im_end|>"]
    # the prompt part equals what the decode loop feeds the target for the first turn
    assert ids[:len(smollm2.encode(msgs[:1]))] == smollm2.encode(msgs[:1])


def test_a_reply_cut_at_the_length_limit_masks_no_end_token(llama_target, tmp_path):
    """`koala cache` over distilled text: a reply marked finish=length never emitted the end-of-turn token."""
    rows = [{"id": "a", "conversations": [{"from": "human", "value": "w5"}, {"from": "gpt", "value": "w7 w8"}],
             "finish": ["length"]},
            {"id": "b", "conversations": [{"from": "human", "value": "w5"}, {"from": "gpt", "value": "w7 w8"}],
             "finish": ["eos"]}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (ids_a, mask_a), (ids_b, mask_b) = tokenize_file(llama_target, path, 64, TokenStats())
    tok = llama_target.tokenizer
    assert [tok.convert_ids_to_tokens(i) for i, m in zip(ids_a, mask_a) if m] == ["w7", "w8"]
    assert [tok.convert_ids_to_tokens(i) for i, m in zip(ids_b, mask_b) if m] == ["w7", "w8", "</s>"]


@torch.no_grad()
def test_greedy_labels_are_the_fp32_argmax_in_bf16_too(llama_target):
    """Labels of teacher-forced text are the argmax of unrounded fp32 logits, whichever kernel computes them: two
    tokens whose logits differ below bf16's resolution are told apart, not tied."""
    weight = llama_target.lm_head.weight
    weight[0], weight[1] = 1.0, 1.0
    weight[1, 0] = 1 + 2 ** -7  # on ones, logit 1 exceeds logit 0 by 2^-7 at the hidden size, far below a bf16 step
    target = llama_target.with_dtype("bfloat16")
    torch.manual_seed(0)
    hidden = torch.randn(3, 40, target.config.hidden_size).bfloat16().float()
    hidden[:, ::4] = 1.0
    mask = torch.rand(3, 40) < 0.7
    got = greedy_from_hidden(target, hidden, mask)
    want = (hidden.double() @ target.lm_head.weight.double().T).argmax(-1)
    need = torch.zeros_like(mask)
    need[:, :-1] = mask[:, 1:]
    assert (want[:, ::4] == 1).all()
    assert torch.equal(got[need], want[need]) and (got[~need] == -1).all()
