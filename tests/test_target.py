"""Target loading: local directories, clear errors for what cannot be loaded, and the real default target."""
import pytest
import torch

from koala.target import TargetNotFound, load_target, resolve_dtype


def test_load_local_directory(saved_tiny_dir):
    target = load_target(str(saved_tiny_dir))
    assert target.config.hidden_size == 64 and target.eos_ids == {1}
    assert target.max_length == 256
    assert target.device.type == "cpu" and target.dtype == resolve_dtype("auto", "cpu")


def test_missing_targets_fail_clearly(tmp_path):
    with pytest.raises(TargetNotFound, match="does not exist"):
        load_target(str(tmp_path / "nothing.gguf"))
    with pytest.raises(TargetNotFound, match="config.json"):
        load_target(str(tmp_path))
    with pytest.raises(TargetNotFound, match="never downloads"):
        load_target("no-such-org/no-such-model-xyz")
    with pytest.raises(TargetNotFound, match="neither"):
        load_target("not a model")


def test_dtype_and_device_errors(monkeypatch):
    from koala import target as target_module

    monkeypatch.setattr(target_module, "bf16_backend", lambda: "onednn")
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_dtype("auto", "cpu", drafting=True) == torch.bfloat16  # a head on AMX: wide verifies are cheap
    assert resolve_dtype("fp32", "cpu", drafting=True) == torch.float32
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_dtype("auto", "cpu", drafting=True) == torch.float32
    assert resolve_dtype("bf16", "cuda") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("float8", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            load_target("smollm2", device="cuda")


@pytest.mark.slow
def test_default_target_is_smollm2(smollm2):
    cfg = smollm2.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    assert smollm2.decode(smollm2.encode("Hi")).strip().endswith("assistant")


def test_bf16_targets_use_invariant_linears_and_give_the_same_tokens(saved_tiny_dir):
    from koala.decode import generate

    fast = load_target(str(saved_tiny_dir), dtype="bf16")
    plain = load_target(str(saved_tiny_dir), dtype="bf16")
    for module in plain.model.modules():  # undo the patch: F.linear everywhere, the reference
        module.__dict__.pop("forward", None)
    assert "forward" in vars(fast.body.layers[0].self_attn.q_proj) and "forward" in vars(fast.lm_head)
    assert generate(fast, [5, 9, 13], max_new_tokens=12).tokens == generate(plain, [5, 9, 13], max_new_tokens=12).tokens
    assert "forward" in vars(load_target(str(saved_tiny_dir)).lm_head)  # fp32 too: F.linear's rows drift as well


def test_auto_dtype_is_bf16_only_for_commands_that_draft_with_a_head(saved_tiny_dir, monkeypatch):
    import argparse

    from koala.build import target_from_args

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    args = argparse.Namespace(target=str(saved_tiny_dir), device="cpu", dtype="auto", trust_remote_code=False,
                              head="some/head")
    drafting = target_from_args(args)
    assert drafting.dtype == torch.bfloat16 and drafting.model.config._attn_implementation == "koala_exact"
    assert target_from_args(argparse.Namespace(**{**vars(args), "head": None})).dtype == torch.float32


@pytest.mark.parametrize("units", [True, False])
def test_auto_dtype_of_wide_work_follows_the_bf16_units(saved_tiny_dir, monkeypatch, units):
    """distill / cache / train / export (wide batches, compute-bound): bf16 only on a CPU that multiplies bf16, even
    where plain decoding would pick the other dtype."""
    import argparse

    from koala import target as target_module
    from koala.build import target_from_args

    monkeypatch.setattr(target_module, "bf16_units", lambda: units)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: units)  # AMX: plain decoding picks fp32
    monkeypatch.setattr(target_module, "bf16_backend", lambda: "koala")  # AVX2: plain decoding picks bf16
    args = argparse.Namespace(target=str(saved_tiny_dir), device="cpu", dtype="auto", trust_remote_code=False,
                              head=None)
    assert target_from_args(args, verifies=False).dtype == (torch.bfloat16 if units else torch.float32)
    assert target_from_args(args).dtype == (torch.float32 if units else torch.bfloat16)
    assert resolve_dtype("auto", "cuda", wide=True) == torch.bfloat16
    assert resolve_dtype("fp32", "cpu", wide=True) == torch.float32


@pytest.mark.parametrize("backend, want", [("koala", torch.bfloat16), ("onednn", torch.float32),
                                           ("torch", torch.float32)])
def test_auto_dtype_without_amx_follows_the_bf16_kernel(backend, want, monkeypatch):
    from koala import target as target_module

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(target_module, "bf16_backend", lambda: backend)
    assert resolve_dtype("auto", "cpu") == want and resolve_dtype("auto", "cpu", drafting=True) == want
    assert resolve_dtype("auto", "cuda") == torch.bfloat16 and resolve_dtype("fp32", "cpu") == torch.float32


def test_stock_model_is_plain_transformers_and_leaves_the_target_alone(saved_tiny_dir):
    """`hf-stock`'s model: no koala forward on any module, SDPA attention, same logits; the target keeps its kernels."""
    target = load_target(str(saved_tiny_dir), dtype="float32")
    patched = {name for name, m in target.model.named_modules() if "forward" in vars(m)}
    assert patched  # koala's kernels are on the target (else this test checks nothing)
    stock = target.stock_model()
    assert not [name for name, m in stock.named_modules() if "forward" in vars(m)]
    assert stock.config._attn_implementation == "sdpa"
    assert {name for name, m in target.model.named_modules() if "forward" in vars(m)} == patched
    ids = torch.tensor([[3, 5, 7, 11, 13]])
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, target.model(ids).logits, atol=1e-4, rtol=1e-4)
