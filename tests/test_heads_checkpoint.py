import json

import pytest
import torch

from conftest import tiny_target
from koala.heads import HeadConfig
from koala.heads.checkpoint import load_head, save_head
from koala.heads.checkpoint import build_head


def _randomised(target, kind, **kw):
    torch.manual_seed(0)
    head = build_head(HeadConfig.for_target(target, kind, 2, **kw), target)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return head


@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_fp16_round_trip(llama_target, tmp_path, kind):
    head = _randomised(llama_target, kind, draft_vocab=list(range(3, 40)))
    out = save_head(head, tmp_path / "head", extra={"acceptance": [0.5, 0.4]})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_head(out, llama_target)
    assert loaded.extra == {"acceptance": [0.5, 0.4]} and loaded.cfg == head.cfg
    for k, v in head.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v.half().float())
    # the frozen target weights are re-attached, not stored: the file is only the trainable part
    size = (out / "model.safetensors").stat().st_size
    assert size < 2 * sum(p.numel() for p in head.parameters()) + 10_000


def test_overwrite_is_atomic_and_leaves_no_tmp(llama_target, tmp_path):
    save_head(_randomised(llama_target, "medusa"), tmp_path / "h")
    save_head(_randomised(llama_target, "medusa"), tmp_path / "h")
    assert [p.name for p in tmp_path.iterdir()] == ["h"]


def test_mismatched_target_names_both_sides(llama_target, tmp_path):
    save_head(_randomised(llama_target, "medusa"), tmp_path / "h")
    other = tiny_target("llama", seed=123)  # same shapes, different weights
    with pytest.raises(ValueError, match=r"lm_head_sha256 '[0-9a-f]+'.*has lm_head_sha256 '[0-9a-f]+'"):
        load_head(tmp_path / "h", other)
    qwen = tiny_target("qwen2")
    with pytest.raises(ValueError, match="architecture 'LlamaForCausalLM'.*'Qwen2ForCausalLM'"):
        load_head(tmp_path / "h", qwen)


def test_corrupt_and_missing_files_give_clear_errors(llama_target, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a koala head directory"):
        load_head(tmp_path, llama_target)
    out = save_head(_randomised(llama_target, "eagle"), tmp_path / "h")
    (out / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_head(out, llama_target)
    (out / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        load_head(out, llama_target)
    (out / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid koala head config"):
        load_head(out, llama_target)


def test_weights_of_another_head_are_rejected(llama_target, tmp_path):
    a = save_head(_randomised(llama_target, "medusa"), tmp_path / "a")
    b = save_head(build_head(HeadConfig.for_target(llama_target, "medusa", 3), llama_target), tmp_path / "b")
    (a / "model.safetensors").write_bytes((b / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="does not match its config"):
        load_head(a, llama_target)
    meta = json.loads((b / "config.json").read_text())
    meta["config"]["colour"] = "red"
    (b / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="Unknown head config fields"):
        load_head(b, llama_target)


def test_config_disagreeing_with_weights_fails_before_allocating(llama_target, tmp_path):
    """A config claiming 100,000 layers is refused from the weight file's header, before any parameter exists."""
    import json

    from koala.heads import HeadConfig
    from koala.heads.checkpoint import load_head, save_head
    from koala.heads.checkpoint import build_head

    for kind, key in (("eagle", "layers"), ("medusa", "num_heads")):
        d = save_head(build_head(HeadConfig.for_target(llama_target, kind, 1, num_heads=2), llama_target),
                      tmp_path / kind)
        meta = json.loads((d / "config.json").read_text())
        meta["config"][key] = 100_000
        (d / "config.json").write_text(json.dumps(meta))
        with pytest.raises(ValueError, match="corrupt or from different heads"):
            load_head(d, llama_target)


def test_non_finite_weights_are_refused(llama_target, tmp_path):
    from safetensors.torch import load_file, save_file

    from koala.heads import HeadConfig
    from koala.heads.checkpoint import load_head, save_head
    from koala.heads.checkpoint import build_head

    d = save_head(build_head(HeadConfig.for_target(llama_target, "medusa", 1, num_heads=2), llama_target),
                  tmp_path / "h")
    tensors = load_file(str(d / "model.safetensors"))
    first = sorted(tensors)[0]
    tensors[first][0] = float("nan")
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "koala-head/1"})
    with pytest.raises(ValueError, match="non-finite"):
        load_head(d, llama_target)
