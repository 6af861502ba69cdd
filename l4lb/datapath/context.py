"""What the datapath's parts share: the config in force, the loaded program's
maps and the one lock that serialises every change to them.

The parts (reconcile, Maglev tables, upkeep) each keep their own books but
read the config and the maps through one Context, so a program replacement
or a run-time config change is seen by all of them at once.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from l4lb.datapath.config import DatapathConfig

if TYPE_CHECKING:
    from l4lb.datapath.tables import Tables


@dataclass
class Context:
    cfg: DatapathConfig
    t: "Tables | None" = None
    lock: threading.RLock = field(default_factory=threading.RLock)

    @property
    def tables(self) -> "Tables":
        assert self.t is not None, "load() first"
        return self.t
