"""Replica leaders' rows files in the parts folder (``corpusfile.Parts.write_rows``): rank
0's part lists their digests, reading the part puts the rows back in line order, and a
missing, damaged or incomplete rows file makes the part count as not done."""

from __future__ import annotations

import h5py
import numpy as np

from mpiattn.io import corpusfile


def chunk(tmp_path, replicas=2):
    rng = np.random.default_rng(0)
    lengths = np.array([3, 1, 4, 2, 5])
    ids = [np.arange(n, dtype=np.int64) + 100 for n in lengths]
    pooled = rng.standard_normal((5, 6)).astype(np.float32)
    states = rng.standard_normal((int(lengths.sum()), 4)).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    mine = [[np.array([4, 0]), np.array([2])], [np.array([3, 1])]]  # micro-batches
    parts = corpusfile.Parts.new(tmp_path / "o.h5", "k", {}, 5, 5)
    folder = parts.ready()
    manifest = []
    for replica, batches in enumerate(mine[:replicas]):
        leader = corpusfile.Parts.joined(tmp_path / "o.h5", folder)  # another rank
        results = [(rows, pooled[rows], {(0, "hidden"): np.concatenate(
            [states[offsets[r]:offsets[r + 1]] for r in rows])}) for rows in batches]
        manifest.append(leader.write_rows(0, replica, results))
    parts.write(0, corpusfile.ChunkResult(0, list("abcde"), None, ids, None,
                                          np.zeros(5, bool), None, {}, {},
                                          rows_sha256=manifest))
    return parts, pooled, states


def test_rows_files_read_back_in_line_order(tmp_path):
    parts, pooled, states = chunk(tmp_path)
    part = parts.read(0)
    assert part is not None and parts.done() == 1
    assert np.array_equal(part.arrays["pooled"], pooled)
    assert np.array_equal(part.arrays["layers/00/hidden"], states)
    assert part.texts == {"text": list("abcde")}
    assert parts.size() > parts.path(0).stat().st_size  # the rows files count


def test_a_damaged_or_missing_rows_file_drops_the_chunk(tmp_path):
    parts, _, _ = chunk(tmp_path)
    with h5py.File(parts.rows_path(0, 1), "r+") as f:  # its digest attribute kept
        f["pooled"][0, 0] += 1.0
    assert parts.read(0) is None
    parts.drop_damaged()
    assert parts.done() == 0 and not list(parts.folder.glob("rows-*"))
    parts.remove()
    (tmp_path / "x").mkdir()
    short, _, _ = chunk(tmp_path / "x", replicas=1)  # lines 1 and 3 got no rows file
    assert short.read(0) is None
