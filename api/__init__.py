"""REST orchestration API (installed as l4lb.api)."""
