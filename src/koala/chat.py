"""`koala chat`: a multi-turn terminal chat on top of the one decode loop.

The conversation logic lives in `ChatSession` (no terminal needed, so it is testable and reusable); the command
only reads lines with input(), prints the streamed pieces and maps Ctrl-C to `ChatSession.stop()`, which ends the
current answer after the target forward in flight instead of killing the program.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Iterator

from koala.acceptance import Sampling
from koala.args import add_drafter_args, add_sampling_args, add_target_args
from koala.build import drafter_from_args, sampling_from_args, target_from_args
from koala.decode import Stats, stream_text, stream_tokens
from koala.drafters.base import Drafter
from koala.target import Target

COMMANDS_HELP = "/reset clears the conversation, /exit (or Ctrl-D) quits, Ctrl-C stops the current answer"


class ChatSession:
    """A conversation with the target: the message history plus one speculative decode per answer."""

    def __init__(self, target: Target, drafter: Drafter | None = None, sampling: Sampling = Sampling(),
                 max_new_tokens: int = 256, rule: str = "auto", seed: int | None = None,
                 system: str | None = None) -> None:
        self.target, self.drafter, self.sampling = target, drafter or Drafter(), sampling
        self.max_new_tokens, self.rule, self.seed, self.system = max_new_tokens, rule, seed, system
        self.history: list[dict] = []
        self.last_stats = Stats()
        self.dropped = 0  # messages of the oldest turns left out of the last prompt to fit the context
        self.stopped = False  # whether the last answer was cut short by stop()
        self._stop = threading.Event()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.history.clear()

    def stop(self) -> None:
        """Ask the answer being generated to end after the current target forward (safe from a signal handler)."""
        self._stop.set()

    def _messages(self, turns: list[dict]) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + turns

    def _prompt_ids(self) -> list[int]:
        """Chat-templated ids of the history, dropping the oldest turns (user + answer) until it fits the context."""
        room = min(self.max_new_tokens, 64)  # keep space for at least a short answer when trimming
        turns, dropped = list(self.history), 0
        while True:
            ids = self.target.encode(self._messages(turns))
            if len(ids) + room <= self.target.max_length or len(turns) <= 1:
                break
            turns, dropped = turns[2:], dropped + 2  # history is user, answer, ..., user: stays alternating
        if len(ids) >= self.target.max_length:
            raise ValueError(f"This message is {len(ids)} tokens with the template but the target's context holds "
                             f"{self.target.max_length}; send a shorter one.")
        self.dropped = dropped
        return ids

    def answer(self, text: str) -> Iterator[str]:
        """Stream the answer to a user message as text pieces; the answer (even a stopped one) joins the history.

        `last_stats` holds the speculative counters (tau, tokens/s) once the iterator is exhausted or closed.
        """
        if not text.strip():
            raise ValueError("The message is empty.")
        self.history.append({"role": "user", "content": text})
        try:
            ids = self._prompt_ids()
        except ValueError:
            self.history.pop()
            raise
        self._stop.clear()
        self.stopped = False
        self.last_stats = stats = Stats()
        tokens: list[int] = []

        def collected() -> Iterator[list[int]]:
            for new in stream_tokens(self.target, ids, self.drafter, self.sampling, self.max_new_tokens, stats,
                                     self.rule, self.seed, should_stop=self._stop.is_set):
                tokens.extend(new)
                yield new

        try:
            yield from stream_text(self.target, collected())
        finally:  # also on close() or an exception: keep what was said, so the next turn sees it
            self.stopped = self._stop.is_set()
            self.history.append({"role": "assistant", "content": self.target.decode(tokens)})


def _stats_line(session: ChatSession) -> str:
    s = session.last_stats
    notes = [f"{s.new_tokens} tokens", f"tau {s.tau:.2f}", f"{s.tokens_per_s:.1f} tok/s"]
    if session.stopped:
        notes.append("stopped")
    if session.dropped:
        notes.append(f"{session.dropped} oldest messages left out to fit the context")
    return f"[{session.drafter.name}: " + ", ".join(notes) + "]"


def run_chat(session: ChatSession, prompt: str = "> ") -> None:
    """The read-answer loop on stdin/stdout; stats go to stderr so stdout is only the conversation."""
    print(f"koala chat with {session.target.name} ({session.drafter.name}). {COMMANDS_HELP}.", file=sys.stderr)
    while True:
        try:
            line = input(prompt)
        except EOFError:
            print(file=sys.stderr)
            return
        except KeyboardInterrupt:
            print(f"\n({COMMANDS_HELP})", file=sys.stderr)
            continue
        command = line.strip()
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            session.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not command:
            continue
        _answer(session, line)


def _answer(session: ChatSession, line: str) -> None:
    """Print one streamed answer; Ctrl-C while it runs only stops it."""
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, lambda *_: session.stop()) if on_main else None
    try:
        for piece in session.answer(line):
            print(piece, end="", flush=True)
    except ValueError as e:
        print(f"koala: {e}", file=sys.stderr)
        return
    finally:
        if on_main:
            signal.signal(signal.SIGINT, previous)
    print()
    print(_stats_line(session), file=sys.stderr, flush=True)


def _chat(args: argparse.Namespace) -> int:

    target = target_from_args(args)
    session = ChatSession(target, drafter_from_args(args, target), sampling_from_args(args), args.max_new_tokens,
                          args.acceptance, args.seed, args.system)
    run_chat(session)
    return 0


def add_command(sub) -> None:

    p = sub.add_parser("chat", help="multi-turn chat in the terminal (streams, shows tau and tokens/s)")
    p.add_argument("--system", default=None, help="a system prompt for the whole conversation")
    add_target_args(p)
    add_drafter_args(p)
    add_sampling_args(p)
    p.set_defaults(func=_chat)
