"""l4lb: a standalone XDP layer-4 load balancer."""

__version__ = "0.1.0"
