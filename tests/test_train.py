import json

import pytest
import torch

from koala.adversarial import AdvConfig
from koala.heads import load_head
from koala.hidden_cache import HiddenCache, OnlineSource, TokenStats, build_cache, tokenize_file
from koala.train import DraftVocab, TrainConfig, head_step, split_indices, train, unroll_mask, windows


def distilled(tmp_path, target, n=24, reply=12):
    """Distilled data: the tiny target's own greedy replies to short prompts (what `koala distill` writes)."""
    from koala.distill import DistillConfig, distill

    src = tmp_path / "prompts.jsonl"
    src.write_text("\n".join(json.dumps({"id": str(i), "conversations": [
        {"from": "human", "value": f"w{2 + i % 90} w{3 + (7 * i) % 90} w{5 + (3 * i) % 80}"}]}) for i in range(n)))
    out = tmp_path / "distilled"
    distill(target, src, out, DistillConfig(max_turns=1, max_new_tokens=reply, batch_size=8), progress=False)
    return out / "conversations.jsonl"


def online(target, path):
    return OnlineSource(target, tokenize_file(target, path, 64, TokenStats()))


def small_cfg(head="medusa", **kw):
    base = dict(head=head, layers=2, num_heads=3, unroll=1, max_steps=6, batch_size=4, lr=3e-3, warmup=2,
                eval_sequences=4, eval_every=3, log_every=1, save_every=100, seed=1)
    base.update(kw)
    return TrainConfig(**base)


def test_unroll_mask_sees_real_context_and_own_chain():
    m = unroll_mask(2, 5, "cpu")[0, 0]
    # query t=4 at step 2: real positions <= 2, step-1 block position 3, step-2 block position 4 (itself)
    assert m[4].nonzero().flatten().tolist() == [0, 1, 2, 5 + 3, 10 + 4]
    assert m.any(-1).all()  # no query without a key


@pytest.mark.parametrize("head", ["medusa", "eagle"])
def test_cache_and_online_give_the_same_loss(llama_target, tmp_path, head):
    data = distilled(tmp_path, llama_target, n=6)
    build_cache(llama_target, data, tmp_path / "c", max_length=64, progress=False)
    cache, live = HiddenCache(tmp_path / "c"), online(llama_target, data)
    by_ids = {tuple(cache.tokens(i)[0].tolist()): i for i in range(len(cache))}
    idx = [by_ids[tuple(s[0])] for s in live.sequences[:4]]
    from koala.heads.checkpoint import build_head
    from koala.heads import HeadConfig

    cfg = small_cfg(head)
    torch.manual_seed(0)
    h = build_head(HeadConfig.for_target(llama_target, head, 2, num_heads=3), llama_target)
    ident = DraftVocab.build(llama_target, None, "cpu")
    with torch.no_grad():
        a = head_step(h, cache.batch(idx), ident, cfg, train=False)
        b = head_step(h, live.batch([0, 1, 2, 3]), ident, cfg, train=False)
    assert a.acc == b.acc
    assert torch.allclose(a.loss, b.loss, rtol=1e-4, atol=1e-5) and float(a.loss) > 0


def test_medusa_trains_saves_and_reports(llama_target, tmp_path):
    source = online(llama_target, distilled(tmp_path, llama_target))
    cfg = small_cfg(max_steps=20, eval_every=10, draft_vocab=40, lr=1e-2)
    manifest = train(llama_target, source, tmp_path / "run", cfg, progress=False, command="test")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("split") == "eval"]
    assert evals[-1]["loss"] < evals[0]["loss"]
    assert set(manifest["final_eval"]) >= {"acc@1", "acc@2", "acc@3", "loss"}
    head = load_head(manifest["head_dir"], llama_target)
    assert len(head.cfg.draft_vocab) == 40 and 1 in head.cfg.draft_vocab  # EOS always kept
    assert head.extra["acceptance"] == [manifest["final_eval"][f"acc@{i}"] for i in (1, 2, 3)]
    assert (tmp_path / "run" / "metrics.png").stat().st_size > 0
    assert manifest["draft_vocab_size"] == 40 and manifest["steps"] == 20


@pytest.mark.parametrize("head,adversarial", [("medusa", False), ("eagle", True)])
def test_resume_after_kill_is_exact(llama_target, tmp_path, head, adversarial):
    source = online(llama_target, distilled(tmp_path, llama_target, n=12))
    adv = AdvConfig(start=1, warmup=2, contexts=8, r1=0.1 if head == "eagle" else 0.0)

    def cfg():
        return small_cfg(head, adversarial=adversarial, adv=adv, save_every=3, draft_vocab=50)

    full = train(llama_target, source, tmp_path / "full", cfg(), progress=False)
    assert train(llama_target, source, tmp_path / "cut", cfg(), progress=False, stop_at=5) == {}  # "killed"
    with pytest.raises(ValueError, match="--resume"):
        train(llama_target, source, tmp_path / "cut", cfg(), progress=False)
    resumed = train(llama_target, source, tmp_path / "cut", cfg(), resume=True, progress=False)
    a, b = load_head(full["head_dir"], llama_target), load_head(resumed["head_dir"], llama_target)
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k
    from safetensors.torch import load_file

    sa = load_file(str(tmp_path / "full" / "checkpoint" / "state.safetensors"))
    sb = load_file(str(tmp_path / "cut" / "checkpoint" / "state.safetensors"))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(k.startswith("disc.") for k in sa) == adversarial
    assert full["final_eval"] == resumed["final_eval"]


def test_split_is_fixed_and_disjoint():
    tr, ev = split_indices(100, 8)
    assert len(ev) == 8 and not set(tr) & set(ev) and split_indices(100, 8) == (tr, ev)
