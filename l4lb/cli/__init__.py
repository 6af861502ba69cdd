"""l4lbctl, the operator's command line for l4lbd (``l4lb.cli.main`` holds the command group)."""

from .main import cli, main

__all__ = ["cli", "main"]
