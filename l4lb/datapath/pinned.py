"""Maps by file descriptor, and what is kept beside the pins.

``MapHandle`` is how Tables reads and writes every pinned map, whether the
program was just compiled (fds and ctypes from BCC) or adopted from the pins
without compiling (fds from BPF_OBJ_GET, ctypes rebuilt from the type
descriptions BCC gave when it compiled the program that made the pins). Either
way the ctypes come from BCC's reading of the C structs in maps.h: nothing here
mirrors a struct by hand.

``Record`` is a small JSON document kept in a one-element BPF array pinned in
the pin directory (a bpffs holds only BPF objects and directories, no plain
files). Two are kept: ``prog_types`` (which program is pinned: its digest and
BCC's type descriptions of its maps) and ``converged`` (which store revision
the maps were last converged to: see l4lb/lifecycle). No BPF program reads
them; their value is opaque bytes (a length, then UTF-8 JSON).
"""

from __future__ import annotations

import ctypes as ct
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from l4lb.datapath import libbpf
from l4lb.datapath.config import DatapathError

BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
PERCPU = {BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY}
BPF_MAP_TYPE_ARRAY_OF_MAPS = 12
BPF_MAP_TYPE_DEVMAP = 14
ARRAYS = {BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_ARRAY_OF_MAPS, BPF_MAP_TYPE_DEVMAP}


def possible_cpus() -> int:
    from bcc.utils import get_possible_cpus  # as BCC sizes its per-CPU leaves

    return len(get_possible_cpus())


def decode_type(desc: Any) -> Any:
    """A ctypes type from one of BCC's type descriptions (bpf_table_key_desc /
    bpf_table_leaf_desc JSON), decoded by BCC itself."""
    from bcc import BPF  # only the datapath needs libbcc

    return BPF._decode_table_type(desc)


class MapHandle:
    """One BPF map by fd, with BCC's ctypes for its key and value. Enough of
    BCC's table interface for Tables and the tests: items, get/set/delete,
    Key/Leaf (per-CPU maps: Leaf is one sLeaf per possible CPU, as in BCC)."""

    def __init__(self, name: str, fd: int, key_type: Any, leaf_type: Any, *, owned: bool) -> None:
        self.name = name
        self.map_fd = fd
        self._owned = owned  # close the fd with the handle (adopted); BCC's own fds are BCC's
        info = libbpf.map_info(fd)
        self.ttype = info.type
        self.max_entries = info.max_entries
        self.Key = key_type
        if info.type in PERCPU:
            if ct.sizeof(leaf_type) % 8:
                raise DatapathError(f"per-CPU map {name}: value size {ct.sizeof(leaf_type)} is not 8-byte aligned")
            self.sLeaf = leaf_type
            self.Leaf = leaf_type * possible_cpus()
        else:
            self.Leaf = leaf_type
        if ct.sizeof(self.Key) != info.key_size or ct.sizeof(self.sLeaf if info.type in PERCPU else self.Leaf) \
                != info.value_size:
            raise DatapathError(f"map {name}: the kernel's key/value sizes ({info.key_size}/{info.value_size}) "
                                "are not those of its C types")

    @classmethod
    def of_bcc(cls, name: str, table: Any) -> "MapHandle":
        leaf = getattr(table, "sLeaf", None) or table.Leaf
        return cls(name, table.map_fd, table.Key, leaf, owned=False)

    def __getitem__(self, key: Any) -> Any:
        leaf = self.Leaf()
        if not libbpf.map_lookup(self.map_fd, key, leaf):
            raise KeyError(key)
        return leaf

    def __setitem__(self, key: Any, leaf: Any) -> None:
        libbpf.map_update(self.map_fd, key, leaf)

    def __delitem__(self, key: Any) -> None:
        if self.ttype in ARRAYS:  # array elements cannot be deleted: zero them
            self[key] = self.Leaf()
        elif not libbpf.map_delete(self.map_fd, key):
            raise KeyError(key)

    def keys(self) -> Iterator[Any]:
        prev = None
        while True:
            nxt = self.Key()
            if not libbpf.map_next_key(self.map_fd, prev, nxt):
                return
            yield nxt
            prev = nxt

    def items(self) -> list[tuple[Any, Any]]:
        out = []
        for k in self.keys():
            try:
                out.append((k, self[k]))
            except KeyError:  # deleted between the two calls
                pass
        return out

    def values_array(self) -> np.ndarray:
        """Every value of an array map in one batch read, as a numpy view of the C struct."""
        raw = libbpf.array_lookup_all(self.map_fd, self.max_entries, ct.sizeof(self.Leaf))
        return raw.view(np.dtype(self.Leaf)).reshape(self.max_entries)

    def close(self) -> None:
        if self._owned and self.map_fd >= 0:
            os.close(self.map_fd)
            self.map_fd = -1


class PinnedObjects:
    """Stands in for a bcc.BPF of a program adopted from its pins: maps by name
    (``objs[b"services"]``) and cleanup()."""

    def __init__(self, maps: dict[str, MapHandle], prog_fd: int) -> None:
        self.maps = maps
        self.prog_fd = prog_fd

    def __getitem__(self, name: bytes | str) -> MapHandle:
        key = name.decode() if isinstance(name, bytes) else name
        return self.maps[key]

    def cleanup(self) -> None:
        for m in self.maps.values():
            m.close()
        if self.prog_fd >= 0:
            os.close(self.prog_fd)
            self.prog_fd = -1


# --- JSON records beside the pins ----------------------------------------------------------------

RECORD_SIZE = 16384  # bytes of value (a 4-byte length, then the JSON), unless told otherwise


class Record:
    """A JSON document in a pinned one-element array at ``path``."""

    def __init__(self, path: Path, size: int = RECORD_SIZE) -> None:
        self.path = path
        self.size = size

    def read(self) -> dict[str, Any] | None:
        """The document, or None when there is none (no pin, or never written)."""
        if not self.path.exists():
            return None
        fd = libbpf.obj_get(str(self.path))
        try:
            buf = (ct.c_ubyte * libbpf.map_info(fd).value_size)()
            if not libbpf.map_lookup(fd, ct.c_uint32(0), buf):
                return None
            raw = bytes(buf)
        finally:
            os.close(fd)
        n = int.from_bytes(raw[:4], "little")
        if not n:
            return None
        if n > len(raw) - 4:
            raise DatapathError(f"{self.path}: record length {n} is corrupt")
        try:
            doc = json.loads(raw[4:4 + n])
        except ValueError as e:
            raise DatapathError(f"{self.path}: record is not JSON: {e}") from None
        if not isinstance(doc, dict):
            raise DatapathError(f"{self.path}: record is not a JSON object")
        return doc

    def write(self, doc: dict[str, Any] | None) -> None:
        """Replace the document (None: clear it); creates and pins the map the first time."""
        body = b"" if doc is None else json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
        fd = self._open()
        try:
            size = libbpf.map_info(fd).value_size
            if len(body) > size - 4:
                raise DatapathError(f"{self.path}: record of {len(body)} bytes does not fit {size - 4}")
            value = (ct.c_ubyte * size).from_buffer_copy(len(body).to_bytes(4, "little") + body.ljust(size - 4, b"\0"))
            libbpf.map_update(fd, ct.c_uint32(0), value)
        finally:
            os.close(fd)

    def _open(self) -> int:
        if self.path.exists():
            return libbpf.obj_get(str(self.path))
        fd = libbpf.array_create(self.path.name[:15], self.size, 1)
        try:
            libbpf.obj_pin(fd, str(self.path))
        except OSError:
            os.close(fd)
            raise
        return fd
