"""The registry of head kinds: the one place that lists them. A new kind is one module declaring a `HeadKind`
(see koala.kinds.base) plus its line here."""
from __future__ import annotations

from koala.kinds import eagle, eagle3, medusa
from koala.kinds.base import HeadKind

KINDS: dict[str, HeadKind] = {k.name: k for k in (medusa.KIND, eagle.KIND, eagle3.KIND)}


def kind(name: str) -> HeadKind:
    """The registered kind `name`, or a ValueError listing the kinds there are."""
    if name not in KINDS:
        raise ValueError(f"Unknown head kind {name!r}; choose one of {sorted(KINDS)}.")
    return KINDS[name]
