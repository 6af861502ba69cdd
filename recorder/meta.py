"""A recording's ``<id>.json`` metadata, read back strictly after a restart.

The recorder directory is the daemon's, but a file there may still have been edited,
truncated or replaced (by hand, a restore, a full disk). Whatever it holds ends up in API
answers and in file names, so it is checked whole before use: exact types, known states
and stop reasons, names the API itself would accept, and file names that are exactly the
ones this recording would have written. A file that fails is skipped, with the reason in
the log; the other recordings are listed as usual.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_META_BYTES = 8 << 20      # 16,384 filters of a few hundred bytes each, with room to spare
RECORDING_ID = r"^[A-Za-z0-9_.-]{1,64}$"

Count = Annotated[int, Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class MetaFile(_Strict):
    index: Count
    name: Annotated[str, Field(max_length=128)]


class Meta(_Strict):
    id: Annotated[str, Field(pattern=RECORDING_ID)]
    name: Annotated[str, Field(max_length=64, pattern=r"^[A-Za-z0-9_. -]*$")] | None = None
    state: Literal["running", "stopped"]
    stop_reason: Annotated[str, Field(pattern=r"^[a-z_]{1,32}$")] | None = None
    packets: Count = 0
    bytes: Count = 0
    lost: Count = 0
    files: list[MetaFile]
    filters: list[dict[str, Any]]
    capture_length: Count
    format: Literal["pcapng", "pcap"]
    direction: Literal["in", "out", "both"] = "both"
    verdict: bool = True
    stop: dict[str, Any] | None = None
    rotate: dict[str, Any] | None = None
    started_ns: Count
    stopped_ns: Count | None = None


class BadMeta(ValueError):
    """The metadata file cannot be used; the message says why (never its contents)."""


def read_meta(path: Path) -> tuple[Meta, int]:
    """The validated metadata and the file's mtime (ns). Never follows a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise BadMeta(f"cannot open it: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not (st.st_mode & 0o170000 == 0o100000):
            raise BadMeta("not a regular file")
        if st.st_size > MAX_META_BYTES:
            raise BadMeta(f"{st.st_size} bytes, more than metadata ever takes")
        raw = f.read(MAX_META_BYTES + 1)
    try:
        meta = Meta.model_validate_json(raw)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        where = ".".join(map(str, first["loc"])) or "document"
        raise BadMeta(f"{where}: {first['msg']} ({e.error_count()} problems)") from None
    if meta.id != path.stem:
        raise BadMeta(f"it names recording {meta.id!r}, not {path.stem!r}")
    return meta, st.st_mtime_ns
