"""The real datapath loaded and attached on a lab's LB, for tests that drive
it directly (without the daemon): one place for the load/attach/close dance."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from l4lb.datapath import Datapath, DatapathConfig
from l4lb.lab import netns


@contextmanager
def lab_datapath(lab: Any, bpffs: Path, name: str, interfaces: Sequence[str] | None = None,
                 **cfg: Any) -> Iterator[tuple[Datapath, netns.NetnsWorker]]:
    """Load the program with pins under ``bpffs/<name>-<lab tag>``, attach it to
    ``interfaces`` (default: the LB's first NIC) in the LB's netns, and set
    ``lab.dp`` / ``lab.worker``; closed again on exit."""
    pin = bpffs / f"{name}-{lab.tag}"
    pin.mkdir()
    dp = Datapath(DatapathConfig(bpffs=pin, **cfg))
    worker = netns.NetnsWorker(lab.lb_ns)
    try:
        worker.call(dp.load)
        worker.call(dp.attach, list(interfaces or [lab.lb_if]), "auto")
        lab.dp, lab.worker = dp, worker
        yield dp, worker
    finally:
        worker.call(dp.close)
        worker.close()
