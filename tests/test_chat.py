"""ChatSession (history, streaming, stop, context trimming) and the `koala chat` command on piped stdin."""
from __future__ import annotations

import io

import pytest

from conftest import tiny_target
from koala.chat import ChatSession
from koala.cli import main
from koala.decode import generate
from koala.drafters import PromptLookupDrafter


def test_answers_match_generate_on_the_whole_history():
    target = tiny_target("llama")
    session = ChatSession(target, PromptLookupDrafter(), max_new_tokens=12, system="w9 w9")
    first = "".join(session.answer("w5 w6 w7"))
    messages = [{"role": "system", "content": "w9 w9"}, {"role": "user", "content": "w5 w6 w7"}]
    assert first == generate(target, messages, max_new_tokens=12).text
    assert session.last_stats.new_tokens > 0 and session.last_stats.target_forwards > 0

    second = "".join(session.answer("w8 w8"))
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "w8 w8"}]
    assert second == generate(target, messages, max_new_tokens=12).text
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    assert session.history[-1]["content"] == second

    session.reset()
    assert session.history == []
    assert "".join(session.answer("w5 w6 w7")) == first  # a fresh conversation, same greedy answer


def test_stop_keeps_the_partial_answer():
    target = tiny_target("llama")
    full = "".join(ChatSession(target, max_new_tokens=40).answer("w5 w6"))
    session = ChatSession(target, max_new_tokens=40)
    pieces = []
    for piece in session.answer("w5 w6"):
        pieces.append(piece)
        session.stop()  # as Ctrl-C would, after the first piece
    partial = "".join(pieces)
    assert session.stopped and session.last_stats.new_tokens < 40
    assert partial and full.startswith(partial) and len(partial) < len(full)
    assert session.history[-1] == {"role": "assistant", "content": partial}
    assert "".join(session.answer("w7")) != ""  # the next answer is not stopped by the previous request
    assert not session.stopped


def test_closing_the_stream_keeps_what_was_said():
    session = ChatSession(tiny_target("llama"), max_new_tokens=30)
    stream = session.answer("w5 w6")
    first = next(stream)
    stream.close()  # what a KeyboardInterrupt between pieces does to the generator
    assert session.history[-1]["role"] == "assistant" and session.history[-1]["content"].startswith(first)


def test_old_turns_are_dropped_to_fit_the_context():
    target = tiny_target("llama", max_position_embeddings=64)
    session = ChatSession(target, max_new_tokens=8)
    long = " ".join(f"w{i}" for i in range(10, 30))  # 20 tokens plus template per user turn
    for _ in range(3):
        "".join(session.answer(long))
    assert session.dropped >= 2 and session.dropped % 2 == 0  # whole turns, so roles still alternate
    assert len(session.history) == 6  # the history itself is kept; only the prompt leaves old turns out


def test_a_message_longer_than_the_context_is_refused_cleanly():
    session = ChatSession(tiny_target("llama", max_position_embeddings=32), max_new_tokens=8)
    with pytest.raises(ValueError, match="context holds 32"):
        "".join(session.answer(" ".join(["w5"] * 40)))
    assert session.history == []
    with pytest.raises(ValueError, match="empty"):
        "".join(session.answer("   "))


def test_chat_command_on_piped_stdin(saved_tiny_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("w5 w6\n/reset\n\nw7 w8\n/exit\nnever read\n"))
    code = main(["chat", "--target", str(saved_tiny_dir), "--drafter", "pld", "--max-new-tokens", "6"])
    out = capsys.readouterr()
    assert code == 0
    target = tiny_target("llama")
    for prompt in ("w5 w6", "w7 w8"):
        assert generate(target, prompt, max_new_tokens=6).text in out.out
    assert out.err.count("[pld: ") == 2 and "tau" in out.err and "tok/s" in out.err
    assert "conversation cleared" in out.err
