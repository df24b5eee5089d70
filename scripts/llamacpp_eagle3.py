"""The llama.cpp round trip of an eagle3 head, from one command on a fresh machine (not in CI: the build takes
~10 minutes on 2 cores).

1. llama.cpp's tools are built from the llama.cpp that the llama-cpp-python sdist bundles (`pip download
   --no-binary`), with cmake, into WORK/build-nollamafile: without llamafile's sgemm, so one-token and multi-token
   forwards use the same matmul kernels and greedy output with a draft can equal plain greedy output (with
   sgemm, batched verification rounds differently and near-ties flip; `--llamafile` builds that variant).
2. The head is exported (`koala export --format llama.cpp-eagle3`) and converted by llama.cpp's own
   convert_hf_to_gguf.py into a GGUF draft, against the target's Hugging Face directory (the safetensors copy
   KOALA makes of the SmolLM2 GGUF on first load). The converter needs `sentencepiece`, installed into WORK/pydeps.
3. Spec-Bench prompts (the target's chat template applied here, first turns), greedy, are decoded by
   llama-speculative-simple on the shipped Q4_1 target (or, `--target-type f16`, an f16 GGUF of the same weights
   as KOALA loads them, where batched matmuls are cheaper per token): plain (an n-gram drafter that can never match, so the
   same loop decodes one token per step), with our draft (`--spec-type draft-eagle3`, several draft lengths),
   and with llama.cpp's own n-gram speculation; at each thread count. Reported: decode tok/s (llama.cpp's own
   "decoded" figure: drafting and verification, not the prefill), speedup over plain (median of per-prompt
   ratios), drafted / accepted tokens, and how many outputs equal plain decoding's text.

`--no-repack` is passed unless `--amx`: this llama.cpp's AMX kernels for Q4_1 crash on multi-token batches when
built by GCC 12 (../shared/notes/llama-cpp-on-this-machine.md): GCC drops the stores that fill the tile
configuration before `_tile_loadconfig`. `--amx` builds a variant with a compiler barrier there (a one-line patch of
ggml-cpu/amx/mmq.cpp in WORK's copy of the sdist) and runs with weight repacking on: ~2x faster decoding on AMX
CPUs, batched verification much cheaper, but its batched kernels round differently (not exact).

    .venv/bin/python scripts/llamacpp_eagle3.py --head heads/smollm2-135m/eagle3 --out docs/results/llamacpp
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SDIST = "llama-cpp-python==0.3.36"
TOOLS = ("llama-speculative-simple", "llama-completion")
CONVERTER_DEPS = "sentencepiece>=0.1.98,<0.3.0"
AMX_FILE = "ggml/src/ggml-cpu/amx/mmq.cpp"
AMX_CALL = "    _tile_loadconfig(&tc);\n"
AMX_FIX = '    asm volatile("" : : "m"(tc) : "memory");  // koala: GCC 12 drops the stores into tc without it\n'
DECODED = re.compile(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds")
COUNTS = {key: re.compile(rf"{key}\s*=\s*(\d+)") for key in ("n_drafted", "n_accept")}


def sh(cmd: list[str], log: Path | None = None, **kw) -> subprocess.CompletedProcess:
    """Run a command; its output goes to `log` if given; a failure names the log."""
    print("+", " ".join(map(str, cmd)), file=sys.stderr)
    if log is None:
        return subprocess.run(cmd, check=True, **kw)
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kw)
    if done.returncode:
        raise SystemExit(f"{cmd[0]} failed (exit {done.returncode}); see {log}")
    return done


def source(work: Path) -> Path:
    """The llama.cpp tree of the llama-cpp-python sdist (downloaded and unpacked once)."""
    tree = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"), None)
    if tree is None:
        sh([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", SDIST, "-d", str(work)])
        with tarfile.open(next(work.glob("llama_cpp_python-*.tar.gz"))) as tar:
            tar.extractall(work, filter="data")
        tree = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
    return tree


def patch_amx(tree: Path) -> None:
    """The compiler barrier that makes the AMX tile configuration reach the CPU under GCC 12 (idempotent)."""
    file = tree / AMX_FILE
    text = file.read_text()
    if AMX_FIX not in text:
        if text.count(AMX_CALL) != 1:
            raise SystemExit(f"{file} changed: cannot place the AMX tile-config barrier; run without --amx.")
        file.write_text(text.replace(AMX_CALL, AMX_FIX + AMX_CALL))


def build(tree: Path, work: Path, jobs: int, llamafile: bool, amx: bool) -> Path:
    """llama.cpp's tools, built once (Release, no server, no tests) into WORK/build-{amx-,}[no]llamafile."""
    if amx:
        patch_amx(tree)
    out = work / f"build-{'amx-' if amx else ''}{'' if llamafile else 'no'}llamafile"
    bin_dir = out / "bin"
    if all((bin_dir / t).is_file() for t in TOOLS):
        return bin_dir
    t0 = time.time()
    sh(["cmake", "-S", str(tree), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
        "-DLLAMA_OPENSSL=OFF", f"-DGGML_LLAMAFILE={'ON' if llamafile else 'OFF'}"], work / "configure.log")
    sh(["cmake", "--build", str(out), "--config", "Release", "-j", str(jobs), "--target", *TOOLS],
       work / "build.log")
    print(f"built llama.cpp tools in {time.time() - t0:.0f} s", file=sys.stderr)
    return bin_dir


def convert(head: Path, tree: Path, work: Path, target_type: str) -> tuple[Path, Path]:
    """(target GGUF, draft GGUF): the head exported by koala and converted by llama.cpp's converter; the target is
    the shipped Q4_1 file or an f16 GGUF of KOALA's de-quantised copy of it (the weights the head trained on)."""
    from koala.target import converted_dir, load_target, smollm2_gguf

    load_target("smollm2")  # makes the Hugging Face copy the converter reads (config, tokenizer) if missing
    target_hf = converted_dir(smollm2_gguf())
    deps = work / "pydeps"
    if not (deps / "sentencepiece").exists():
        sh([sys.executable, "-m", "pip", "install", "-q", "--target", str(deps), CONVERTER_DEPS])
    env = {**os.environ, "PYTHONPATH": f"{deps}{os.pathsep}{tree / 'gguf-py'}"}
    converter = [sys.executable, str(tree / "convert_hf_to_gguf.py")]
    target = smollm2_gguf()
    if target_type == "f16":
        target = work / "target-f16.gguf"
        if not target.is_file():
            sh([*converter, str(target_hf), "--outtype", "f16", "--outfile", str(target)], work / "convert-target.log",
               env=env)
    hf = work / "draft-hf"
    sh([str(ROOT / ".venv/bin/koala"), "export", "--head", str(head), "--format", "llama.cpp-eagle3", "--out", str(hf),
        "--force"])
    draft = work / "draft.gguf"
    sh([*converter, str(hf), "--target-model-dir", str(target_hf), "--outtype", "f16", "--outfile", str(draft)],
       work / "convert.log", env=env)
    return target, draft


def prompts(questions: Path, per_category: int) -> list[dict]:
    """Spec-Bench first turns, rendered with the target's chat template (llama.cpp's tools take raw text)."""
    from transformers import AutoTokenizer

    from koala.bench import load_questions
    from koala.target import converted_dir, smollm2_gguf

    tok = AutoTokenizer.from_pretrained(converted_dir(smollm2_gguf()))
    qs, _ = load_questions(questions, per_category)
    return [{"id": q["question_id"], "category": q["category"],
             "text": tok.apply_chat_template([{"role": "user", "content": q["turns"][0]}], tokenize=False,
                                             add_generation_prompt=True)} for q in qs]


def decode(bin_dir: Path, target: Path, spec: list[str], prompt: str, threads: int, n: int, amx: bool) -> dict:
    """One greedy generation by llama-speculative-simple: text, decode tok/s, drafted and accepted counts."""
    cmd = [str(bin_dir / "llama-speculative-simple"), "-m", str(target), *spec, *([] if amx else ["--no-repack"]),
           "-t", str(threads),
           "-tb", str(threads), "--temp", "0", "-fa", "off", "-c", "2048", "-n", str(n), "--seed", "0", "-p", prompt]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"llama-speculative-simple failed (exit {done.returncode}): {done.stderr[-2000:]}")
    m = DECODED.search(done.stderr)
    if m is None:
        raise SystemExit(f"no 'decoded' line in llama-speculative-simple's output: {done.stderr[-2000:]}")
    counts = {k: int(r.search(done.stderr).group(1)) for k, r in COUNTS.items()}
    text = done.stdout.split(prompt, 1)[-1]
    return {"text": text, "tokens": int(m.group(1)), "seconds": float(m.group(2)), **counts}


def methods(draft: Path, n_max: list[int]) -> dict[str, list[str]]:
    never = ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "1024"]  # cannot match: plain steps
    out = {"plain": never}
    for n in n_max:
        out[f"koala-eagle3 n={n}"] = ["-md", str(draft), "--spec-type", "draft-eagle3", "--spec-draft-n-max", str(n)]
    out["llama.cpp ngram"] = ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "2",
                              "--spec-ngram-simple-size-m", "8"]
    return out


def summarise(runs: dict, prompts_: list[dict]) -> list[dict]:
    rows = []
    for (name, threads), per in runs.items():
        plain = runs[("plain", threads)]
        rates = [r["tokens"] / r["seconds"] for r in per]
        ratios = [a / (b["tokens"] / b["seconds"]) for a, b in zip(rates, plain)]
        drafted, accepted = sum(r["n_drafted"] for r in per), sum(r["n_accept"] for r in per)
        rows.append({"method": name, "threads": threads, "tok_s_median": round(statistics.median(rates), 1),
                     "speedup_median": round(statistics.median(ratios), 3),
                     "speedup_total": round(sum(r["tokens"] for r in per) / sum(r["seconds"] for r in per)
                                            / (sum(r["tokens"] for r in plain) / sum(r["seconds"] for r in plain)), 3),
                     "lowest_category": round(min(statistics.median(
                         [x for x, p in zip(ratios, prompts_) if p["category"] == c])
                         for c in {p["category"] for p in prompts_}), 3),
                     "drafted": drafted, "accepted": accepted,
                     "acceptance": round(accepted / drafted, 3) if drafted else None,
                     "same_text_as_plain": sum(a["text"] == b["text"] for a, b in zip(per, plain)),
                     "prompts": len(per)})
    return rows


def markdown(rows: list[dict], args) -> str:
    lines = [f"llama.cpp ({SDIST} sdist, llamafile sgemm {'on' if args.llamafile else 'off'}, "
             f"{'AMX on (patched)' if args.amx else 'AMX off: --no-repack'}) on the SmolLM2-135M-Instruct "
             f"{args.target_type} target, Spec-Bench {args.limit_per_category} per category, "
             f"{args.max_new_tokens} tokens, greedy, -fa off.",
             "", "| method | threads | tok/s (median) | speedup (median) | speedup (total) | lowest category | "
             "drafted | accepted | acceptance | same text as plain |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['threads']} | {r['tok_s_median']} | {r['speedup_median']}x | "
                     f"{r['speedup_total']}x | {r['lowest_category']}x | {r['drafted']} | {r['accepted']} | "
                     f"{r['acceptance'] if r['acceptance'] is not None else '-'} | "
                     f"{r['same_text_as_plain']}/{r['prompts']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--head", required=True, type=Path, help="a K=1 eagle3 koala head directory")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "llamacpp", help="sdist, build and GGUF files")
    p.add_argument("--out", type=Path, required=True, help="results.json and results.md go here")
    p.add_argument("--questions", type=Path, default=ROOT.parent / "shared/data/spec_bench/question.jsonl")
    p.add_argument("--limit-per-category", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--n-max", type=int, nargs="+", default=[1, 3], help="draft lengths tried for our head")
    p.add_argument("--jobs", type=int, default=2, help="parallel compile jobs")
    p.add_argument("--target-type", choices=["q4_1", "f16"], default="q4_1")
    p.add_argument("--llamafile", action="store_true", help="build with llamafile's sgemm (faster batches, not exact)")
    p.add_argument("--amx", action="store_true", help="patched AMX kernels with weight repacking (fast, not exact)")
    p.add_argument("--build-only", action="store_true", help="stop after building the tools")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    tree = source(args.work)
    bin_dir = build(tree, args.work, args.jobs, args.llamafile, args.amx)
    if args.build_only:
        return 0
    target, draft = convert(args.head, tree, args.work, args.target_type)
    todo = prompts(args.questions, args.limit_per_category)
    runs: dict = {}
    for threads in args.threads:
        for name, spec in methods(draft, args.n_max).items():
            runs[(name, threads)] = [decode(bin_dir, target, spec, q["text"], threads, args.max_new_tokens,
                                            args.amx) for q in todo]
            r = runs[(name, threads)]
            print(f"{name:20s} t={threads}: {sum(x['tokens'] for x in r) / sum(x['seconds'] for x in r):6.1f} tok/s",
                  file=sys.stderr)
    rows = summarise(runs, todo)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(
        {"rows": rows, "command": " ".join(sys.argv), "prompts": todo,
         "outputs": {f"{k[0]} t={k[1]}": [r["text"] for r in v] for k, v in runs.items()}}, indent=1))
    (args.out / "results.md").write_text(markdown(rows, args))
    print(markdown(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
