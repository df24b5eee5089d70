import json

import pytest
import torch

from koala.adversarial import AdvConfig
from koala.heads.checkpoint import load_head
from koala.hidden_cache import HiddenCache, OnlineSource, TokenStats, build_cache, tokenize_file
from koala.losses import DraftVocab, unroll_mask
from koala.train import TrainConfig, train
from koala.train.data import split_indices, windows
from koala.train.loop import head_step


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


def _teacher_forced_cache(target, tmp_path, n=8, prompt=6, reply=20, seed=0):
    """A cache over text the target did NOT write (random replies): its argmax often differs from the data."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        words = lambda k: " ".join(f"w{int(t)}" for t in torch.randint(2, 100, (k,), generator=g))
        rows.append(json.dumps({"id": str(i), "conversations": [{"from": "human", "value": words(prompt)},
                                                                {"from": "gpt", "value": words(reply)}]}))
    (tmp_path / "tf.jsonl").write_text("\n".join(rows) + "\n")
    build_cache(target, tmp_path / "tf.jsonl", tmp_path / "tf", max_length=64, progress=False)
    return HiddenCache(tmp_path / "tf")


def test_acc_counts_agreement_with_the_target_argmax_not_the_data(llama_target, tmp_path):
    """Medusa head 0 starts as the identity, so it proposes the target's own argmax at t for token t+2... which is
    exactly what the target would say after t+1 only if t+1 is the target's token. On teacher-forced data the
    stored greedy token, not the data token, must be the reference."""
    from koala.heads import HeadConfig
    from koala.heads.checkpoint import build_head

    cache = _teacher_forced_cache(llama_target, tmp_path)
    batch = cache.batch(list(range(len(cache))))
    # make the data token at t+1 the target's argmax after t, and the stored greedy at t+1 its argmax after t
    # too (a target that repeats itself): then head 0 (= argmax at t) is right by the greedy reference only
    head = build_head(HeadConfig.for_target(llama_target, "medusa", 1, num_heads=1), llama_target)
    cfg = small_cfg("medusa", layers=1, num_heads=1)
    argmax_at = llama_target.lm_head(batch.hidden).argmax(-1)
    batch.greedy = torch.where(batch.greedy >= 0, argmax_at, batch.greedy)  # what build_cache stores
    vocab = DraftVocab.build(llama_target, None, "cpu")
    out = head_step(head, batch, vocab, cfg, train=False)
    hits, n = out.acc[0]
    # reference: head 0's own argmax at t vs the target's argmax at t+1
    w = torch.zeros_like(batch.loss_mask)
    w[:, :-2] = batch.loss_mask[:, 2:]
    b, t = w.nonzero(as_tuple=True)
    assert n == b.numel() and hits == int((argmax_at[b, t] == argmax_at[b, t + 1]).sum())
    assert hits != int((argmax_at[b, t] == batch.ids[b, t + 2]).sum())  # the data-token count differs here


def test_build_cache_stores_the_target_argmax(llama_target, tmp_path):
    cache = _teacher_forced_cache(llama_target, tmp_path)
    b = cache.batch([0, 1])
    ref = llama_target.lm_head(b.hidden).argmax(-1)
    need = torch.zeros_like(b.loss_mask)
    need[:, :-1] = b.loss_mask[:, 1:]
    assert torch.equal(b.greedy[need], ref[need]) and bool((b.greedy[~need] == -1).all())
    assert not torch.equal(b.greedy[need], b.ids[:, 1:][need[:, :-1]])  # random text: argmax != data


def test_draft_vocab_comes_from_the_target_argmax_and_reports_coverage(llama_target, tmp_path):
    from koala.train.data import coverage, greedy_counts

    cache = _teacher_forced_cache(llama_target, tmp_path)
    counts = greedy_counts(cache, list(range(len(cache))), llama_target.config.vocab_size)
    said = {int(t) for i in range(len(cache)) for t in cache.tokens(i)[2] if t >= 0}
    assert set(counts.nonzero().flatten().tolist()) == said
    data_tokens = {int(t) for i in range(len(cache)) for t, m in zip(*cache.tokens(i)[:2]) if m}
    assert said != data_tokens
    assert coverage(counts, sorted(said)) == 1.0 and coverage(counts, sorted(data_tokens - said)) == 0.0
    cfg = small_cfg(max_steps=2, draft_vocab=len(said) + 1)
    manifest = train(llama_target, cache, tmp_path / "run", cfg, progress=False)
    tr, ev = split_indices(len(cache), cfg.eval_sequences)
    chosen = load_head(manifest["head_dir"], llama_target).cfg.draft_vocab
    assert set(greedy_counts(cache, tr, 128).nonzero().flatten().tolist()) <= set(chosen)
    assert manifest["data"]["draft_vocab_coverage_eval"] == round(coverage(greedy_counts(cache, ev, 128), chosen), 4)


def test_windows_train_every_cached_token():
    class Src:
        def length(self, i):
            return [1000, 30, 513][i]

    items = windows(Src(), [0, 1, 2], max_len=512, context=4)
    assert all(b - a <= 512 for _, a, b in items)
    for i, n in enumerate([1000, 30, 513]):
        mine = [(a, b) for j, a, b in items if j == i]
        assert mine[0][0] == 0 and mine[-1][1] == n
        for t in range(n - 4):  # every position with its next 4 tokens lies inside one window
            assert any(a <= t and t + 4 < b for a, b in mine), (i, t)


def test_labels_are_fp32_under_bf16_autocast(llama_target, loss_path):
    from koala.losses import Labels

    vocab = DraftVocab.build(llama_target, None, "cpu")
    h = torch.randn(2, 5, llama_target.config.hidden_size)
    need = torch.ones(2, 5, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lab = Labels(vocab, h, need)
    ref = torch.log_softmax(h.reshape(10, -1) @ llama_target.lm_head.weight.float().T, -1)
    assert lab.p.dtype == torch.float32 and torch.allclose(lab.p, ref.exp(), atol=1e-6)
    # the reported KL is the exact KL(target || q); the trained soft cross-entropy differs by the entropy only
    q = torch.log_softmax(torch.randn(10, ref.shape[1]), -1)
    b, t = need.nonzero(as_tuple=True)
    ce, kl = lab.loss(b, t, q)
    assert kl == pytest.approx(float((ref.exp() * (ref - q)).sum(-1).mean()), rel=1e-4)
    assert float(ce) == pytest.approx(kl + float(-(ref.exp() * ref).sum(-1).mean()), rel=1e-4)


@pytest.fixture(params=["kernels", "torch"])
def loss_path(request, monkeypatch):
    """The label and loss passes on koala's C kernels (where they build), and on torch's ops."""
    from koala import cpu_kernels

    if request.param == "torch":
        monkeypatch.setattr(cpu_kernels, "soft_ce_rows", lambda z, p: None)
        monkeypatch.setattr(cpu_kernels, "softmax_entropy_", lambda z: None)
    elif cpu_kernels.library() is None:
        pytest.skip(f"no C kernels here: {cpu_kernels.why()}")
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_soft_cross_entropy_matches_its_definition_and_gradient(dtype, loss_path):
    from koala.losses import SoftCrossEntropy

    torch.manual_seed(0)
    z = (torch.randn(7, 300) * 3).to(dtype).requires_grad_()
    p = torch.softmax(torch.randn(7, 300) * 2, -1)
    ce = SoftCrossEntropy.apply(z, p)
    ce.backward()
    ce = ce.detach()
    zr = z.detach().double().requires_grad_()
    ref = -(p.double() * torch.log_softmax(zr, -1)).sum(-1).mean()
    ref.backward()
    assert float(ce) == pytest.approx(float(ref.detach()), rel=1e-5)
    assert z.grad.dtype == dtype
    torch.testing.assert_close(z.grad.double(), zr.grad, atol=1e-6 if dtype == torch.float32 else 1e-3, rtol=1e-2)


def test_labels_read_in_any_row_order(llama_target, loss_path):
    from koala.losses import Labels

    vocab = DraftVocab.build(llama_target, None, "cpu")
    torch.manual_seed(0)
    lab = Labels(vocab, torch.randn(2, 6, llama_target.config.hidden_size), torch.rand(2, 6) < 0.8)
    b, t = lab.index.ge(0).nonzero(as_tuple=True)
    q = torch.randn(len(b), vocab.weight.shape[0])
    ce, kl = lab.loss(b, t, q)  # every row in order: read without a gather
    flip = torch.arange(len(b) - 1, -1, -1)
    ce2, kl2 = lab.loss(b[flip], t[flip], q[flip])
    ref = -(lab.p * torch.log_softmax(q, -1)).sum(-1).mean()
    assert float(ce) == pytest.approx(float(ref), rel=1e-5) and float(ce2) == pytest.approx(float(ref), rel=1e-5)
    assert kl == pytest.approx(kl2, rel=1e-4, abs=1e-6)
    ce3, _ = lab.loss(b[1:], t[1:], q[1:])  # a subset: gathered
    assert float(ce3) == pytest.approx(float(-(lab.p[1:] * torch.log_softmax(q[1:], -1)).sum(-1).mean()), rel=1e-5)


def test_max_minutes_fits_the_schedule_and_anneals(llama_target, tmp_path):
    source = online(llama_target, distilled(tmp_path, llama_target, n=8))
    cfg = small_cfg(max_steps=100_000, max_minutes=0.12, eval_every=5, log_every=1)
    manifest = train(llama_target, source, tmp_path / "run", cfg, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    plan = [r for r in rows if r.get("event") == "planned steps from throughput"]
    assert plan and manifest["steps"] == plan[-1]["max_steps"] < 100_000 and not manifest["ended_early"]
    last = [r for r in rows if r.get("split") == "train"][-1]
    assert last["lr"] == pytest.approx(cfg.lr * cfg.min_lr_ratio, rel=0.05)  # annealed, not cut mid-schedule


def test_a_run_that_slows_down_late_still_anneals_before_the_deadline(llama_target, tmp_path, monkeypatch):
    """Round 23's CI: a 7-second run planned 519 steps, then the machine got busy and --max-minutes cut it at step
    378, mid-schedule. Past the early re-plans the loop now re-plans whenever its pace would overrun the deadline."""
    import time

    from koala.train import loop

    update, pace = loop._update, []

    def slow_after_half(run, res, loss, step):
        update(run, res, loss, step)
        state = run.state
        if state["planned"] and step > 0.5 * run.cfg.max_steps:
            if not pace:
                pace.append(state["seconds"] / max(state["step"], 1))
            time.sleep(3 * pace[0])  # every step from here on takes ~4x as long

    monkeypatch.setattr(loop, "_update", slow_after_half)
    source = online(llama_target, distilled(tmp_path, llama_target, n=8))
    cfg = small_cfg(max_steps=100_000, max_minutes=0.05, eval_every=5, log_every=1)
    manifest = train(llama_target, source, tmp_path / "run", cfg, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    plan = [r for r in rows if r.get("event") == "planned steps from throughput"]
    assert not manifest["ended_early"] and manifest["steps"] == plan[-1]["max_steps"]
    last = [r for r in rows if r.get("split") == "train"][-1]
    assert last["lr"] == pytest.approx(cfg.lr * cfg.min_lr_ratio, rel=0.05)


def test_batches_with_nothing_to_learn_are_skipped_and_counted(llama_target, tmp_path):
    cache = _teacher_forced_cache(llama_target, tmp_path, n=4, prompt=40, reply=3)
    for head in ("eagle", "medusa"):
        manifest = train(llama_target, cache, tmp_path / head, small_cfg(head, max_steps=12, batch_size=1,
                                                                          max_seq_len=8), progress=False)
        assert manifest["steps"] == 12 and manifest["empty_batches"] > 0


def test_init_starts_from_a_saved_head_and_keeps_its_vocabulary(llama_target, tmp_path):
    cache = _teacher_forced_cache(llama_target, tmp_path)
    first = train(llama_target, cache, tmp_path / "a", small_cfg(max_steps=3, draft_vocab=30), progress=False)
    before = load_head(first["head_dir"], llama_target)
    cfg = small_cfg(max_steps=1, draft_vocab=50, lr=1e-30, warmup=0, init=first["head_dir"])
    second = train(llama_target, cache, tmp_path / "b", cfg, progress=False)
    after = load_head(second["head_dir"], llama_target)
    assert after.cfg.draft_vocab == before.cfg.draft_vocab
    assert first["init_eval"] is None  # a warm start is scored before its first step; lr ~0 leaves it unchanged
    assert second["init_eval"]["step"] == 0 and second["init_eval"]["acc@1"] == second["final_eval"]["acc@1"]
    for (name, a), b in zip(after.state_dict().items(), before.state_dict().values()):
        assert torch.allclose(a, b), name
    with pytest.raises(ValueError, match="K=2"):
        train(llama_target, cache, tmp_path / "c", small_cfg(layers=1, init=first["head_dir"]), progress=False)


def test_the_plan_is_refit_when_steps_turn_out_slower():
    """The first steps can be faster than the run's average (evaluations, longer windows): re-planning early
    shortens the run so the schedule still anneals in time, and never lengthens it."""
    import types

    from koala.train.loop import _plan

    cfg = small_cfg(max_steps=100_000, max_minutes=10)
    run = types.SimpleNamespace(cfg=cfg, state={"step": 20, "seconds": 20.0, "planned": False}, log=lambda row: None)
    bar = types.SimpleNamespace(total=None)
    _plan(run, bar)
    assert cfg.max_steps == 480 and bar.total == 480  # 1 s/step into 80% of 600 s
    run.state.update(step=100, seconds=200.0)
    _plan(run, bar)
    assert cfg.max_steps == 240  # 2 s/step on average
    run.state.update(step=200, seconds=220.0)
    _plan(run, bar)
    assert cfg.max_steps == 240  # faster again: never longer


def test_init_from_target_starts_eagle_layers_as_the_targets_last(llama_target, tmp_path):
    cache = _teacher_forced_cache(llama_target, tmp_path)
    cfg = small_cfg(head="eagle", max_steps=1, lr=1e-30, warmup=0, init_from_target=True)
    head = load_head(train(llama_target, cache, tmp_path / "a", cfg, progress=False)["head_dir"], llama_target)
    for (name, a), b in zip(head.layers.state_dict().items(), llama_target.body.layers[-2:].state_dict().values()):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-3, rtol=1e-3, msg=name)  # saved in fp16
    with pytest.raises(ValueError, match="no layers shaped"):
        train(llama_target, cache, tmp_path / "b", small_cfg(init_from_target=True), progress=False)


@pytest.mark.parametrize("units", [True, False])
def test_bf16_autocast_only_where_the_cpu_multiplies_bf16(llama_target, tmp_path, monkeypatch, units):
    """--bf16 on a CPU without bf16 units trains in fp32 with a warning (emulated bf16 ran ~45x slower)."""
    import warnings

    import koala.train.loop as loop

    seen = []
    real = torch.autocast

    def spy(*args, **kw):
        seen.append(kw.get("enabled", True))
        return real(*args, **kw)

    monkeypatch.setattr(loop, "bf16_units", lambda: units)
    monkeypatch.setattr(loop.torch, "autocast", spy)
    source = online(llama_target, distilled(tmp_path, llama_target, n=8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manifest = train(llama_target, source, tmp_path / "run", small_cfg(max_steps=2, bf16=True), progress=False)
    warned = [w for w in caught if "no bf16 units" in str(w.message)]
    assert len(warned) == (0 if units else 1)
    assert manifest["autocast_bf16"] is units and seen[0] is units  # the step's autocast; the losses' turn it off
