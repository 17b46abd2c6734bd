"""What Linux does with the pages of our mapped files: random-access advice, RAM filesystems.

:func:`advise_random` keeps a gather from a large table (an embedding) from mapping and reading
ahead far more of the file than the rows it reads; :func:`ram_filesystem` tells whether a folder's
files live in RAM (where writing bytes to a file moves them out of no one's DRAM). Linux only; a
no-op elsewhere. NumPy-free, standard library only.
"""

from __future__ import annotations

import logging
import mmap
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def advise_random(ranges) -> int:
    """Tell Linux that the file bytes in ``ranges`` are read at random; returns the bytes advised.

    ``ranges``: ``(file, offset, length)`` of tables read a few rows per run anywhere (embedding
    tables under a gather). On a read fault in a file-backed mapping the kernel also maps every
    neighbouring page that is in the page cache (*fault-around*, 64 KiB by default) and, on a
    miss, reads ahead around the page: a gather of 128 token rows from a 23 MB table maps ~7 MB
    instead of ~0.5 MB. ``MADV_RANDOM`` stops the read-ahead but not the fault-around, which only
    maps pages already cached; so each range is also dropped from the page cache
    (``POSIX_FADV_DONTNEED``: clean pages no process maps; the next read of a row reads its page
    alone). The kernel drops a cached folio (up to a huge page, 2 MiB) only when it lies whole in
    the range, so the range is widened to whole huge pages: the neighbours' cached bytes go too,
    which costs at most a re-read from the file (dirty pages, of a file written seconds ago, stay). Every mapping of this process of each file (matched by device and inode in
    ``/proc/self/maps``, or by path) that overlaps a range gets ``madvise(MADV_RANDOM)`` on the overlap.
    Costs: the first read of each page is a small read from the file (4 KiB) instead of one
    read-ahead. Linux only: elsewhere (no ``/proc/self/maps``, no ``madvise``) a no-op; it never
    raises (an advice is a hint).
    """
    import ctypes
    import ctypes.util

    advice = getattr(mmap, "MADV_RANDOM", None)
    if not ranges or advice is None or not sys.platform.startswith("linux") or not hasattr(os, "posix_fadvise"):
        return 0
    try:
        wanted: dict[tuple[int, int, int], list[tuple[Path, int, int]]] = {}
        by_path: dict[str, list[tuple[Path, int, int]]] = {}
        for file, offset, length in ranges:
            st = os.stat(file)
            key = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
            item = (Path(file), int(offset), int(length))
            wanted.setdefault(key, []).append(item)
            by_path.setdefault(str(Path(file).resolve()), []).append(item)
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        with open("/proc/self/maps") as fh:
            maps = fh.read().splitlines()
    except (OSError, AttributeError, ValueError) as exc:
        log.debug("no random-access advice (%s)", exc)
        return 0
    page = mmap.PAGESIZE
    advised: set[tuple[Path, int, int]] = set()
    total = 0
    for line in maps:
        fields = line.split(maxsplit=5)
        if len(fields) < 5:
            continue
        try:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            major, minor = (int(x, 16) for x in fields[3].split(":"))
            key, vma_offset = (major, minor, int(fields[4])), int(fields[2], 16)
        except ValueError:
            continue
        # by device and inode; by path where they differ from stat's (overlayfs, btrfs subvolumes)
        for item in wanted.get(key) or (by_path.get(fields[5].strip(), ()) if len(fields) > 5 else ()):
            _, offset, length = item
            start = max(lo, lo + offset - vma_offset) // page * page
            stop = min(hi, -(-(lo + offset + length - vma_offset) // page) * page)
            if stop > start and libc.madvise(start, stop - start, advice) == 0:
                advised.add(item)
                total += stop - start
    grain = _huge_page_bytes()
    for file, offset, length in advised:
        start, stop = offset // grain * grain, -(-(offset + length) // grain) * grain
        try:
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, start, stop - start, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except OSError as exc:
            log.debug("%s: cannot drop cached pages (%s)", file, exc)
    return total


def _huge_page_bytes() -> int:
    """The largest page-cache folio: the PMD huge page size (2 MiB on x86-64 and 4K-page ARM64)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as fh:
            return max(mmap.PAGESIZE, int(fh.read().strip()))
    except (OSError, ValueError):
        return 2 << 20


#: Filesystems whose files live in RAM: a spill there would only move bytes out of the process's
#: RSS into shared memory, not out of DRAM, so :class:`~qbert_edge.runtime.spill.Spill` declines them.
RAM_FILESYSTEMS = ("tmpfs", "ramfs", "devtmpfs", "hugetlbfs")


def ram_filesystem(folder: Path) -> str:
    """The filesystem type of ``folder`` if it keeps files in RAM (Linux ``/proc/self/mountinfo``), else ''."""
    try:
        target = str(Path(folder).resolve())
        with open("/proc/self/mountinfo") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return ""
    best, kind = "", ""
    for line in lines:
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        point = fields[4].replace("\\040", " ")
        fstype = line.split(" - ", 1)[1].split()[0]
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fstype
    return kind if kind in RAM_FILESYSTEMS else ""
