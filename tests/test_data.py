import gzip
import json

import pytest

from koala.data import Conversation, ReadStats, read_conversations, write_sharegpt


def test_sharegpt_jsonl_gz_with_bad_lines_counted(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    good = {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"},
                                         {"from": "user", "value": "more"}, {"from": "chatgpt", "value": "ok"}]}
    sys_first = {"id": "b", "conversations": [{"from": "system", "value": "be nice"},
                                              {"from": "human", "value": "q"}]}
    gpt_first = {"id": "c", "conversations": [{"from": "gpt", "value": "hello"}]}
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(good) + "\n{not json\n\n" + json.dumps(sys_first) + "\n" + json.dumps(gpt_first) + "\n")
        f.write(json.dumps({"id": "d", "conversations": [{"from": "alien", "value": "x"}]}) + "\n")
    stats = ReadStats()
    convs = list(read_conversations(path, stats))
    assert [c.id for c in convs] == ["a", "b"]
    assert [m["role"] for m in convs[0].messages] == ["user", "assistant", "user", "assistant"]
    assert convs[0].user_turns == ["hi", "more"]
    assert convs[1].messages[0] == {"role": "system", "content": "be nice"}
    assert stats.kept == 2 and stats.total_skipped == 3
    assert stats.skipped["malformed JSON line"] == 1
    assert "3 skipped" in stats.summary()


def test_truncated_json_array(tmp_path):
    path = tmp_path / "d.json"
    recs = [{"id": str(i), "conversations": [{"from": "human", "value": f"q{i}"}]} for i in range(3)]
    path.write_text(json.dumps(recs)[:-30])  # cut inside the last record, like the ShareGPT dump
    stats = ReadStats()
    assert [c.id for c in read_conversations(path, stats)] == ["0", "1"]
    assert stats.skipped == {"truncated JSON array tail": 1}


def test_mt_bench_questions(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question_id": 81, "category": "writing", "turns": ["a", "", "b"]}) + "\n"
                    + json.dumps({"question_id": 82, "turns": "oops"}) + "\n")
    stats = ReadStats()
    convs = list(read_conversations(path, stats))
    assert convs[0].id == "81" and convs[0].user_turns == ["a", "b"]
    assert stats.skipped == {"malformed turns list": 1}


def test_write_sharegpt_round_trip(tmp_path):
    conv = Conversation("x", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    path = tmp_path / "o.jsonl"
    path.write_text(write_sharegpt(conv, new_tokens=[3]) + "\n")
    back = list(read_conversations(path))
    assert back[0].messages == conv.messages and json.loads(path.read_text())["new_tokens"] == [3]


def test_missing_file_is_clear():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(read_conversations("/nonexistent/file.jsonl"))
