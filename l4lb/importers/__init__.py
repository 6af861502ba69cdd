"""Importers: other load balancers' configurations -> an l4lb desired-state document.

    ipvsadm     ``ipvsadm -S -n`` rules
    keepalived  keepalived.conf (2.2) virtual servers, real servers and checkers
    keepalived_conf  its syntax: blocks, comments, includes, variables
    ipvs        what IPVS's schedulers, persistence and forwarding mean in l4lb (shared)
    result      the document, the notes (file, line, what became of it), validation

Pure: no daemon, no kernel. ``l4lbctl import`` prints the document for
``l4lbctl apply -f`` and the notes on stderr.
"""

from .result import Note, Result, SourceError

__all__ = ["Note", "Result", "SourceError"]
