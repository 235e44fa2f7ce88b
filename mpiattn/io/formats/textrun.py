"""The text run's own part of the run file (``mpiattn run`` of ``input.text``): after
``io.corpusfile.assemble`` has written the rows (/input, /layers, /output from the parts),
``write_text_run`` adds the run's attributes, the per-rank timings and work counts and the
aggregated checksum records. The reader is ``formats.run.RunFile`` (``ragged`` rows) and
``formats.run.promised`` checks it (``input/offsets`` instead of an attention mask).

Per-rank columns (``RANK_COLUMNS``, the (rank, 14) ``totals``): seconds of the forward,
the setup and the whole job, peak memory, busy and waiting seconds, the lines, tokens and
padded tokens this rank's replica encoded, the records it tokenized, the seconds it
tokenized and exchanged, the bytes of the corpus it read, and the bytes and seconds of its
part of the pre-flight scan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import h5io
from .common import PHASES, finish, write_phase_seconds, write_records

RANK_COLUMNS = ("forward", "setup", "total", "peak_memory", "busy", "wait", "lines", "tokens",
                "padded_tokens", "lines_tokenized", "tokenize", "bytes_read", "scan_bytes",
                "scan")

# (column, group, dataset, units, description): every per-rank dataset but the phases
PER_RANK = (
    ("forward", "timings", "forward", "s", ""),
    ("setup", "timings", "setup", "s", ""),
    ("total", "timings", "total", "s", ""),
    ("busy", "timings", "busy", "s", "seconds in this rank's micro-batches (this session)"),
    ("wait", "timings", "wait", "s", "seconds waiting for the other replicas at chunk ends"),
    ("lines", "work", "lines", "1", "lines this rank's replica encoded (this session)"),
    ("tokens", "work", "tokens", "1", "tokens this rank's replica encoded (this session)"),
    ("padded_tokens", "work", "padded_tokens", "1",
     "padded tokens this rank's replica encoded (this session)"),
    ("lines_tokenized", "work", "lines_tokenized", "1",
     "records this rank tokenized (this session): its 1/N slice of every chunk"),
    ("bytes_read", "work", "bytes_read", "bytes",
     "bytes of input.text this rank read (this session): its part of the pre-flight scan,"
     " then its slices of the chunks (plain text, split by byte ranges) or every chunk"
     " (other formats)"),
    ("scan_bytes", "work", "scan_bytes", "bytes",
     "bytes of input.text this rank read in the pre-flight scan: ~1/N of plain text (two"
     " passes over its byte range, and the tail of its last chunk); the whole file on rank 0"
     " for other formats"),
    ("scan", "timings", "scan", "s",
     "seconds of the pre-flight scan (this rank's byte range, or the whole file on rank 0"
     " for formats that cannot be split), agreement included"),
    ("tokenize", "timings", "tokenize", "s", "seconds tokenizing this rank's slices and"
     " exchanging the chunks' tokens (checked Allgather)"),
    ("peak_memory", "ranks", "peak_memory", "bytes", "peak RSS (CPU) or CuPy pool total (GPU)"),
)
COUNTS = {"peak_memory", "lines", "tokens", "padded_tokens", "lines_tokenized", "bytes_read",
          "scan_bytes"}
NO_RECORDS = "none: every chunk was computed by an earlier session (--resume)"
AGGREGATED = ("one row per (replica, layer, site): the worst ratio, retries summed, passed"
              " only if all passed; 'chunk' holds the number of transfers")


@dataclass
class TextRunData:
    """What a text run adds to the assembled rows, as plain values on rank 0."""

    attrs: dict[str, Any]  # root attributes: lines, tokens, input_format, max_tokens, ...
    pooled_attrs: dict[str, str]  # of /output/pooled: the sentence-transformers modules
    # run and where from, the prompt put before every line (name and text; "" for none)
    seconds: np.ndarray  # (rank, layer, phase) s
    totals: np.ndarray  # (rank, len(RANK_COLUMNS)), columns in ``RANK_COLUMNS`` order
    records: list  # (replica, transfers.Record), one per (replica, layer, site)
    phases: tuple[str, ...] = PHASES


def write_text_run(f: Any, r: TextRunData) -> None:
    """The text run's attributes, /timings, /work, peak memory and records; then
    ``status``. ``f`` holds the assembled rows and the provenance already."""
    f["output/pooled"].attrs.update(r.pooled_attrs)
    f.attrs.update(r.attrs)
    write_phase_seconds(f.require_group("timings"), r.seconds, ("rank", "layer", "phase"),
                        r.phases)
    for column, group, name, units, description in PER_RANK:
        values = r.totals[:, RANK_COLUMNS.index(column)]
        h5io.write_array(f.require_group(group), name,
                         values.astype(np.int64) if column in COUNTS else values, ("rank",),
                         units=units, **({"description": description} if description else {}))
    if r.records:
        write_records(f, r.records)
        f["checksum/collectives"].attrs["aggregated"] = AGGREGATED
    else:  # a resumed run whose chunks were all done before: no transfer this session
        f.attrs["checksum_records"] = NO_RECORDS
    finish(f)
