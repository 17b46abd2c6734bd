"""Embedding tables are advised random-access, so a run maps the rows it reads (issue #6's last MBs).

On a read fault in a file mapping Linux also maps the cached neighbours of the page (fault-around,
64 KiB): a gather of 128 token rows from BERT-base's 23 MB word-embedding table mapped ~7 MB.
:func:`qbert_edge.runtime.pages.advise_random` sets ``MADV_RANDOM`` on the table's mappings (seen
as ``rr`` in ``/proc/self/smaps`` ``VmFlags``) and drops the table from the page cache, so a fault
maps one page. Tested on a plain mapped file (no onnxruntime: the mechanism, with a control) and
on the ``ort``/``ort-custom`` backends (the table's ranges are the ones advised; the pages a run
maps, against ``random_tables=False``).
"""

from __future__ import annotations

import mmap
import os
import sys

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from qbert_edge.runtime import backends, pages
from qbert_edge.runtime.backends import RuntimeOptions
from qbert_edge.runtime.loader import load_graph
from qbert_edge.runtime.pages import advise_random, ram_filesystem

PAGE = mmap.PAGESIZE
ROWS, COLS, GROUPS = 16384, 64, 256  # an 8-bit table of 1 MiB: rows of 64 bytes, 64 rows per page
IDS = np.arange(0, ROWS, ROWS // 8, dtype=np.int64)  # 8 rows 128 KiB apart: 8 distinct pages, far apart

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fault-around and /proc are Linux")


def _skip_on_ram_fs(folder) -> None:
    if ram_filesystem(folder):  # tmpfs pages cannot leave the page cache: fault-around still maps them
        pytest.skip(f"{folder} is on a RAM filesystem")


def _vmas(path) -> list[dict]:
    """This process's mappings of ``path``: address range, file offset, Rss bytes, VmFlags."""
    st = os.stat(path)
    out, cur = [], None
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):
                cur = None
                major, minor = (int(x, 16) for x in head[3].split(":"))
                if (major, minor, int(head[4])) == (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino):
                    lo, hi = (int(x, 16) for x in head[0].split("-"))
                    cur = {"lo": lo, "hi": hi, "offset": int(head[2], 16), "rss": 0, "flags": []}
                    out.append(cur)
            elif cur is not None and head[0] == "Rss:":
                cur["rss"] = int(head[1]) * 1024
            elif cur is not None and head[0] == "VmFlags:":
                cur["flags"] = head[1:]
    return out


def _over(vmas, offset: int, length: int) -> list[dict]:
    """The mappings covering file bytes ``[offset, offset + length)``."""
    return [v for v in vmas if v["offset"] < offset + length and offset < v["offset"] + v["hi"] - v["lo"]]


def _written(path, data: bytes) -> None:
    """Write and sync: dirty pages cannot leave the page cache (a file written seconds ago)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _warm(path) -> None:
    with open(path, "rb") as fh:
        while fh.read(1 << 20):
            pass


@linux_only
def test_advise_random_maps_one_page_per_fault_and_only_in_its_range(tmp_path):
    _skip_on_ram_fs(tmp_path)
    path = tmp_path / "table.bin"
    _written(path, np.random.default_rng(0).integers(0, 255, 4 << 20, dtype=np.uint8).tobytes())
    _warm(path)  # every page cached: the worst case for fault-around
    with open(path, "rb") as fh:
        m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    a = np.frombuffer(m, np.uint8)
    try:
        half = 2 << 20
        assert advise_random([(path, half, half)]) >= half
        advised = _over(_vmas(path), half, half)
        plain = _over(_vmas(path), 0, half)
        assert advised and all("rr" in v["flags"] for v in advised)
        assert plain and all("rr" not in v["flags"] for v in plain)  # only the range is advised
        for v in plain + advised:
            assert v["rss"] == 0
        step = 128 * 1024
        for at in range(0, half, step):  # 16 reads in each half, 128 KiB apart
            int(a[at]) + int(a[half + at])
        after_plain = sum(v["rss"] for v in _over(_vmas(path), 0, half))
        after_advised = sum(v["rss"] for v in _over(_vmas(path), half, half))
        assert after_advised <= 2 * 16 * PAGE  # one page per read (a fault reads that page alone)
        assert after_plain >= 4 * after_advised  # the control: fault-around mapped 16 pages per read
    finally:
        del a
        m.close()


def test_advise_random_is_a_no_op_where_it_cannot_act(tmp_path, monkeypatch):
    path = tmp_path / "x.bin"
    path.write_bytes(b"\0" * PAGE)
    assert advise_random([]) == 0
    assert advise_random([(tmp_path / "missing.bin", 0, PAGE)]) == 0  # never raises
    assert advise_random([(path, 0, PAGE)]) == 0  # not mapped by this process: nothing to advise
    monkeypatch.setattr(pages.sys, "platform", "darwin")
    assert advise_random([(path, 0, PAGE)]) == 0


def _table_model(path) -> dict:
    """``ids -> QGather (8-bit ROWS x COLS table) -> y``, saved at ``path``; returns the arrays."""
    rng = np.random.default_rng(1)
    w = {"emb.packed": rng.integers(0, 256, (ROWS, COLS), dtype=np.uint8),
         "emb.scales": rng.uniform(0.01, 0.02, GROUPS).astype(np.float32),
         "emb.zero_points": rng.integers(0, 256, GROUPS, dtype=np.uint8)}
    node = helper.make_node("QGather", [*w, "ids"], ["y"], domain="qbert_edge", bits=8, rows=ROWS, cols=COLS,
                            groups=GROUPS, layout="dense-le-v1", version=1)
    graph = helper.make_graph([node], "table", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "n", COLS])],
                              [numpy_helper.from_array(v, k) for k, v in w.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("qbert_edge", 1)])
    model.ir_version = 8
    _written(path, model.SerializeToString())
    return w


def _expected(w: dict, ids: np.ndarray) -> np.ndarray:
    g = ids // (ROWS // GROUPS)
    return (w["emb.packed"][ids].astype(np.float32) - w["emb.zero_points"][g][..., None]) * w["emb.scales"][g][..., None]


@pytest.mark.parametrize("backend", ["ort", "ort-custom"])
def test_backend_advises_exactly_the_gathered_table(tmp_path, monkeypatch, backend):
    if backends.missing_packages(backend):
        pytest.skip(f"{backend} is not installed")
    path = tmp_path / "table.onnx"
    w = _table_model(path)
    calls = []
    monkeypatch.setattr(pages, "advise_random", lambda ranges: calls.append(list(ranges)) or 0)
    graph = load_graph(path)
    table = graph.file_location(graph.weights["emb.packed"])
    b = backends.create(backend, graph, RuntimeOptions(threads=1))
    try:
        y = b.run({"ids": IDS[None]})["y"]
    finally:
        b.close()
    np.testing.assert_allclose(y[0], _expected(w, IDS), rtol=1e-6)
    assert len(calls) == 1
    advised = {(p.resolve(), off, n) for p, off, n in calls[0]}
    assert (path.resolve(), table[1], ROWS * COLS) in advised  # the codes, at their offset in the model file
    b = backends.create(backend, load_graph(path), RuntimeOptions(threads=1, random_tables=False))
    b.close()
    assert len(calls) == 1  # off: not called


@linux_only
def test_ort_run_maps_the_rows_it_reads_not_their_neighbours(tmp_path):
    """Pages of the model file a run maps: one per row read with the advice, ~16 without (fault-around)."""
    if backends.missing_packages("ort"):
        pytest.skip("onnxruntime is not installed")
    _skip_on_ram_fs(tmp_path)
    path = tmp_path / "table.onnx"
    _table_model(path)

    def mapped_by_run(random_tables: bool) -> tuple[int, list[dict]]:
        _warm(path)
        graph = load_graph(path)
        offset = graph.file_location(graph.weights["emb.packed"])[1]
        b = backends.create("ort", graph, RuntimeOptions(threads=1, random_tables=random_tables))
        before = sum(v["rss"] for v in _over(_vmas(path), offset, ROWS * COLS))
        b.run({"ids": IDS[None]})
        vmas = _over(_vmas(path), offset, ROWS * COLS)
        grown = sum(v["rss"] for v in vmas) - before
        b.close()
        del b, graph
        return grown, vmas

    plain, _ = mapped_by_run(False)
    advised, vmas = mapped_by_run(True)
    assert any("rr" in v["flags"] for v in vmas)  # onnxruntime's mapping of the table carries the advice
    assert advised <= 2 * len(IDS) * PAGE
    assert plain >= 4 * len(IDS) * PAGE  # the control shows fault-around (16 pages per row here)


@linux_only
def test_advise_random_falls_back_to_the_path_where_stat_and_maps_disagree(tmp_path, monkeypatch):
    """overlayfs (containers) and btrfs subvolumes show other device/inode numbers in /proc/self/maps."""
    path = tmp_path / "t.bin"
    _written(path, b"\1" * (4 * PAGE))
    real = os.stat(path)
    fake = os.stat_result((real.st_mode, real.st_ino + 12345, real.st_dev, *tuple(real)[3:]))
    with open(path, "rb") as fh:
        m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        monkeypatch.setattr(pages.os, "stat", lambda p, *a, **k: fake if str(p) == str(path) else os.lstat(p))
        assert advise_random([(path, 0, 4 * PAGE)]) == 4 * PAGE
        monkeypatch.undo()
        assert all("rr" in v["flags"] for v in _vmas(path))
    finally:
        m.close()
