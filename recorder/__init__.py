"""User-space side of the n-tuple PCAP recorder (installed as l4lb.recorder)."""
