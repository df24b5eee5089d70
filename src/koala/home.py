"""Where koala keeps what it makes once per machine: converted targets, measured drafting plans, compiled kernels."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """KOALA_HOME, else ~/.cache/koala."""
    return Path(os.environ.get("KOALA_HOME", Path.home() / ".cache" / "koala"))
