"""scripts/task_prompts.py: Spec-Bench-shaped prompts from ShareGPT text, readable by `koala distill`."""
import importlib.util
import json
from pathlib import Path

from koala.data import read_conversations

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "task_prompts.py"
spec = importlib.util.spec_from_file_location("task_prompts", SCRIPT)
task_prompts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(task_prompts)


def _sharegpt(path: Path, n: int) -> Path:
    rows = []
    for i in range(n):
        words = 60 + 25 * i  # replies of 60..
        reply = " ".join(f"w{i}x{k}" for k in range(words)) if i % 5 else "```python\nprint(1)\n```"
        rows.append({"id": f"c{i}", "conversations": [{"from": "human", "value": f"question {i}?"},
                                                      {"from": "gpt", "value": reply}]})
    rows.append({"id": "bad", "conversations": []})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompts_have_the_benchmark_shapes_and_use_each_conversation_once(tmp_path):
    src = _sharegpt(tmp_path / "sg.jsonl", 30)
    prompts, stats = task_prompts.task_prompts(src, per_task=3, seed=1)
    assert stats.skipped and sum(stats.skipped.values()) == 1  # the empty record is counted, not fatal
    assert [r["category"] for r in prompts].count("summarize") == 3 and len(prompts) == 6
    ids = [r["question_id"].split("-", 1)[1] for r in prompts]
    assert len(set(ids)) == len(ids)
    for r in prompts:
        text = r["turns"][0]
        assert "```" not in text
        i = int(r["question_id"].split("-c")[1])
        if r["category"] == "summarize":
            assert text.startswith("Summarize: w") and 150 <= len(text.split()) - 1 <= 900
        else:
            lines = text.split("\n")
            assert lines[-1] == f"question {i}?" and 3 <= len(lines) - 1 <= 5
            assert f"w{i}x0 w{i}x1" in text and all(len(p.split()) <= 120 for p in lines[:-1])
    assert task_prompts.task_prompts(src, per_task=3, seed=1)[0] == prompts  # deterministic
    out = tmp_path / "q.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in prompts))
    assert [c.user_turns for c in read_conversations(out)] == [r["turns"] for r in prompts]
