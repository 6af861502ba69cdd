"""The only code that talks to BCC, bpffs and netlink.

Public surface used by the daemon (and tests):

    dp = Datapath(DatapathConfig(bpffs=Path("/sys/fs/bpf/l4lb"), maglev_m=16381, ...))
    dp.load()                                # compile; reuse pinned maps
    dp.load(adopt=True)                      # the daemon: adopt the pinned program if it is the same
    dp.apply(services)                       # reconcile maps to a desired service list
    dp.converged() / dp.mark_converged(...)  # which store revision the maps hold (l4lb/lifecycle)
    dp.adopt_in_force(services)              # take the tables in force as they are (a clean restart)
    dp.in_force()                            # what the maps hold, for --adopt-datapath
    dp.attach(["eth0"], mode="auto")         # attach / atomically replace
    dp.stats()                               # per service / backend / reason counters
    dp.status()                              # program id, interfaces, map fill levels
    dp.flow_source()                         # flow map + labels: flowscan.FlowWatch (active flows, fill)
    dp.detach(["eth0"])                      # deliberate removal only
"""

from typing import Any

from l4lb.datapath.config import DatapathConfig, DatapathError, DatapathFull

__all__ = ["Datapath", "DatapathConfig", "DatapathError", "DatapathFull", "DatapathStats"]


def __getattr__(name: str) -> Any:
    # Lazy: importing the engine pulls in bcc/libbcc; config users don't need it.
    if name in ("Datapath", "DatapathStats"):
        from l4lb.datapath import engine

        return getattr(engine, name)
    raise AttributeError(name)
