"""The OpenAI-compatible HTTP API, driven over real loopback HTTP (uvicorn in a thread) with httpx and `openai`."""
from __future__ import annotations

import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

from conftest import tiny_target
from koala.decode import generate
from koala.drafters import PromptLookupDrafter
from koala.drafters.factory import drafter_for_head
from koala.heads import HeadConfig
from koala.heads.checkpoint import save_head
from koala.heads.checkpoint import build_head
from koala.openai_api import create_app
from koala.engine import Limits
from koala.serve import uvicorn_server

MAX_TOKENS = 16
CHAT = [{"role": "system", "content": "w9"}, {"role": "user", "content": "w5 w6 w7 w5 w6"}]


@contextmanager
def running(app, server: list | None = None):
    """Serve `app` with uvicorn on a free loopback port in a background thread; yields the base url (and appends
    the uvicorn server to `server`)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn_server(app, log_level="warning")
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    if server is not None:
        server.append((srv, thread))
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def server():
    """(base url, target, app) of a live server with a tiny llama and the PLD drafter."""
    target = tiny_target("llama")
    app = create_app(target, PromptLookupDrafter(), max_tokens=MAX_TOKENS, limits=Limits(max_tokens_cap=256))
    with running(app) as url:
        yield url, target, app


def sse(response: httpx.Response) -> list:
    """The JSON payloads of a server-sent event stream, with the closing [DONE] kept as a string."""
    events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def test_chat_completion_is_the_greedy_answer_with_stats(server):
    url, target, _ = server
    reference = generate(target, CHAT, max_new_tokens=MAX_TOKENS)
    body = httpx.post(f"{url}/v1/chat/completions", json={"messages": CHAT}, timeout=30).json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": reference.text}
    assert body["usage"]["prompt_tokens"] == len(target.encode(CHAT))
    assert body["usage"]["completion_tokens"] == len(reference.tokens)
    assert body["koala"]["drafter"] == "pld" and body["koala"]["target_forwards"] > 0
    assert body["koala"]["tau"] == pytest.approx(len(reference.tokens) / body["koala"]["target_forwards"], abs=1e-3)


def test_echoed_assistant_messages_with_null_fields_are_accepted(server):
    url, target, _ = server
    turns = CHAT + [{"role": "assistant", "content": "w7", "refusal": None, "tool_calls": None},
                    {"role": "user", "content": "w9"}]
    body = httpx.post(f"{url}/v1/chat/completions", json={"messages": turns}, timeout=30).json()
    reference = generate(target, [{"role": m["role"], "content": m["content"]} for m in turns],
                         max_new_tokens=MAX_TOKENS)
    assert body["choices"][0]["message"]["content"] == reference.text


def test_chat_stream_is_sse_in_openai_chunk_format(server):
    url, target, _ = server
    reference = generate(target, CHAT, max_new_tokens=8)
    req = {"messages": CHAT, "stream": True, "max_tokens": 8, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=req, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == reference.text
    last = chunks[-2]
    assert last["choices"][0]["finish_reason"] in ("stop", "length") and last["koala"]["target_forwards"] > 0
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(reference.tokens)


def test_text_completion_stream_and_not(server):
    url, target, _ = server
    reference = generate(target, target.encode("w5 w6 w7 w5", chat=False), max_new_tokens=10)
    req = {"prompt": "w5 w6 w7 w5", "max_tokens": 10}
    body = httpx.post(f"{url}/v1/completions", json=req, timeout=30).json()
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == reference.text
    with httpx.stream("POST", f"{url}/v1/completions", json={**req, "stream": True}, timeout=30) as r:
        events = sse(r)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == reference.text


def test_stop_strings_cut_the_answer(server):
    url, target, _ = server
    reference = generate(target, CHAT, max_new_tokens=MAX_TOKENS).text
    stop = " " + reference.split()[3]
    for stream in (False, True):
        req = {"messages": CHAT, "stop": stop, "stream": stream}
        if stream:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=req, timeout=30) as r:
                chunks = sse(r)[:-1]
            text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
            finish = chunks[-1]["choices"][0]["finish_reason"]
        else:
            choice = httpx.post(f"{url}/v1/chat/completions", json=req, timeout=30).json()["choices"][0]
            text, finish = choice["message"]["content"], choice["finish_reason"]
        assert text == reference[:reference.index(stop)] and finish == "stop"


def test_seeded_sampling_is_reproducible(server):
    url, _, _ = server
    req = {"messages": CHAT, "temperature": 1.5, "top_p": 0.95, "seed": 7}
    texts = [httpx.post(f"{url}/v1/chat/completions", json={**req, "seed": s}, timeout=30).json()
             ["choices"][0]["message"]["content"] for s in (7, 7, 8, 9)]
    assert texts[0] == texts[1] and len(set(texts)) > 1  # same seed, same text; other seeds differ


def test_models_and_health(server):
    url, _, _ = server
    assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "tiny-llama"
    health = httpx.get(f"{url}/health").json()
    assert health.pop("peak_batch") >= 0
    assert health == {"status": "ok", "model": "tiny-llama", "drafter": "pld", "pending": 0}


def test_the_official_openai_client(server):
    openai = pytest.importorskip("openai")
    url, target, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
    reference = generate(target, CHAT, max_new_tokens=MAX_TOKENS).text
    out = client.chat.completions.create(model="tiny-llama", messages=CHAT)
    assert out.choices[0].message.content == reference and out.usage.total_tokens > 0
    assert out.model_extra["koala"]["target_forwards"] > 0
    stream = client.chat.completions.create(model="tiny-llama", messages=CHAT, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == reference
    text = client.completions.create(model="tiny-llama", prompt="w5 w6", max_tokens=5).choices[0].text
    assert text == generate(target, target.encode("w5 w6", chat=False), max_new_tokens=5).text
    assert [m.id for m in client.models.list()] == ["tiny-llama"]
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny-llama", messages=CHAT, temperature=-0.5)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4o", messages=CHAT)


BAD_REQUESTS = [
    ("/v1/chat/completions", b'{"messages": [', "not valid JSON"),
    ("/v1/chat/completions", b"[1, 2]", "must be a JSON object"),
    ("/v1/chat/completions", {"model": "tiny-llama"}, "messages: Field required"),
    ("/v1/chat/completions", {"messages": []}, "messages: List should have at least 1 item"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True}, "unknown field 'logprobs'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w5", "extra": 1}]}, "unknown field"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "w5"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": " "}]}, "conversation is empty"),
    ("/v1/chat/completions", {"messages": CHAT, "temperature": -1}, "temperature"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "w5"}], "temperature": Infinity}',
     "temperature"),
    ("/v1/chat/completions", {"messages": CHAT, "seed": 2**64}, "seed"),
    ("/v1/chat/completions", {"messages": CHAT, "top_p": 0}, "top_p"),
    ("/v1/chat/completions", {"messages": CHAT, "top_p": 1.5}, "top_p"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "n": 2}, "only n=1"),
    ("/v1/chat/completions", {"messages": CHAT, "stream": "yes please"}, "stream"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w5 " * 300}]}, "context holds 256"),
    ("/v1/completions", {"prompt": "w5 " * 300, "stream": True}, "context holds 256"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": "w5", "echo": True}, "unknown field 'echo'"),
    ("/v1/completions", {"prompt": "w5", "max_tokens": 10**18}, "allows at most 256"),
    ("/v1/completions", {"prompt": "w5 " * 100, "max_tokens": 200}, "exceeds the target's context"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "w5 \\ud800"}]}', "content"),
]


def test_a_vanishing_top_p_samples_the_best_token(server):
    url, target, _ = server
    body = {"messages": CHAT, "top_p": 1e-300, "temperature": 1.0, "seed": 3}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == generate(target, CHAT, max_new_tokens=MAX_TOKENS).text


@pytest.mark.parametrize("path,body,message", BAD_REQUESTS)
def test_bad_requests_get_a_clear_4xx(server, path, body, message):
    url, _, _ = server
    if isinstance(body, bytes):
        r = httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=30)
    else:
        r = httpx.post(url + path, json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"


def test_a_client_leaving_a_stream_does_not_hurt_the_next_request(server):
    url, target, _ = server
    with httpx.stream("POST", f"{url}/v1/completions", timeout=30,
                      json={"prompt": "w5 w6", "max_tokens": 200, "stream": True}) as r:
        next(r.iter_lines())  # read one event, then hang up
    reference = generate(target, CHAT, max_new_tokens=MAX_TOKENS).text
    body = httpx.post(f"{url}/v1/chat/completions", json={"messages": CHAT}, timeout=30).json()
    assert body["choices"][0]["message"]["content"] == reference


def test_concurrent_requests_are_batched_and_all_complete(server):
    """~20 clients at once (half streaming): every answer is whole and equal to the single-request greedy one."""
    url, target, app = server
    reference = generate(target, CHAT, max_new_tokens=MAX_TOKENS).text
    engine = app.state.engine

    def one(i: int) -> str:
        req = {"messages": CHAT, "stream": i % 2 == 1}
        with httpx.Client(timeout=60) as client:
            if not req["stream"]:
                return client.post(f"{url}/v1/chat/completions", json=req).json()["choices"][0]["message"]["content"]
            with client.stream("POST", f"{url}/v1/chat/completions", json=req) as r:
                events = sse(r)
            assert events[-1] == "[DONE]"
            return "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(one, range(20), timeout=120))
    assert answers == [reference] * 20
    assert 1 < engine.peak_batch <= engine.max_batch  # requests shared target forwards


def test_a_head_drafter_serves_lossless_answers_under_load(tmp_path):
    """A (random) EAGLE head keeps per-request state in its drafter: queued requests must not disturb each other."""
    target = tiny_target("llama")
    torch.manual_seed(0)
    head = build_head(HeadConfig.for_target(target, "eagle", 1), target)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    drafter = drafter_for_head(save_head(head, tmp_path / "head"), target, total_tokens=8, gate=False)
    prompts = [[{"role": "user", "content": f"w{i} w{i + 1} w{i} w{i + 1}"}] for i in range(5, 13)]
    references = [generate(target, m, max_new_tokens=MAX_TOKENS).text for m in prompts]
    with running(create_app(target, drafter, max_tokens=MAX_TOKENS)) as url:
        def ask(messages):
            body = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages}, timeout=60).json()
            return body["choices"][0]["message"]["content"], body["koala"]

        with ThreadPoolExecutor(len(prompts)) as pool:
            answers = list(pool.map(ask, prompts, timeout=120))
    assert [a for a, _ in answers] == references
    assert all(stats["drafter"] == drafter.name for _, stats in answers)


def test_a_failure_inside_the_model_is_reported_not_fatal(server, monkeypatch):
    url, _, app = server

    def broken(*args):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(app.state.engine.target, "features", broken)
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": CHAT}, timeout=30)
    assert r.status_code == 500 and "out of memory (simulated)" in r.json()["error"]["message"]
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={"messages": CHAT, "stream": True}, timeout=30) as r:
        events = sse(r)
    assert "out of memory (simulated)" in events[-2]["error"]["message"] and events[-1] == "[DONE]"
    monkeypatch.undo()
    assert httpx.post(f"{url}/v1/chat/completions", json={"messages": CHAT}, timeout=30).status_code == 200


class Slow(PromptLookupDrafter):
    """Proposes nothing, slowly: a generation that would take seconds."""

    def propose(self, ids):
        time.sleep(0.02)
        return super().propose([])


def wait_until(condition, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def test_limits_refuse_with_openai_shaped_errors():
    target = tiny_target("llama")
    special = next(t for t in target.tokenizer.all_special_tokens if t)
    limits = Limits(max_body_bytes=200_000, max_messages=3, max_stop_chars=5, api_key="sekret")
    key = {"Authorization": "Bearer sekret"}
    with running(create_app(target, max_tokens=8, limits=limits)) as url:
        def post(body, headers=key, path="/v1/chat/completions"):
            if isinstance(body, bytes) or not isinstance(body, (dict, list)):
                return httpx.post(url + path, content=body, headers={**headers, "content-type": "application/json"},
                                  timeout=30)
            return httpx.post(url + path, json=body, headers=headers, timeout=30)

        def error(r, status: int, text: str) -> None:
            assert r.status_code == status, r.text
            assert text in r.json()["error"]["message"]

        user = {"role": "user", "content": "w5 w6"}
        assert post({"messages": [user]}).status_code == 200
        error(post({"messages": [user]}, headers={}), 401, "API key")
        error(post({"messages": [user]}, headers={"Authorization": "Bearer wrong"}), 401, "API key")
        assert httpx.get(url + "/v1/models").status_code == 401 and httpx.get(url + "/health").status_code == 200
        error(post({"messages": [{"role": "user", "content": "w5 " * 100_000}]}), 413, "200000 bytes")
        chunks = (b"x" * 50_000 for _ in range(6))  # no Content-Length: counted as it arrives
        error(post(chunks), 413, "200000 bytes")
        error(post({"messages": [user] * 4}), 400, "limit of 3")
        error(post({"messages": [user], "stop": ["abcdef"]}), 400, "limit of 5 characters")
        error(post({"messages": [{"role": "user", "content": f"w5 {special} w6"}]}), 400, "special token")
        error(post(b'{"messages": [{"role": "user", "content": "\xff"}]}'.replace(b"\\xff", b"\xff")), 400, "")
        error(post(b"[" * 50_000 + b"]" * 50_000), 400, "")
        error(httpx.get(url + "/v1/nope", headers=key), 404, "Not Found")
        error(httpx.get(url + "/v1/chat/completions", headers=key), 405, "Method Not Allowed")
    with running(create_app(target, max_tokens=8, limits=Limits(allow_special_tokens=True))) as url:
        body = {"messages": [{"role": "user", "content": f"w5 {special} w6"}]}
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=30).status_code == 200


def test_a_full_queue_answers_503_and_a_departed_client_frees_the_worker():
    target = tiny_target("llama")
    target.eos_ids = set()  # the answer runs its full length unless cut
    app = create_app(target, Slow(), max_tokens=200, limits=Limits(max_batch=1, max_waiting=0))
    engine = app.state.engine
    with running(app) as url:
        with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "w5", "stream": True}, timeout=30) as r:
            lines = r.iter_lines()  # kept alive: a dropped iterator closes the connection
            next(lines)
            busy = httpx.post(f"{url}/v1/completions", json={"prompt": "w5"}, timeout=30)
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1", busy.text
            assert busy.json()["error"]["code"] == "server_busy"
        assert wait_until(lambda: engine.pending == 0)
        with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that hangs up
            httpx.post(f"{url}/v1/completions", json={"prompt": "w5"}, timeout=0.5)
        assert wait_until(lambda: engine.pending == 0, 3)  # 200 slow steps would take 4 s


def test_shutdown_cuts_open_streams_through_uvicorn():
    target = tiny_target("llama")
    target.eos_ids = set()  # the answer runs its full length unless cut
    app = create_app(target, Slow(), max_tokens=200)
    server = []
    with running(app, server) as url:
        srv, thread = server[0]
        with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "w5", "stream": True}, timeout=30) as r:
            lines = r.iter_lines()
            next(lines)
            started = time.monotonic()
            srv.handle_exit(signal.SIGTERM, None)
            events = [line for line in lines if line.startswith("data: ")]
        thread.join(10)
        assert not thread.is_alive() and time.monotonic() - started < 3  # 200 slow steps would take 4 s
    assert events[-1] == "data: [DONE]" and '"finish_reason": "stop"' in events[-2]


@pytest.mark.slow
def test_smollm2_over_http_batched_answers_equal_lone_greedy(smollm2):
    """The real target with a shipped head behind real HTTP: concurrent requests (half streaming) decode in one
    batch and each answer equals the target's lone greedy answer."""
    prompts = ["Name three primary colors.", "What is 7 times 8?", "Say hello in French.", "Give one tip for sleep."]
    references = [generate(smollm2, p, max_new_tokens=24).text for p in prompts]
    drafter = drafter_for_head(Path(__file__).parents[1] / "heads/smollm2-135m/eagle", smollm2, total_tokens=4,
                               gate=False)
    app = create_app(smollm2, drafter, max_tokens=24)
    with running(app) as url:
        def ask(i: int) -> str:
            req = {"messages": [{"role": "user", "content": prompts[i]}], "stream": i % 2 == 1}
            if not req["stream"]:
                return httpx.post(f"{url}/v1/chat/completions", json=req, timeout=120).json()["choices"][0][
                    "message"]["content"]
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=req, timeout=120) as r:
                events = sse(r)
            return "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])

        with ThreadPoolExecutor(len(prompts)) as pool:
            answers = list(pool.map(ask, range(len(prompts)), timeout=300))
    assert answers == references
    assert app.state.engine.peak_batch > 1
