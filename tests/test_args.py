"""Numeric command-line values are checked as they are read: one sentence naming the flag, exit code 2."""
import pytest

from koala.cli import build_parser


@pytest.mark.parametrize("argv,flag", [
    (["generate", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "--prompt", "x", "--max-new-tokens", "-5"], "--max-new-tokens"),
    (["generate", "--prompt", "x", "--temperature", "nan"], "--temperature"),
    (["generate", "--prompt", "x", "--temperature", "-1"], "--temperature"),
    (["generate", "--prompt", "x", "--top-p", "0"], "--top-p"),
    (["generate", "--prompt", "x", "--depth", "0"], "--depth"),
    (["bench", "--questions", "q.jsonl", "--runs", "0"], "--runs"),
    (["train", "--head", "eagle", "--data", "d", "--out", "o", "--lr", "inf"], "--lr"),
    (["distill", "--data", "d", "--out", "o", "--batch-size", "0"], "--batch-size"),
    (["serve", "--port", "70000"], "--port"),
])
def test_bad_numbers_are_refused_with_the_flag_named(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err


def test_depth_zero_never_becomes_the_default(llama_target, tmp_path):
    from koala.drafters.factory import drafter_for_head
    from koala.heads.checkpoint import save_head
    from test_drafters_medusa import random_head

    save_head(random_head(llama_target, "eagle", 1), tmp_path / "e")
    with pytest.raises(ValueError, match="depth"):
        drafter_for_head(tmp_path / "e", llama_target, depth=0)


def test_an_unwritable_output_is_one_sentence_and_leaves_no_temp_folders(saved_tiny_dir, tmp_path, capsys):
    from koala.cli import main

    tmp_path = tmp_path / "work"  # (saved_tiny_dir lives in tmp_path itself)
    tmp_path.mkdir()
    data = tmp_path / "in.jsonl"
    data.write_text('{"id": "a", "conversations": [{"from": "human", "value": "w5 w6"}]}\n')
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rc = main(["distill", "--data", str(data), "--out", str(blocker / "out"), "--target", str(saved_tiny_dir),
               "--max-new-tokens", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot write" in err and str(blocker) in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "in.jsonl"]


def test_train_flags_are_the_config_fields_with_their_defaults():
    from dataclasses import fields

    from koala.adversarial import AdvConfig
    from koala.train import TrainConfig
    from koala.train.cli import config_from_args

    args = build_parser().parse_args(["train", "--head", "eagle", "--data", "d", "--out", "o"])
    assert config_from_args(args) == TrainConfig(head="eagle")
    flags = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions}
    assert {f.name for f in fields(TrainConfig)} - {"adv"} <= flags
    assert {"adv_" + f.name for f in fields(AdvConfig)} <= flags
    args = build_parser().parse_args(["train", "--head", "medusa", "--data", "d", "--out", "o", "--d-steps", "3",
                                      "--adv-features", "--min-lr-ratio", "0.5", "--draft-vocab", "0"])
    cfg = config_from_args(args)
    assert (cfg.adv.d_steps, cfg.adv.use_features, cfg.min_lr_ratio, cfg.draft_vocab) == (3, True, 0.5, None)
