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
    from koala.heads import save_head
    from test_drafters_medusa import random_head

    save_head(random_head(llama_target, "eagle", 1), tmp_path / "e")
    with pytest.raises(ValueError, match="depth"):
        drafter_for_head(tmp_path / "e", llama_target, depth=0)
