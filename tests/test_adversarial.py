import json

import pytest
import torch

from koala.adversarial import AdvConfig, Discriminator, Draft, d_loss, g_loss


def _drafts(n=32, steps=3, vocab=20, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(n, d, generator=g)
    real = torch.log_softmax(torch.randn(n, steps, vocab, generator=g) * 3, -1)
    fake_logits = torch.zeros(n, steps, vocab, requires_grad=True)  # a "head" that is uniform
    return ctx, real, fake_logits


@pytest.mark.parametrize("loss", ["nonsaturating", "hinge", "lsgan"])
@pytest.mark.parametrize("level", ["sequence", "position"])
def test_discriminator_learns_and_gradient_reaches_the_head(loss, level):
    torch.manual_seed(0)
    ctx, real, fake_logits = _drafts()
    cfg = AdvConfig(loss=loss, level=level, d_hidden=32, r1=0.1 if loss == "hinge" else 0.0,
                    spectral_norm=loss == "lsgan")
    disc = Discriminator(16, 3, torch.randn(20, 16), cfg)
    opt = torch.optim.Adam(disc.parameters(), lr=1e-2)
    fake = Draft(ctx, torch.log_softmax(fake_logits, -1))
    first = d_loss(disc, Draft(ctx, real), fake, cfg).item()
    for _ in range(60):
        opt.zero_grad()
        d_loss(disc, Draft(ctx, real), fake, cfg).backward()
        opt.step()
    assert d_loss(disc, Draft(ctx, real), fake, cfg).item() < first
    assert fake_logits.grad is None  # D's loss never touches the head
    disc.requires_grad_(False)
    g_loss(disc, fake, cfg).backward()
    assert fake_logits.grad is not None and fake_logits.grad.abs().sum() > 0  # through the soft embeddings


def test_features_enter_the_discriminator():
    ctx, real, fake_logits = _drafts()
    disc = Discriminator(16, 3, torch.randn(20, 16), AdvConfig(use_features=True, d_hidden=8))
    feats = torch.randn(32, 3, 16, requires_grad=True)
    disc(Draft(ctx, torch.log_softmax(fake_logits, -1), feats)).sum().backward()
    assert feats.grad.abs().sum() > 0


def test_lambda_schedule_and_validation():
    cfg = AdvConfig(weight=0.4, start=10, warmup=4)
    assert [cfg.lam(s) for s in (0, 9, 10, 11, 13, 50)] == [0.0, 0.0, 0.1, 0.2, 0.4, 0.4]
    assert cfg.lam(50, scale=0.5) == 0.2
    with pytest.raises(ValueError, match="adversarial loss"):
        AdvConfig(loss="wgan")


def test_blowups_are_skipped_logged_and_halve_lambda(llama_target, tmp_path, monkeypatch):
    import koala.train.loop as kt
    from koala.heads.checkpoint import load_head
    from koala.hidden_cache import OnlineSource

    calls = {"n": 0}
    real_g = kt.g_loss

    def exploding(disc, fake, cfg):
        calls["n"] += 1
        out = real_g(disc, fake, cfg)
        return out * float("nan") if 2 <= calls["n"] <= 7 else out

    monkeypatch.setattr(kt, "g_loss", exploding)
    g = torch.Generator().manual_seed(0)
    seqs = [(torch.randint(2, 120, (14,), generator=g).tolist(), [j >= 3 for j in range(14)]) for _ in range(8)]
    cfg = kt.TrainConfig(head="medusa", layers=1, num_heads=2, max_steps=10, batch_size=4, warmup=1, save_every=5,
                         eval_sequences=2, adversarial=True, adv=AdvConfig(start=0, warmup=1, contexts=8))
    res = kt.train(llama_target, OnlineSource(llama_target, seqs), tmp_path / "run", cfg, progress=False)
    events = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "event" in json.loads(x)]
    assert len(events) == 6 and res["skipped_steps"] == 6
    assert res["lambda_scale"] == 0.25  # halved after 3 and after 6 blow-ups in a row
    head = load_head(res["head_dir"], llama_target)
    assert all(torch.isfinite(p).all() for p in head.state_dict().values())
