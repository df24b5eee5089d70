import json

import torch

from koala.distill import DistillConfig, distill, done_ids, generate_batch


def _data(tmp_path, n=5):
    path = tmp_path / "in.jsonl"
    lines = []
    for i in range(n):
        turns = [{"from": "human", "value": f"w{5 + i} w{9 + i}"}, {"from": "gpt", "value": "w3"},
                 {"from": "human", "value": f"w{20 + i}"}, {"from": "gpt", "value": "w4"}]
        lines.append(json.dumps({"id": f"c{i}", "conversations": turns}))
    lines.append(json.dumps({"id": "long", "conversations": [{"from": "human", "value": " ".join(["w7"] * 80)}]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _greedy(target, ids, n):
    """Plain one-sequence greedy reference."""
    ids = torch.tensor([ids])
    out = []
    for _ in range(n):
        t = int(target.model(ids).logits[0, -1].argmax())
        if t in target.eos_ids:
            return out, True
        out.append(t)
        ids = torch.cat([ids, torch.tensor([[t]])], 1)
    return out, False


def test_batched_left_padded_generation_matches_unbatched(llama_target):
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [20]]
    batched = generate_batch(llama_target, prompts, 8)
    assert batched == [_greedy(llama_target, p, 8) for p in prompts]


def test_distill_multi_turn_resumable(llama_target, tmp_path):
    data, out = _data(tmp_path), tmp_path / "out.jsonl"
    cfg = DistillConfig(max_conversations=3, max_turns=2, max_new_tokens=6, batch_size=2, max_prompt_tokens=40)
    stats = distill(llama_target, data, out, cfg, progress=False)
    assert stats.conversations == 3 and stats.turns == 6
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["c0", "c1", "c2"]
    first = rows[0]["conversations"]
    assert [t["from"] for t in first] == ["human", "gpt", "human", "gpt"]
    assert first[1]["value"] != "w3"  # replaced by the target's own reply
    # turn 2 was answered after the target's own turn-1 reply
    reply1 = llama_target.encode([{"role": "user", "content": "w5 w9"}, {"role": "assistant",
                                  "content": first[1]["value"]}, {"role": "user", "content": "w20"}])
    new, _ = _greedy(llama_target, reply1, 6)
    assert first[3]["value"] == llama_target.tokenizer.decode(new, skip_special_tokens=True)
    assert sum(sum(r["new_tokens"]) for r in rows) == stats.new_tokens

    # a killed run leaves a truncated line: it is cut and the run resumes after the complete ids
    with open(out, "a") as f:
        f.write('{"id": "c3", "conversa')
    assert done_ids(out) == {"c0", "c1", "c2"}
    cfg.max_conversations = None
    stats = distill(llama_target, data, out, cfg, progress=False)
    assert stats.already_done == 3 and stats.conversations == 2
    assert stats.skipped == {"prompt too long (first turn)": 1}
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["c0", "c1", "c2", "c3", "c4"]
