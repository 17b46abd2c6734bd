"""Versioned, atomic files: every file the toolkit writes names its format and version.

Writers go through :func:`atomic_path` (write a temporary file beside the target, then
rename), so an interrupted command never leaves half a file and never clobbers what the
user had. Readers call :func:`check_format` before trusting a single field.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from qbert_edge.errors import QbertEdgeError


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` on success.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_path(d / "x.txt") as tmp:
    ...     _ = tmp.write_text("hi")
    >>> (d / "x.txt").read_text()
    'hi'
    """
    target = Path(target)
    if not target.parent.is_dir():
        raise QbertEdgeError(f"{target}: directory {target.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def check_format(data: Any, path: str | os.PathLike, fmt: str, max_version: int) -> int:
    """Check that ``data`` (a loaded dict) carries ``format == fmt`` and a known version.

    Returns the version. Raises :class:`QbertEdgeError` naming ``path`` otherwise.
    """
    if not isinstance(data, dict) or "format" not in data:
        raise QbertEdgeError(f"{path}: not a qbert-edge file (no 'format' field; expected {fmt})")
    if data["format"] != fmt:
        raise QbertEdgeError(f"{path}: is a {data['format']!r} file, expected {fmt!r}")
    version = data.get("version")
    if not isinstance(version, int) or version < 1:
        raise QbertEdgeError(f"{path}: {fmt} file has no valid version")
    if version > max_version:
        raise QbertEdgeError(
            f"{path}: {fmt} version {version} is newer than this qbert-edge reads "
            f"(up to {max_version}); upgrade qbert-edge"
        )
    return version


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, fmt: str, max_version: int) -> dict:
    """Read a versioned JSON file written by :func:`write_json`; check its format and version."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise QbertEdgeError(f"{path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QbertEdgeError(f"{path}: not valid JSON ({exc})") from None
    check_format(data, path, fmt, max_version)
    return data
