"""Reading training/evaluation prompts: ShareGPT conversations and MT-bench style question files.

Both become plain chat messages (`[{"role": "user"|"assistant"|"system", "content": str}, ...]`). Real dumps are
messy (truncated files, odd roles, empty turns), so a bad record is skipped and *counted* in `ReadStats` — reading
never fails on one record and never drops one silently.
"""
from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "assistant": "assistant",
         "bard": "assistant", "bing": "assistant", "system": "system"}


@dataclass
class Conversation:
    """One record: an id, and its messages in order (system first if any, then user/assistant turns)."""

    id: str
    messages: list[dict]
    index: int = -1  # position in the input file: the key that resumable pipelines use (ids may repeat)
    finish: list[str] = field(default_factory=list)  # per assistant turn of distilled data: "eos" or "length"
    context: int = 0  # leading assistant turns taken from an earlier distillation: context, not training targets

    @property
    def user_turns(self) -> list[str]:
        return [m["content"] for m in self.messages if m["role"] == "user"]


@dataclass
class ReadStats:
    """What a reader saw: records kept, and records skipped with the reason (counted, reported by the caller)."""

    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"{self.kept} records kept, {self.total_skipped} skipped ({why})"


def _open_text(path: Path) -> io.TextIOBase:
    if not path.is_file():
        raise FileNotFoundError(f"Data file {path} does not exist.")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _iter_json_array(f: io.TextIOBase, stats: ReadStats) -> Iterator[object]:
    """Records of a (possibly truncated) top-level JSON array, decoded one at a time."""
    text = f.read()
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            stats.skip("truncated JSON array tail")
            return
        yield obj


def iter_records(path: str | Path, stats: ReadStats) -> Iterator[object]:
    """Raw JSON records of a JSONL or JSON-array file (optionally .gz); undecodable lines are counted."""
    path = Path(path)
    with _open_text(path) as f:
        first = ""
        while not first:
            ch = f.read(1)
            if not ch:
                return
            first = ch.strip()
        if first == "[":
            rest = f.read()
            yield from _iter_json_array(io.StringIO("[" + rest), stats)
            return
        line = first + f.readline()
        while line:
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    stats.skip("malformed JSON line")
            line = f.readline()


def valid_unicode(texts: list[str]) -> bool:
    """False for text with lone surrogates (e.g. "\\ud800"): JSON can carry them, UTF-8 and tokenizers cannot."""
    try:
        for t in texts:
            t.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _valid_unicode(texts: list[str], stats: ReadStats) -> bool:
    ok = valid_unicode(texts)
    if not ok:
        stats.skip("invalid Unicode (lone surrogate)")
    return ok


def _sharegpt(rec: dict, index: int, stats: ReadStats) -> Conversation | None:
    turns = rec.get("conversations", rec.get("conversation"))
    if not isinstance(turns, list):
        stats.skip("no conversations list")
        return None
    messages = []
    for t in turns:
        if not isinstance(t, dict) or not isinstance(t.get("value", t.get("content")), str):
            stats.skip("malformed turn")
            return None
        role = ROLES.get(str(t.get("from", t.get("role", ""))).lower())
        if role is None:
            stats.skip(f"unknown role {t.get('from', t.get('role'))!r}")
            return None
        messages.append({"role": role, "content": t.get("value", t.get("content"))})
    if messages and messages[0]["role"] == "system":
        system, body = messages[:1], messages[1:]
    else:
        system, body = [], messages
    if not body or body[0]["role"] != "user" or not body[0]["content"].strip():
        stats.skip("does not start with a non-empty user turn")
        return None
    if not _valid_unicode([m["content"] for m in messages], stats):
        return None
    finish = rec.get("finish") if isinstance(rec.get("finish"), list) else []
    context = rec.get("context_turns", 0)
    return Conversation(str(rec.get("id", index)), system + body, index, [str(f) for f in finish],
                        context if isinstance(context, int) and context > 0 else 0)


def _mt_bench(rec: dict, index: int, stats: ReadStats) -> Conversation | None:
    turns = rec.get("turns")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
        stats.skip("malformed turns list")
        return None
    turns = [t for t in turns if t.strip()]
    if not turns:
        stats.skip("only empty turns")
        return None
    if not _valid_unicode(turns, stats):
        return None
    return Conversation(str(rec.get("question_id", index)), [{"role": "user", "content": t} for t in turns],
                        index)


def read_conversations(path: str | Path, stats: ReadStats | None = None) -> Iterator[Conversation]:
    """Conversations from a ShareGPT file or an MT-bench question file (detected per record)."""
    stats = stats if stats is not None else ReadStats()
    for i, rec in enumerate(iter_records(path, stats)):
        if not isinstance(rec, dict):
            stats.skip("record is not an object")
            continue
        conv = _mt_bench(rec, i, stats) if "turns" in rec else _sharegpt(rec, i, stats)
        if conv is not None:
            stats.kept += 1
            yield conv


def read_distilled(path: str | Path) -> dict[int, Conversation]:
    """The records of a `koala distill` output (its conversations.jsonl, or a packed .jsonl.gz) by key, the
    position of their conversation in the file that was distilled; `index` is set to the key."""
    out = {}
    for rec in iter_records(path, ReadStats()):
        if not isinstance(rec, dict) or not isinstance(rec.get("key"), int):
            continue
        conv = _sharegpt(rec, rec["key"], ReadStats())
        if conv is not None and len(conv.finish) == sum(m["role"] == "assistant" for m in conv.messages):
            out[conv.index] = conv
    if not out:
        raise ValueError(f"{path} holds no distilled records (lines with 'key', 'conversations' and 'finish').")
    return out


def write_sharegpt(conv: Conversation, **extra) -> str:
    """One JSONL line in ShareGPT form (the format distillation writes and caching reads)."""
    back = {"user": "human", "assistant": "gpt", "system": "system"}
    turns = [{"from": back[m["role"]], "value": m["content"]} for m in conv.messages]
    return json.dumps({"id": conv.id, "conversations": turns, **extra}, ensure_ascii=False)
