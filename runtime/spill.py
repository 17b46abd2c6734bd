"""A temporary file beside the model for arrays a backend makes while loading.

:class:`Spill` writes each array (the ``ort`` backend's widened codes, int8 weights) to the file as
it is made and hands back a read-only mapped view, which onnxruntime then reads as external data
like the model's own weights (:meth:`~qbert_edge.runtime.loader.LoadedGraph.file_location`), so
the arrays of the whole model are never in memory together. :func:`remove_stale_spills` cleans up
after a process that was killed while loading.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import tempfile
from pathlib import Path

import numpy as np
from qbert_edge.runtime.loader import LoadedGraph
from qbert_edge.runtime.pages import ram_filesystem

log = logging.getLogger(__name__)


class Spill:
    """A temporary file beside the model for arrays made while loading (widened codes).

    :meth:`put` writes an array at a page-aligned offset and returns a read-only view of the
    file's bytes there, registered in the graph's maps so :meth:`LoadedGraph.file_location` finds
    it: a backend then declares it to onnxruntime as external data like any weight of the model
    file. The bytes leave the process at once (only the page cache holds them, reclaimable once
    written back; this process never touches the view's pages), and onnxruntime frees its own
    buffer of each initializer once its kernel has prepacked it, so the arrays of the whole model
    are never in this process's memory together. :meth:`close` (after the session is created)
    unlinks the file; mappings still open keep reading it.

    The file is made on the first :meth:`put` of at least :attr:`min_bytes`, with a hidden name
    that carries this process's id (``.qbert-edge-<pid>-*.spill``), in the model's folder
    (onnxruntime reads external data only from there). A process killed before :meth:`close`
    leaves its file behind; the next spill in that folder removes the files of processes that no
    longer run (:func:`remove_stale_spills`). Where it cannot be
    made (a read-only folder, a full disk, Windows) or would live in RAM (:data:`~qbert_edge.runtime.pages.RAM_FILESYSTEMS`),
    ``put`` returns the array itself: the same result, held in memory as before.
    """

    def __init__(self, graph: LoadedGraph, min_bytes: int = 64 * 1024) -> None:
        self.graph = graph
        self.min_bytes = min_bytes
        self.path: Path | None = None
        self.bytes = 0  # array bytes written
        self._fd: int | None = None
        self._end = 0
        self._failed = "Windows (a mapped file cannot be unlinked)" if os.name == "nt" else ""
        self._failed = self._failed or ram_filesystem(graph.path.parent)
        if self._failed:
            log.info("%s: no spill (%s): arrays made while loading stay in memory", graph.path.parent, self._failed)

    def put(self, arr: np.ndarray) -> np.ndarray:
        """``arr``'s bytes moved to the file: a read-only view with its dtype and shape (or ``arr``)."""
        arr = np.ascontiguousarray(arr)
        if arr.nbytes < self.min_bytes or self._failed:
            return arr
        try:
            if self._fd is None:
                remove_stale_spills(self.graph.path.parent)
                self._fd, name = tempfile.mkstemp(prefix=f".qbert-edge-{os.getpid()}-", suffix=".spill",
                                                  dir=self.graph.path.parent)
                self.path = Path(name)
                with contextlib.suppress(OSError):  # no locks on this filesystem: the pid alone tells
                    _try_lock(self._fd)  # held until close: tells remove_stale_spills the file is in use
            offset = -(-self._end // mmap.ALLOCATIONGRANULARITY) * mmap.ALLOCATIONGRANULARITY
            data = memoryview(arr.reshape(-1).view(np.uint8))
            done = 0
            while done < len(data):
                done += os.pwrite(self._fd, data[done:], offset + done)
            m = mmap.mmap(self._fd, arr.nbytes, offset=offset, access=mmap.ACCESS_READ)
        except OSError as exc:
            log.info("cannot write arrays made while loading beside %s (%s): they stay in memory",
                     self.graph.path, exc.strerror or exc)
            self._failed = str(exc)
            return arr
        self._end = offset + arr.nbytes
        self.bytes += arr.nbytes
        self.graph.add_map(self.path, m, offset)
        view = np.frombuffer(m, arr.dtype, count=arr.size).reshape(arr.shape)
        view.flags.writeable = False
        return view

    def owns(self, file: Path) -> bool:
        return self.path is not None and Path(file) == self.path

    def close(self) -> None:
        """Unlink the file and forget its maps (views still alive keep their mapping)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove the temporary file %s (%s)", self.path, exc.strerror or exc)
        os.close(self._fd)
        self._fd = None
        self.graph.forget_maps(self.path)


def remove_stale_spills(folder: Path) -> list[Path]:
    """Remove the :class:`Spill` files in ``folder`` left by processes that no longer run; the removed paths.

    A file is stale when the process id in its name does not run here and no process holds its
    lock (a :class:`Spill` holds an exclusive ``flock`` on its file until :meth:`Spill.close`;
    the lock also covers a process in another PID namespace that loads from a shared folder).
    A file whose name carries no process id is kept. A no-op on Windows.
    """
    if os.name == "nt":
        return []
    removed = []
    for path in Path(folder).glob(".qbert-edge-*-*.spill"):
        pid = path.name.split("-")[2]
        if not pid.isdigit() or _running(int(pid)):
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # gone already, or not ours to read
        try:
            if not _try_lock(fd):
                continue  # a live process holds it
            path.unlink()
        except OSError as exc:
            log.warning("cannot remove the stale temporary file %s (%s)", path, exc.strerror or exc)
            continue
        finally:
            os.close(fd)
        log.info("removed %s, left by process %s, which no longer runs", path, pid)
        removed.append(path)
    return removed


def _try_lock(fd: int) -> bool:
    """Take an exclusive ``flock`` on ``fd`` without waiting: False if another process holds one."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _running(pid: int) -> bool:
    """Whether ``pid`` runs in this PID namespace (POSIX only: on Windows ``os.kill`` terminates)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
