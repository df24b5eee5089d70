"""Serving throughput, latency and a soak test against a real `koala serve` process on loopback.

For each --max-batch (1 = the old one-request-at-a-time engine) it starts the server, then for each number of
concurrent clients sends Spec-Bench prompts and reports requests/s and p50/p95 latency; every greedy answer must
equal the same prompt's answer from a lone client (checked, counted as a mismatch otherwise). --soak N then sends N
requests (8 clients, half streaming, every 10th cancelled by a client timeout) and reports errors, incomplete
answers and the server's RSS before and after.

    python scripts/bench_serve.py                           # SmolLM2, vanilla, --max-batch 1 and 8, 1/4/8 clients
    python scripts/bench_serve.py --soak 200 --max-batch 8 --clients 8
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from koala.bench import load_questions  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start(args: argparse.Namespace, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "koala.cli", "serve", "--port", str(port), "--target", args.target,
           "--max-new-tokens", str(args.max_tokens), "--max-batch", str(max_batch), "--max-waiting", "256",
           "--log-level", "warning", "--dtype", args.dtype]
    if args.head:
        cmd += ["--head", args.head]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start within 300 s")


def ask(url: str, prompt: str, max_tokens: int, stream: bool = False, timeout: float = 600) -> dict:
    """One chat request; returns its text, finish reason, token count and latency."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "stream": stream}
    t0 = time.perf_counter()
    if not stream:
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=timeout)
        r.raise_for_status()
        out = r.json()
        choice = out["choices"][0]
        return {"text": choice["message"]["content"], "finish": choice["finish_reason"],
                "tokens": out["usage"]["completion_tokens"], "seconds": time.perf_counter() - t0}
    text, finish, tokens = [], None, 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=timeout) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            for c in event["choices"]:
                text.append(c["delta"].get("content", ""))
                finish = c["finish_reason"] or finish
            tokens = event.get("koala", {}).get("new_tokens", tokens)
    return {"text": "".join(text), "finish": finish, "tokens": tokens, "seconds": time.perf_counter() - t0}


def load(url: str, prompts: list[str], clients: int, max_tokens: int) -> tuple[list[dict], float]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        outs = list(pool.map(lambda p: ask(url, p, max_tokens), prompts))
    return outs, time.perf_counter() - t0


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def soak(url: str, pid: int, prompts: list[str], n: int, max_tokens: int) -> dict:
    ask(url, prompts[0], max_tokens)  # warm up before the first RSS reading
    rss0 = rss_mib(pid)
    errors, incomplete, cancelled, lat = 0, 0, 0, []

    def one(i: int) -> None:
        nonlocal errors, incomplete, cancelled
        try:
            if i % 10 == 9:  # a client that gives up early: the server must free its row
                try:
                    ask(url, prompts[i % len(prompts)], max_tokens, stream=i % 20 == 19, timeout=0.3)
                except httpx.TimeoutException:
                    cancelled += 1
                return
            out = ask(url, prompts[i % len(prompts)], max_tokens, stream=i % 2 == 1)
            lat.append(out["seconds"])
            if out["finish"] not in ("stop", "length") or (out["finish"] == "length" and out["tokens"] != max_tokens):
                incomplete += 1
        except Exception:  # noqa: BLE001 - counted and reported
            errors += 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(n)))
    seconds = time.perf_counter() - t0
    time.sleep(1)
    health = httpx.get(url + "/health", timeout=10).json()
    return {"requests": n, "errors": errors, "incomplete": incomplete, "client_timeouts": cancelled,
            "seconds": round(seconds, 1), "p50_s": round(percentile(lat, 0.5), 2), "p95_s": round(percentile(lat, 0.95), 2),
            "rss_start_mib": round(rss0, 1), "rss_end_mib": round(rss_mib(pid), 1), "pending_after": health["pending"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", default=str(ROOT.parent / "shared/data/spec_bench/question.jsonl"))
    p.add_argument("--target", default="smollm2")
    p.add_argument("--head", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-batch", default="1,8", help="comma-separated server --max-batch values")
    p.add_argument("--clients", default="1,4,8", help="comma-separated concurrency levels")
    p.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--soak", type=int, default=0, help="requests in the soak test (0 = skip)")
    args = p.parse_args()
    questions, _ = load_questions(args.questions, 2)
    prompts = [q["turns"][0] for q in questions][:max(args.requests, 8)]
    rows, references = [], {}
    for max_batch in [int(b) for b in args.max_batch.split(",")]:
        proc, url = start(args, max_batch)
        try:
            for clients in [int(c) for c in args.clients.split(",")]:
                outs, seconds = load(url, prompts[:args.requests], clients, args.max_tokens)
                mismatches = 0
                for prompt, out in zip(prompts, outs):
                    mismatches += references.setdefault(prompt, out["text"]) != out["text"]
                lat = [o["seconds"] for o in outs]
                tokens = sum(o["tokens"] for o in outs)
                rows.append({"max_batch": max_batch, "clients": clients, "requests": len(outs),
                             "req_per_s": round(len(outs) / seconds, 3), "tok_per_s": round(tokens / seconds, 1),
                             "p50_s": round(percentile(lat, 0.5), 2), "p95_s": round(percentile(lat, 0.95), 2),
                             "mismatches": mismatches})
                print(json.dumps(rows[-1]), flush=True)
            if args.soak:
                print(json.dumps({"max_batch": max_batch, "soak": soak(url, proc.pid, prompts, args.soak,
                                                                        args.max_tokens)}), flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    print("\n| --max-batch | clients | requests | req/s | tok/s | p50 s | p95 s | greedy mismatches |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['max_batch']} | {r['clients']} | {r['requests']} | {r['req_per_s']} | {r['tok_per_s']} | "
              f"{r['p50_s']} | {r['p95_s']} | {r['mismatches']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
