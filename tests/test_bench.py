"""`koala bench`: method specs, question files, and an end-to-end run on a tiny saved llama."""
from __future__ import annotations

import json

import pytest
from conftest import tiny_target
from test_drafters_medusa import random_head

from koala.bench import load_questions, parse_method
from koala.cli import main
from koala.heads.checkpoint import save_head

QUESTIONS = [
    {"question_id": 1, "category": "copy", "turns": ["w5 w6 w7 w8 w5 w6 w7 w8 w5 w6", "w9 w10 w9 w10"]},
    {"question_id": 2, "category": "copy", "turns": ["w20 w21 w22 w20 w21 w22"]},
    {"question_id": 3, "category": "misc", "turns": ["w30 w31 w32 w33 w34 w35"]},
]


def write_questions(path, extra_lines=()):
    path.write_text("\n".join([json.dumps(q) for q in QUESTIONS] + list(extra_lines)) + "\n")
    return path


def test_parse_builtin_and_options():
    m = parse_method("pld")
    assert (m.name, m.kind, m.options) == ("pld", "pld", {})
    m = parse_method("fast=pld:max_ngram=2,num_tokens=4")
    assert (m.name, m.kind, m.options) == ("fast", "pld", {"max_ngram": 2, "num_tokens": 4})
    assert parse_method("hf-prompt-lookup:num_tokens=5").options == {"num_tokens": 5}


def test_parse_head_dir(tmp_path):
    head = tmp_path / "my-head"
    head.mkdir()
    m = parse_method(f"ek={head}:tree=dynamic,depth=5,top_k=4")
    assert (m.name, m.kind, m.path) == ("ek", "head", str(head))
    assert m.options == {"tree": "dynamic", "depth": 5, "top_k": 4}
    assert parse_method(str(head)).name == "my-head"


@pytest.mark.parametrize("bad", ["nope", "x=missing/dir", "pld:max_ngram=two", "pld:depth=3", "x="])
def test_parse_errors(bad):
    with pytest.raises(ValueError):
        parse_method(bad)


def test_questions_malformed_and_limit(tmp_path):
    path = write_questions(tmp_path / "q.jsonl", ["{not json", '{"turns": []}', '{"category": "x"}'])
    questions, bad = load_questions(path)
    assert len(questions) == 3 and bad == 3
    questions, _ = load_questions(path, limit_per_category=1)
    assert [q["question_id"] for q in questions] == [1, 3]
    with pytest.raises(ValueError, match="at least 1"):
        load_questions(path, limit_per_category=0)
    with pytest.raises(FileNotFoundError):
        load_questions(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text("oops\n")
    with pytest.raises(ValueError, match="no usable questions"):
        load_questions(tmp_path / "bad.jsonl")


def test_bench_end_to_end(saved_tiny_dir, tmp_path, capsys):
    qfile = write_questions(tmp_path / "q.jsonl", ["{broken"])
    out = tmp_path / "out"
    head = save_head(random_head(tiny_target("llama"), "eagle", 1), tmp_path / "eagle-head")  # same weights as saved
    rc = main(["bench", "--questions", str(qfile), "--target", str(saved_tiny_dir), "--max-new-tokens", "12",
               "--threads", "1", "--method", "hf-generate", "--method", "hf-stock",
               "--method", "pld2=pld:max_ngram=2,num_tokens=4",
               "--method", "hf-prompt-lookup:num_tokens=4",
               "--method", f"ek={head}:tree=dynamic,depth=3,top_k=2,total_tokens=6", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res) == {"device", "target", "settings", "methods"}
    assert res["settings"]["malformed_lines"] == 1 and res["settings"]["questions"] == 3
    assert list(res["methods"]) == ["vanilla", "hf-generate", "hf-stock", "pld2", "hf-prompt-lookup", "ek"]
    for name, m in res["methods"].items():
        assert {"tokens_per_s", "speedup", "tau", "exact_match", "by_category"} <= set(m)
        assert set(m["by_category"]) == {"copy", "misc"}
        assert m["exact_match"] == 1.0, name  # greedy: every lossless method reproduces vanilla exactly
        assert m["tokens_per_s"] > 0
    assert res["methods"]["vanilla"]["speedup"] == pytest.approx(1.0)
    assert res["methods"]["vanilla"]["tau"] == pytest.approx(1.0)
    for name in ("hf-generate", "hf-stock"):
        assert res["methods"][name]["tau"] == pytest.approx(1.0)  # one forward per token, counted by hook
    assert res["settings"]["method_specs"]["ek"] == {"kind": "head", "path": str(head), "dtype": None, "tree": "dynamic",
                                                     "depth": 3, "top_k": 2, "total_tokens": "6",
                                                     "plan": "a dynamic tree of 6 nodes, depth 3"}
    md = (out / "results.md").read_text()
    assert "| pld2 |" in md and "## hf-prompt-lookup" in md and "| misc |" in md
    for png in ("speedup_by_category.png", "tau.png", "acceptance_by_depth.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "skipped 1 malformed line" in capsys.readouterr().out


def test_methods_in_another_dtype_are_compared_with_their_own_vanilla(saved_tiny_dir, tmp_path):
    qfile = write_questions(tmp_path / "q.jsonl")
    head = save_head(random_head(tiny_target("llama"), "eagle", 1), tmp_path / "eagle-head")
    rc = main(["bench", "--questions", str(qfile), "--target", str(saved_tiny_dir), "--max-new-tokens", "10",
               "--dtype", "float32", "--threads", "1", "--method", "pld16=pld:dtype=bf16,max_ngram=2",
               "--method", f"ek16={head}:dtype=bfloat16,tree=chain,depth=2", "--method", "pld",
               "--out", str(tmp_path / "out")])
    assert rc == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    methods = res["methods"]
    assert list(methods) == ["vanilla", "pld16", "ek16", "pld", "vanilla-bfloat16"]  # bf16's reference is added
    assert [methods[n]["dtype"] for n in methods] == ["float32", "bfloat16", "bfloat16", "float32", "bfloat16"]
    assert all(m["exact_match"] == 1.0 for m in methods.values())  # each against its own dtype's vanilla
    assert methods["vanilla-bfloat16"]["speedup_same_dtype"] == pytest.approx(1.0)
    assert methods["pld"]["speedup_same_dtype"] == pytest.approx(methods["pld"]["speedup"])
    for cat in ("copy", "misc"):  # the per-category guarantee is judged against the same dtype's vanilla
        assert methods["vanilla-bfloat16"]["by_category"][cat]["speedup_same_dtype"] == pytest.approx(1.0)
        pld = methods["pld"]["by_category"][cat]
        assert pld["speedup_same_dtype"] == pytest.approx(pld["speedup"])
    lowest = min(methods["ek16"]["by_category"].items(), key=lambda c: c[1]["speedup_same_dtype"])
    row = next(line for line in (tmp_path / "out" / "results.md").read_text().splitlines()
               if line.startswith("| ek16 |"))
    assert f"{lowest[1]['speedup_same_dtype']:.2f}x ({lowest[0]})" in row
    fastest = max(("vanilla", "vanilla-bfloat16"), key=lambda n: methods[n]["tokens_per_s"])
    assert methods[fastest]["speedup_vs_fastest_vanilla"] == pytest.approx(1.0)
    assert res["settings"]["method_specs"]["ek16"]["dtype"] == "bfloat16"
    assert "| ek16 | bfloat16 |" in (tmp_path / "out" / "results.md").read_text()
    with pytest.raises(ValueError, match="float32"):
        tiny_target("llama").with_dtype("bf16").with_dtype("fp16")


def test_bench_rejects_reserved_name(saved_tiny_dir, tmp_path, capsys):
    qfile = write_questions(tmp_path / "q.jsonl")
    rc = main(["bench", "--questions", str(qfile), "--target", str(saved_tiny_dir), "--method", "vanilla=pld",
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "reserved" in capsys.readouterr().err


def test_an_over_long_question_is_skipped_not_fatal(saved_tiny_dir, tmp_path, capsys):
    long = json.dumps({"question_id": 99, "category": "copy", "turns": [" ".join(["w5"] * 300)]})
    qfile = write_questions(tmp_path / "q.jsonl", [long])
    out = tmp_path / "out"
    rc = main(["bench", "--questions", str(qfile), "--target", str(saved_tiny_dir), "--max-new-tokens", "8",
               "--method", "pld", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["settings"]["skipped_questions"]) == ["99"]
    assert res["methods"]["pld"]["questions"] == 3
    assert len((out / "partial.jsonl").read_text().splitlines()) == 3  # written question by question
    assert "skipped question 99" in capsys.readouterr().out
