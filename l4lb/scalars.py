"""Numbers and switches of the config files, taken as written.

pydantic's default (lax) mode reads ``true`` as 1 for an integer, 1 as true for a switch and
"no" as false: ``stats_interval = true`` in l4lbd.toml would become one second without a word.
These are strict (an integer is still a valid float: ``header_timeout = 10``). The API's
models have their own strict types (l4lb/models.py: Port, Weight, Flag).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Strict

Int = Annotated[int, Strict()]
Num = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]
