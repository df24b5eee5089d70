"""The serving engine (one worker, stop strings, cancellation) and the `koala serve` command's argument checks."""
from __future__ import annotations

import asyncio
import random
import time

import pytest

from conftest import tiny_target
from koala.acceptance import Sampling
from koala.cli import main
from koala.decode import generate
from koala.drafters import PromptLookupDrafter
from koala.engine import Engine, Job, StopScanner
from koala.serve import _is_loopback


def scan(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    scanner, out = StopScanner(stops), []
    for piece in pieces:
        text, hit = scanner.feed(piece)
        out.append(text)
        if hit:
            return "".join(out), True
    return "".join(out) + scanner.flush(), False


def test_stop_scanner_finds_stops_split_across_pieces():
    assert scan(["END"], ["abc E", "N", "D more"]) == ("abc ", True)
    assert scan(["xy", "b"], ["a", "bxy"]) == ("a", True)  # the earliest stop wins
    assert scan(["END"], ["abc E", "Nx"]) == ("abc ENx", False)  # a false start is released, not lost
    assert scan([], ["a", "b"]) == ("ab", False)
    scanner = StopScanner(["END"])
    assert scanner.feed("abc EN") == ("abc ", False)  # the possible start of a stop is held back


def job(target, prompt: str, n: int = 12, stops: list[str] | None = None) -> Job:
    return Job(target.encode(prompt), Sampling(), n, None, stops or [])


def test_engine_matches_generate_and_honours_stops():
    target = tiny_target("llama")
    engine = Engine(target, PromptLookupDrafter())
    reference = generate(target, "w5 w6 w7", max_new_tokens=12)
    pieces = []
    out = engine.run(job(target, "w5 w6 w7"), pieces.append)
    assert out.text == "".join(pieces) == reference.text
    assert out.stats.new_tokens == len(reference.tokens)
    assert out.finish_reason == ("stop" if reference.tokens[-1] in target.eos_ids else "length")

    word = reference.text.split()[2]
    cut = engine.run(job(target, "w5 w6 w7", stops=[" " + word]))
    assert cut.text == reference.text[:reference.text.index(" " + word)] and cut.finish_reason == "stop"


def test_engine_cancellation_stops_or_skips_a_job():
    target = tiny_target("llama")
    engine = Engine(target)
    queued = job(target, "w5 w6", n=30)
    queued.cancelled.set()  # the client left while waiting in the queue
    assert engine.run(queued).stats.target_forwards == 0

    running = job(target, "w5 w6", n=30)
    out = engine.run(running, lambda _: running.cancelled.set())  # the client leaves after the first piece
    assert 0 < out.stats.new_tokens < 30 and out.finish_reason == "stop"


@pytest.mark.parametrize("max_batch", [1, 4])
def test_engine_batches_concurrent_jobs(max_batch):
    """Jobs in flight decode together (up to max_batch, leaving as they finish); answers equal single requests."""
    target = tiny_target("llama")
    engine = Engine(target, PromptLookupDrafter(), max_batch=max_batch)
    prompts = ["w5 w6 w7", "w8 w9", "w5 w5 w6", "w7", "w9 w8 w7 w6", "w6 w6"]
    refs = [generate(target, p, max_new_tokens=6 + 2 * i).text for i, p in enumerate(prompts)]

    async def many():
        return await asyncio.gather(*(engine.submit(job(target, p, n=6 + 2 * i)) for i, p in enumerate(prompts)))

    outs = asyncio.run(many())
    engine.shutdown()
    assert [o.text for o in outs] == refs and engine.pending == 0
    assert engine.peak_batch == 1 if max_batch == 1 else 1 < engine.peak_batch <= max_batch


def test_a_job_past_its_deadline_is_cut():
    target = tiny_target("llama")
    engine = Engine(target)
    late = job(target, "w5 w6", n=30)
    late.deadline = time.monotonic() - 1
    out = engine.run(late)
    assert out.timed_out and out.finish_reason == "length" and out.stats.new_tokens == 0


@pytest.mark.parametrize("seed", range(200))
def test_stop_scanner_matches_a_plain_search(seed):
    """The KMP scanner against str.find on random texts over a tiny alphabet (overlapping, repeated stops): the text
    is cut before the stop that completes first, however the text is split into pieces."""
    rng = random.Random(seed)
    text = "".join(rng.choice("ab") for _ in range(60))
    stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
    cuts = sorted(rng.sample(range(1, len(text)), 8))
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    hits = [(i + len(s), i) for s, i in ((s, text.find(s)) for s in stops) if i >= 0]  # (end, start)
    assert scan(stops, pieces) == ((text[:min(hits)[1]], True) if hits else (text, False))


def test_shutdown_stops_the_running_job():
    target = tiny_target("llama")
    engine = Engine(target)
    long = job(target, "w5 w6", n=200)
    out = asyncio.run(engine.submit(long, lambda _: engine.shutdown()))  # shut down after the first piece
    assert long.cancelled.is_set() and 0 < out.stats.new_tokens < 200


def test_loopback_detection():
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("192.168.1.4")


def test_serve_command_rejects_a_bad_port(saved_tiny_dir, capsys):
    assert main(["serve", "--target", str(saved_tiny_dir), "--port", "70000"]) == 2
    assert "not a TCP port" in capsys.readouterr().err


@pytest.mark.parametrize("stops", [["a"] * 5, [""]])
def test_bad_stop_lists_are_refused(stops):
    from pydantic import ValidationError

    from koala.openai_api import CompletionRequest

    with pytest.raises(ValidationError, match="at most 4 non-empty stop strings"):
        CompletionRequest(prompt="w5", stop=stops)
