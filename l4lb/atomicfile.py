"""Write a small state file so that a crash leaves the old or the new content, never a
part: a temporary file beside it, fsync, rename over the target."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: Path, text: str, *, prepare: Callable[[int], None] | None = None) -> None:
    """Replace ``path`` with ``text``; ``prepare(fd)`` runs on the temporary file before
    its fsync (modes, owners). The temporary file is removed if anything fails."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            if prepare is not None:
                prepare(f.fileno())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
