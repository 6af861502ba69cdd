"""Service names: one pattern for the models, the API's paths and the CLI.

Always applied whole (``fullmatch``, or ``^...$`` where pydantic's Rust regex
applies it): with ``re.match`` and a trailing ``$``, ``"abc\\n"`` passed, was
stored, and could then never be addressed in a URL again.
"""

from __future__ import annotations

import re

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}"
NAME_RE = re.compile(NAME_PATTERN)
# For pydantic/FastAPI ``pattern=``: pydantic-core's regex engine, where ``$`` is the very end.
NAME_REGEX = f"^{NAME_PATTERN}$"
NAME_RULE = "1-63 letters, digits, '_', '.', '-', starting with a letter or digit"


def valid_name(name: object) -> bool:
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None
