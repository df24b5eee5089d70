import json

import numpy as np
import pytest
import torch

from koala.distill import TEXT, DistillConfig, distill
from koala.hidden_cache import HiddenCache, tokenize_conversation
from koala.slots import SlotModel


def _data(tmp_path, n=5, extra=()):
    path = tmp_path / "in.jsonl"
    lines = []
    for i in range(n):
        turns = [{"from": "human", "value": f"w{5 + i} w{9 + i}"}, {"from": "gpt", "value": "w3"},
                 {"from": "human", "value": f"w{20 + i}"}, {"from": "gpt", "value": "w4"}]
        lines.append(json.dumps({"id": f"c{i}", "conversations": turns}))
    lines.append(json.dumps({"id": "long", "conversations": [{"from": "human", "value": " ".join(["w7"] * 80)}]}))
    lines += list(extra)
    path.write_text("\n".join(lines) + "\n")
    return path


def _greedy(target, ids, n):
    """Plain one-sequence greedy reference through transformers."""
    ids = torch.tensor([ids])
    out = []
    for _ in range(n):
        t = int(target.model(ids).logits[0, -1].argmax())
        out.append(t)
        if t in target.eos_ids:
            return out, True
        ids = torch.cat([ids, torch.tensor([[t]])], 1)
    return out, False


def test_slot_model_matches_the_target_body(any_target):
    """Prefill into some slots, then per-row decode steps at different positions: hidden states equal the body's."""
    torch.manual_seed(0)
    ids = torch.randint(2, 100, (3, 12))
    ref = any_target.body(input_ids=ids, use_cache=False).last_hidden_state
    sm = SlotModel(any_target.model, slots=4, capacity=16)
    lengths = [5, 8, 3]
    width = max(lengths)
    pre = torch.zeros(3, width, dtype=torch.long)
    for r, n in enumerate(lengths):
        pre[r, :n] = ids[r, :n]
    h = sm.forward(1, pre, torch.arange(width).expand(3, width))  # rows live in slots 1..3
    for r, n in enumerate(lengths):
        assert torch.allclose(h[r, :n], ref[r, :n], atol=1e-5)
    for _ in range(3):
        step = torch.tensor([[ids[r, n]] for r, n in enumerate(lengths)])
        h = sm.forward(1, step, torch.tensor([[n] for n in lengths]))
        for r, n in enumerate(lengths):
            assert torch.allclose(h[r, 0], ref[r, n], atol=1e-5)
        lengths = [n + 1 for n in lengths]
    sm.move(3, 0, lengths[2])  # slot 3's row moved to slot 0 keeps decoding identically
    h = sm.forward(0, ids[2:3, lengths[2]:lengths[2] + 1], torch.tensor([[lengths[2]]]))
    assert torch.allclose(h[0, 0], ref[2, lengths[2]], atol=1e-5)


def test_distill_equals_greedy_and_stores_aligned_hidden_states(llama_target, tmp_path):
    data, out = _data(tmp_path), tmp_path / "out"
    # batch 2 with 5 conversations: rows finish at different steps and waiting prompts join in their place
    cfg = DistillConfig(max_turns=2, max_new_tokens=6, batch_size=2, max_prompt_tokens=40)
    stats = distill(llama_target, data, out, cfg, progress=False)
    assert stats.conversations == 5 and stats.skipped == {"prompt over --max-prompt-tokens (first turn)": 1}
    rows = {r["id"]: r for r in map(json.loads, (out / TEXT).read_text().splitlines())}
    assert sorted(rows) == [f"c{i}" for i in range(5)]
    for i in range(5):
        conv = rows[f"c{i}"]["conversations"]
        msgs = [{"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]} for t in conv]
        if len(msgs) >= 2:  # turn 1 is the target's greedy reply
            new, stopped = _greedy(llama_target, llama_target.encode(msgs[:1]), 6)
            text = llama_target.tokenizer.decode(new[:-1] if stopped else new, skip_special_tokens=True)
            assert msgs[1]["content"] == text
        if len(msgs) == 4:  # turn 2 was asked after the target's own turn-1 reply
            new, _ = _greedy(llama_target, llama_target.encode(msgs[:3]), 6)
            assert llama_target.tokenizer.decode(new, skip_special_tokens=True).startswith(msgs[3]["content"])
    cache = HiddenCache(out)
    assert len(cache) == 5 and cache.manifest["tokens"] == stats.tokens
    for i in range(len(cache)):
        b = cache.batch([i])
        n = int(b.valid.sum())
        ref = llama_target.body(input_ids=b.ids[:, :n], use_cache=False).last_hidden_state[0]
        assert torch.allclose(b.hidden[0, :n], ref, atol=2e-3)  # fp16 storage
        # the mask covers exactly the tokens the target wrote (an end-of-turn token only where it emitted one)
        mask = b.loss_mask[0, :n].tolist()
        ids = b.ids[0, :n].tolist()
        written = [t for t, m in zip(ids, mask) if m]
        assert written and all(t != llama_target.tokenizer.convert_tokens_to_ids("<assistant>") for t in written)


def test_distill_keeps_the_aux_layers_an_eagle3_head_reads(llama_target, tmp_path):
    """The same generation with aux layers on: identical text and final states, plus the inputs to the chosen
    layers (2 = the tiny target's final state), in the same order as asked, matching transformers' hidden_states."""
    data = _data(tmp_path)
    cfg = DistillConfig(max_new_tokens=6, batch_size=2, max_prompt_tokens=40)
    distill(llama_target, data, tmp_path / "plain", cfg, progress=False)
    distill(llama_target, data, tmp_path / "aux", DistillConfig(max_new_tokens=6, batch_size=2, max_prompt_tokens=40,
                                                                aux_layers=(2, 0)), progress=False)
    assert (tmp_path / "plain" / TEXT).read_text() == (tmp_path / "aux" / TEXT).read_text()
    plain, aux = HiddenCache(tmp_path / "plain"), HiddenCache(tmp_path / "aux")
    assert aux.aux_layers == (2, 0) and plain.aux_layers == ()
    for i in range(len(aux)):
        a, b = aux.batch([i]), plain.batch([i])
        n = int(a.valid.sum())
        assert torch.equal(a.hidden, b.hidden) and b.aux is None
        out = llama_target.body(input_ids=a.ids[:, :n], output_hidden_states=True)
        ref = torch.cat([out.hidden_states[2], out.hidden_states[0]], dim=-1)[0]
        assert torch.allclose(a.aux[0, :n], ref, atol=2e-2, rtol=2e-3)  # fp16 storage
    with pytest.raises(ValueError, match="same --aux-layers"):
        distill(llama_target, data, tmp_path / "aux", cfg, progress=False)


def test_cut_reply_has_no_end_token_in_its_mask(llama_target, tmp_path):
    out = tmp_path / "out"
    distill(llama_target, _data(tmp_path, 3), out, DistillConfig(max_new_tokens=2, batch_size=4), progress=False)
    rows = list(map(json.loads, (out / TEXT).read_text().splitlines()))
    cache = HiddenCache(out)
    for i, r in enumerate(rows):
        ids, mask, _ = cache.tokens(i)
        written = [int(t) for t, m in zip(ids, mask) if m]
        assert len(written) == r["new_tokens"][0]
        if r["finish"] == ["length"]:
            assert not set(written) & llama_target.eos_ids
        # the same sequence through the template (what `koala cache` would store) masks an end token it never wrote
        templ_ids, templ_mask = tokenize_conversation(llama_target, [
            {"role": "user", "content": r["conversations"][0]["value"]},
            {"role": "assistant", "content": r["conversations"][1]["value"]}])
        assert sum(templ_mask) >= len(written)


def test_distill_resumes_exactly_and_keys_by_position(llama_target, tmp_path):
    dup = json.dumps({"id": "c0", "conversations": [{"from": "human", "value": "w40 w41"}]})  # repeated id
    bad = '{"id": "s", "conversations": [{"from": "human", "value": "w5 \\ud800"}]}'  # lone surrogate
    data = _data(tmp_path, 4, extra=[dup, bad, dup])
    cfg = DistillConfig(max_new_tokens=5, batch_size=2, max_prompt_tokens=40, shard_tokens=1)
    whole = distill(llama_target, data, tmp_path / "whole", cfg, progress=False)
    # the two records with id c0 (and the third, same text) are all kept: keys are positions, not ids
    rows = list(map(json.loads, (tmp_path / "whole" / TEXT).read_text().splitlines()))
    assert sorted(r["key"] for r in rows) == [0, 1, 2, 3, 5, 7]  # 4: prompt too long, 6: the surrogate
    assert [r["id"] for r in rows].count("c0") == 3 and whole.conversations == 6
    assert whole.skipped["input: invalid Unicode (lone surrogate)"] == 1

    part = DistillConfig(max_conversations=3, max_new_tokens=5, batch_size=2, max_prompt_tokens=40, shard_tokens=1)
    distill(llama_target, data, tmp_path / "part", part, progress=False)
    # a run killed after its JSONL append but before the manifest: the line is dropped on resume
    with open(tmp_path / "part" / TEXT, "a") as f:
        f.write('{"key": 99, "conversa')
    resumed = distill(llama_target, data, tmp_path / "part", cfg, progress=False)
    assert resumed.already_done == 3 and resumed.conversations == 3
    skips = [json.loads((tmp_path / d / "manifest.json").read_text())["skipped"] for d in ("whole", "part")]
    assert skips[0] == skips[1] and skips[0]  # a resumed run counts each skipped record once
    a, b = HiddenCache(tmp_path / "whole"), HiddenCache(tmp_path / "part")

    def by_key(c, path):
        keys = [r["key"] for sh in c.manifest["shards"]
                for r in json.loads((path / sh["name"] / "records.json").read_text())]
        return {k: (np.asarray(c.tokens(i)[0]).tolist(), np.asarray(c.tokens(i)[1]).tolist())
                for i, k in enumerate(keys)}

    assert by_key(a, tmp_path / "whole") == by_key(b, tmp_path / "part")
    keys = [r["key"] for r in map(json.loads, (tmp_path / "part" / TEXT).read_text().splitlines())]
    assert sorted(keys) == sorted(by_key(b, tmp_path / "part"))


def test_after_continues_an_earlier_distillation_at_its_next_turn(llama_target, tmp_path):
    from koala.hidden_cache import TokenStats, tokenize_records

    data = _data(tmp_path)
    earlier = tmp_path / "first.jsonl"  # an earlier run's records: 0-2 ended normally, 3 was cut, 4 is missing
    earlier.write_text("".join(json.dumps({
        "id": f"c{i}", "conversations": [{"from": "human", "value": f"w{5 + i} w{9 + i}"},
                                         {"from": "gpt", "value": f"w{30 + i} w31"}],
        "new_tokens": [3], "finish": ["length" if i == 3 else "eos"], "key": i}) + "\n" for i in range(4)))
    cfg = DistillConfig(max_turns=2, max_new_tokens=6, batch_size=2, max_prompt_tokens=40)
    stats = distill(llama_target, data, tmp_path / "second", cfg, progress=False, after=earlier)
    assert stats.skipped == {"--after reply cut at its length limit (no later turn)": 1,
                             "not in the --after file": 2}  # 4 and the long one
    second = {r["key"]: r for r in map(json.loads, (tmp_path / "second" / TEXT).read_text().splitlines())}
    assert sorted(second) == [0, 1, 2]
    cache = HiddenCache(tmp_path / "second")
    keys = [r["key"] for sh in cache.manifest["shards"]
            for r in json.loads((tmp_path / "second" / sh["name"] / "records.json").read_text())]
    retokenized = {k: mask for k, _, mask in tokenize_records(llama_target, tmp_path / "second" / TEXT, 1000,
                                                              TokenStats())}
    for k, r in second.items():
        turns = r["conversations"]
        assert [t["value"] for t in turns[:3]] == [f"w{5 + k} w{9 + k}", f"w{30 + k} w31", f"w{20 + k}"]
        msgs = [{"role": "user", "content": turns[0]["value"]}, {"role": "assistant", "content": turns[1]["value"]},
                {"role": "user", "content": turns[2]["value"]}]
        new, _ = _greedy(llama_target, llama_target.encode(msgs), 6)  # turn 2: the target's greedy reply
        assert llama_target.tokenizer.decode(new, skip_special_tokens=True).startswith(turns[3]["value"])
        assert r["context_turns"] == 1 and r["new_tokens"] == [0, len(new)]
        mask = np.asarray(cache.tokens(keys.index(k))[1]).tolist()
        assert sum(mask) == len(new)  # turn 1 is context: the earlier file's run trains on it
        again = retokenized[k]  # `koala cache` of this text masks the same tokens (plus the template's tail)
        assert mask == again[:len(mask)] and not any(again[len(mask):])
    with pytest.raises(ValueError, match="no distilled records"):
        distill(llama_target, data, tmp_path / "x", cfg, progress=False, after=data)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="max-new-tokens"):
        DistillConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        DistillConfig(temperature=float("nan"))
