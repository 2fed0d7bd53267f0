"""Where a group of processes' memory goes, page by page: which resident pages each process has
to itself and which it shares with the others, from /proc/PID/pagemap (the physical frame of
every resident page; reading frames needs root).

Why: PSS says how much, not why. For processes forked from one image (the daemon's supervisor,
fork server and workers) the question is how much of the image each process copied by writing
into it (CPython writes a reference count into every object it uses), how much stays shared,
and how much each allocated afresh. File-backed pages (libpython, libcrypto, libc, ...) are
also counted as if the group ran alone: the kernel's PSS splits them with every other process
mapping the same files (on a test machine, the benchmark's own Python and the broker), which a
small device running only the daemon does not have.
"""
from __future__ import annotations

import os
import re
import struct
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple

PAGE = os.sysconf("SC_PAGE_SIZE")  # 4 KB here; a Raspberry Pi 5's kernel uses 16 KB
PAGE_KB = PAGE / 1024
_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \d+\s*(.*)$")
_PRESENT, _FILE_OR_SHARED = 1 << 63, 1 << 61
_FRAME = (1 << 55) - 1
_ENTRY = struct.Struct("<Q")


@dataclass
class PageClasses:
    """One process's resident pages in kB. `copied`: private anonymous pages at an address the
    image's holder also has resident (the shared image, copied by a write); `own`: other
    private anonymous pages (allocated after the fork);
    `shared`: anonymous pages shared with others, split evenly among them; `file`: file-backed
    pages split among the group only (as if it ran alone), without `excluded` mappings."""
    copied: float = 0.0
    own: float = 0.0
    shared: float = 0.0
    file: float = 0.0

    @property
    def total(self) -> float:
        return self.copied + self.own + self.shared + self.file

    @classmethod
    def combined(cls, many: Iterable["PageClasses"], reduce: Callable[[Iterable[float]], float]
                 ) -> "PageClasses":
        """Each class reduced over `many` (sum: a group's total; a median: over runs)."""
        many = list(many)
        return cls(**{f.name: reduce(getattr(c, f.name) for c in many) for f in fields(cls)})


Page = Tuple[int, bool]  # (physical frame, file-backed and unmodified)


def resident_pages(pid: int, excluded: str) -> Dict[int, Page]:
    """Virtual address -> page of every resident page of `pid`, but those of mappings whose
    name ends with `excluded`. A written page of a private file mapping (a library's data) is
    anonymous memory, as the kernel counts it."""
    pages: Dict[int, Page] = {}
    with open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        for start, end, name in _mappings(pid):
            if name.endswith(excluded) or name == "[vsyscall]":
                continue
            pagemap.seek(start // PAGE * _ENTRY.size)
            entries = pagemap.read((end - start) // PAGE * _ENTRY.size)
            for index, (entry,) in enumerate(_ENTRY.iter_unpack(entries)):
                if entry & _PRESENT:
                    file_page = name.startswith("/") and bool(entry & _FILE_OR_SHARED)
                    pages[start + index * PAGE] = (entry & _FRAME, file_page)
    return pages


def _mappings(pid: int) -> Iterator[Tuple[int, int, str]]:
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        found = _MAPPING.match(line)
        if found:
            yield int(found[1], 16), int(found[2], 16), found[3]


def classify(pids: Dict[str, int], image: str, excluded: str = "/data.mdb"
             ) -> Optional[Dict[str, PageClasses]]:
    """PageClasses of each named process; None when the frames cannot be read (not root: the
    kernel then reports every frame as 0). `image` names the process that holds the image the
    others were forked from and allocates little itself (the fork server): a private page of
    another process at an address it has is a copy; its own private pages are copies too (of
    pages that every other process wrote, or that it wrote itself), as are those of the others
    at addresses of its pages."""
    pages = {name: resident_pages(pid, excluded) for name, pid in pids.items()}
    if not any(frame for found in pages.values() for frame, _ in found.values()):
        return None
    mappers = Counter(frame for found in pages.values() for frame, _ in found.values())
    held = pages[image]
    classes = {}
    for name, found in pages.items():
        mine = PageClasses()
        for address, (frame, file_page) in found.items():
            share = mappers[frame]
            if file_page:
                mine.file += PAGE_KB / share
            elif share > 1:
                mine.shared += PAGE_KB / share
            elif name == image or address in held:
                mine.copied += PAGE_KB
            else:
                mine.own += PAGE_KB
        classes[name] = mine
    return classes
