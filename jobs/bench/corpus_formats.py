"""How fast each corpus format is read: one pre-flight pass (``textstream.scan``: every
record checked, each chunk's digest) over the same sentences in every format.

    python jobs/bench/corpus_formats.py                       # data/corpus/train.txt
    python jobs/bench/corpus_formats.py --corpus other.txt --repeats 5

Writes the corpus as .txt, .txt.gz (level 6), .txt.zst (level 3), .txt.bz2, .jsonl and
.jsonl.gz (fields id, text) and .parquet (columns id, text) in a temporary folder, then
prints a Markdown table: size on disk, the best of ``--repeats`` passes, records per second.
Every rank of a run makes two such passes (pre-flight, then the stream): compare the rate
with the encoding rate of the run (docs/corpus-formats.md). Needs ``mpiattn[corpus]``.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import json
import tempfile
import time
from pathlib import Path

from mpiattn.inputs import textstream
from mpiattn.inputs.records import Spec, open_source

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=str(ROOT / "data/corpus/train.txt"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=4096, help="records per digest (input.chunk)")
    args = ap.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    lines = [line.strip() for line in Path(args.corpus).read_text(encoding="utf-8")
             .removesuffix("\n").split("\n")]
    text = ("\n".join(lines) + "\n").encode()
    records = "".join(json.dumps({"id": i, "text": line}) + "\n"
                      for i, line in enumerate(lines)).encode()
    files = {"txt": text, "txt.gz": gzip.compress(text, 6),
             "txt.zst": zstandard.ZstdCompressor(level=3).compress(text),
             "txt.bz2": bz2.compress(text), "jsonl": records,
             "jsonl.gz": gzip.compress(records, 6)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, data in files.items():
            (folder / f"c.{name}").write_bytes(data)
        pq.write_table(pa.table({"id": list(range(len(lines))), "text": lines}),
                       folder / "c.parquet")
        print(f"{len(lines)} records, {len(text) / 2**20:.2f} MiB of text; best of"
              f" {args.repeats} passes\n")
        print("| format | on disk | one pass | records/s |\n|---|---|---|---|")
        for name in [*files, "parquet"]:
            path = folder / f"c.{name}"
            spec = Spec(id_field="" if name.startswith("txt") else "id")
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                info = textstream.scan(path, spec=open_source(path, spec), chunk=args.chunk)
                best = min(best, time.perf_counter() - t0)
            assert info.lines == len(lines), (name, info.lines)
            print(f"| `.{name}` | {path.stat().st_size / 2**20:.2f} MiB | {best * 1e3:.0f} ms"
                  f" | {len(lines) / best / 1e3:.0f} k |")


if __name__ == "__main__":
    main()
