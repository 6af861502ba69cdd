"""A private bpf filesystem for tests, benches and the demo (this machine has no
/sys/fs/bpf mounted, and nothing here should touch the host's pins anyway)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def private_bpffs(prefix: str = "l4lb-bpffs-") -> Iterator[Path]:
    """Mount a fresh bpffs on a temporary directory; unmount and remove it afterwards."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    subprocess.run(["mount", "-t", "bpf", "bpf", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)
        shutil.rmtree(d, ignore_errors=True)
