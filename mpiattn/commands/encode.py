"""``mpiattn run`` on a text corpus: every line encoded by the head-sharded encoder, streamed.

    mpiexec -n 4 mpiattn run jobs/configs/minilm.toml --set input.text='"corpus.txt"' -o c.h5

The pre-flight scan is split: each of N ranks checks about 1/N of an uncompressed plain-text
or JSON Lines file's bytes (``byteranges``; compressed streams and Parquet are scanned by
rank 0), and afterwards rank r reads and tokenizes only its 1/N slice of each chunk (no
padding, truncated at the model's own limit); one checked Allgather gives every rank the
chunk's tokens, and rank 0 receives the records and checks them against the scan's digest.
The chunk is cut into length-sorted micro-batches of ``input.batch`` sentences, and the
micro-batches are assigned to the data-parallel replicas by estimated cost
(``parallel.assign``; ``textstream.assign``). Each replica's head group runs its
micro-batches through the encoder exactly as a one-batch run does (checked Allreduces,
finite checks). The replica leaders send their rows to rank 0, which puts them back in line
order and writes the chunk as a part (``corpusfile``); at the end the parts become the
output file. Memory per rank is bounded by the chunk, never by the number of lines; a killed
job continues with ``--resume``.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..core.backend import erf, to_host
from ..core.model import PhaseTimer, encoder_forward
from ..core.pipeline import PHASES as PIPELINE_PHASES
from ..core.pipeline import stage_forward, stage_layers
from ..core.pooling import Pipeline
from ..core.shard import partition
from ..errors import ConfigError, InputError, IntegrityError, UserError
from ..inputs.byteranges import read_records, splittable
from ..inputs.data import Batch, tokenizer_path
from ..inputs.records import Source, Spec, open_source
from ..inputs.textstream import (
    InputChanged,
    SentenceTokenizer,
    TextInfo,
    Tokens,
    assign,
    batch_cost,
    checked_chunks,
    chunk_digest,
    input_changed,
    join_tokens,
    lower_cases,
    model_max_length,
    pack_tokens,
    scan,
    sorted_batches,
)
from ..io.corpusfile import (
    ChunkResult,
    FolderSwapped,
    Parts,
    assemble,
    check_space,
    disk_file,
    job_key,
    kill_point,
)
from ..io.formats.common import PHASES
from ..io.formats.textrun import RANK_COLUMNS, TextRunData, write_text_run
from ..io.outfile import OutputExists
from ..parallel import watchdog
from ..parallel.faults import FaultyPhases, check_fault_targets, crash_points, slowdown
from ..version import __version__
from . import epilogue, jobkit
from .placement import (
    RUN_SITES,
    Placement,
    attention_options,
    check_sequence,
    finish_config,
    load_shards,
    make_p2p,
    make_reducer,
    place,
)

TYPE_CHECKING = False  # type checkers take it as True
if TYPE_CHECKING:
    from mpi4py import MPI


def truncation(cfg: Config) -> tuple[int, str]:
    """(tokens, source) of the text truncation: input.max_tokens, else the model's own."""
    if cfg.input.max_tokens:
        return cfg.input.max_tokens, "input.max_tokens"
    from ..io.weights import model_folder

    folder = model_folder(cfg.model.weights) if cfg.model.weights else None
    return model_max_length(folder, cfg.model.max_positions)


CHUNK_LINES = 4096  # sorting 4096 lines leaves 1.9% padding on data/corpus (1024: 6.8%)
CHUNK_STATES_BYTES = 200 * 2**20  # auto chunk: rank 0's per-token states of one chunk


def auto_chunk(cfg: Config, tokens_per_line: float = 32.0) -> int:
    """``input.chunk = 0``: 4096 lines, fewer when per-token states are kept, so that rank
    0's states of one chunk stay near 200 MiB at ``tokens_per_line`` (never below 128)."""
    kept = {"all": cfg.model.layers, "last": 1, "none": 0}[cfg.output.layers]
    if not kept:
        return CHUNK_LINES
    per_line = 2 * kept * tokens_per_line * cfg.model.hidden * np.dtype(cfg.dtype).itemsize
    return int(min(CHUNK_LINES, max(128, CHUNK_STATES_BYTES // per_line)))


def corpus_source(cfg: Config) -> Source:
    """``input.text`` recognised as ``input.format`` says (``records.open_source``); an
    explicit ``input.field`` on a file read as plain text is a ConfigError."""
    i = cfg.input
    source = open_source(Path(i.text), Spec.of(i))
    if source.format == "text" and "input.field" in cfg.explicit:
        how = "input.format = \"text\"" if i.format == "text" else "its name and bytes"
        raise ConfigError(f"input.field = '{i.field}' but input.text = '{i.text}' is read as"
                          f" plain text ({how}), which has no fields: set input.format ="
                          " \"jsonl\" or \"parquet\", or remove input.field")
    return source


def check_inputs(cfg: Config, world_size: int, rank: int) -> tuple[tuple, dict]:
    """Every local check of a text run, no collective: ((the finished config's derived
    values, info, tokenizer, source, digests, sentence pipeline), digests)."""
    from ..io.stmodules import sentence_pipeline
    from ..io.weights import model_folder

    finished = finish_config(cfg, world_size, "run", RUN_SITES)
    tensor = finished.tensor
    pipe = sentence_pipeline(cfg.model.weights, cfg.model.hidden, cfg.input.prompt)
    if cfg.output.head_stats or cfg.output.attention_maps:
        key = "output.head_stats" if cfg.output.head_stats else "output.attention_maps"
        raise ConfigError(f"{key} is not yet supported with text input (input.text): per-head"
                          " statistics and maps are written for seeded or HDF5 token input"
                          " (input.tokens); remove the key for a text run")
    check_sequence(cfg, tensor, cfg.input.seq_len)  # refuses text with parallel.sequence > 1
    if not cfg.input.chunk:  # resolved before the config is digested (resume finds it)
        cfg.input.chunk = auto_chunk(cfg)
    source = corpus_source(cfg)
    limit, _ = truncation(cfg)
    folder = model_folder(cfg.model.weights) if cfg.model.weights else None
    tok = SentenceTokenizer(tokenizer_path(cfg), limit, cfg.model.vocab, cfg.model.type_vocab,
                            pipe.prompt, lower_cases(folder))
    pipe.set_prompt_length(tok.prompt_length)  # include_prompt = false pools after it
    if cfg.input.pairs and 0 < cfg.input.max_tokens < 3:
        raise ConfigError(f"input.max_tokens = {cfg.input.max_tokens} with input.pairs: a pair"
                          " needs at least 3 tokens ([CLS] a [SEP] b [SEP]'s specials)")
    if cfg.input.pairs and cfg.model.type_vocab < 2:
        raise ConfigError(f"input.pairs = true needs segment ids 0 and 1, but the model's type"
                          f" vocabulary holds {cfg.model.type_vocab} (model.type_vocab)")
    check_fault_targets(cfg, world_size)
    digests = jobkit.input_digests(cfg, skip=("input.text",) if splittable(source) else ())
    return (finished, tok, source, digests, pipe), digests


def _swept(checked: tuple, cfg: Config, out_path: str, rank: int) -> tuple:
    """``checked`` (``check_inputs``'s result), after rank 0 removed the parts folder
    that a kill after publishing ``out_path`` left behind (with a note): the one the
    complete output names (its job key, folder and secret; the output's key, as a split
    scan's corpus digest joins this job's key only after the pre-flight)."""
    from ..io.corpusfile import remove_published

    if rank == 0 and out_path:
        for note in remove_published(Path(out_path)):
            print(f"mpiattn: note: {note}", flush=True)
    return checked


def scan_corpus(world: Any, source: Source, chunk: int) -> TextInfo:
    """The pre-flight scan of the corpus, agreed by every rank (after ``check_inputs``).

    Uncompressed plain text and uncompressed JSON Lines (``byteranges.splittable``) are
    split by byte ranges: each rank counts the lines of its range (and, for JSON Lines with
    ``input.id_field``, parses line 1 for the kind of every id: ``byteranges.first_id_kind``),
    an exclusive scan of the counts numbers them, each rank checks its range's lines and
    keeps the digests of the chunks that start in it and the offsets of the slice starts in
    it; one allgather combines the digests (every rank has every chunk's), one alltoall
    sends each rank the offsets of its own slices' bounds, and this rank keeps the byte
    range of its slice of every chunk (``TextInfo.slices``: (start, end) bytes per chunk);
    ``TextInfo.scan_bytes`` counts the bytes this rank read (digest pieces, both passes,
    line 1). Other formats (gzip, bzip2, zstd, Parquet) are scanned whole by rank 0 and its
    result shared (``scan_bytes``: the file's size on rank 0, 0 elsewhere).
    The first bad record in the file (the lowest rank's error) is raised on every rank with
    its global line number, exactly as a one-rank scan words it; the chunk digests and the
    ids' kind are the one-rank scan's (``textstream.scan``). Raises InputError (agreed):
    a bad record, an empty file, ranks whose copies differ in size or content.
    """
    from dataclasses import replace

    from ..inputs import byteranges as br

    rank, ranks = world.Get_rank(), world.Get_size()
    if not br.splittable(source):
        info = _scan_agreed(world, lambda: scan(source.path, spec=source, chunk=chunk)
                            if rank == 0 else None)[0]
        return replace(info, scan_bytes=info.size if rank == 0 else 0)
    digest, hashed = corpus_digest(world, source)

    def count() -> tuple[int, int, int, int, int, str]:
        try:
            size = source.path.stat().st_size
            with open(source.path, "rb") as fh:
                a, b = br.range_of(fh, size, rank, ranks)
                lines, nbytes = br.count_lines(fh, a, b, size)
        except OSError as err:
            raise InputError(f"{source.where}: cannot be read ({err.strerror})") from None
        kind, first_bytes = br.first_id_kind(source, size)  # JSON Lines ids: line 1's kind
        return size, a, b, lines, nbytes + first_bytes, kind

    counted = _scan_agreed(world, count)
    size, a, b, lines, nbytes, kind = counted[rank]
    sizes = {c[0] for c in counted}
    if len(sizes) > 1:
        groups = ", ".join(f"rank {r}: {c[0]} bytes" for r, c in enumerate(counted))
        raise _agreed_error(InputError(f"ranks differ in the size of {source.where} ({groups}):"
                                       " a stale or node-local copy? Give every rank the same"
                                       " file"))
    total = sum(c[3] for c in counted)
    if total == 0:  # (in the one-rank scan's words)
        what = "sentence" if source.format == "text" else "JSON object"
        raise _agreed_error(InputError(f"{source.where}: the file is empty (one {what} per"
                                       " line)"))
    first = sum(c[3] for c in counted[:rank])  # the exclusive scan of the line counts
    mine: list[br.Part] = []

    def check() -> tuple[dict[int, str], int]:
        mine.append(br.scan_part(source, size, a, b, first, lines, total, chunk, ranks,
                                 kind))
        return mine[0].digests, mine[0].bytes_read

    found = _scan_agreed(world, check)
    digests: dict[int, str] = {}
    for part_digests, _ in found:
        digests.update(part_digests)
    chunks = -(-total // chunk)
    if len(digests) != chunks:  # every chunk starts in exactly one range
        raise RuntimeError(f"split scan: {len(digests)} chunk digests for {chunks} chunks")
    # each rank receives only the offsets of its own slices' bounds (2 per chunk), from the
    # ranks whose ranges hold them: memory O(chunks) per rank, not O(chunks x N)
    send: list[dict[int, int]] = [{} for _ in range(ranks)]
    lo, hi = first, first + lines
    for k in range(max(0, lo // chunk - 1), min(-(-total // chunk), -(-hi // chunk) + 1)):
        # (the chunks around this range too: a slice bound at ``lo`` may end the chunk before)
        start = k * chunk
        for q in range(ranks):
            count_q, at_q = partition(min(chunk, total - start), ranks, q)
            for t in (start + at_q, start + at_q + count_q):
                if lo <= t < hi:
                    send[q][t] = mine[0].offsets[t]
    offsets: dict[int, int] = {total: size}
    for received in world.alltoall(send):
        offsets.update(received)
    slices = []
    for k in range(chunks):
        start = k * chunk
        count_k, at = partition(min(chunk, total - start), ranks, rank)
        slices.append((offsets[start + at], offsets[start + at + count_k]))
    return TextInfo(total, size, kind, tuple(digests[k] for k in range(chunks)), source.label,
                    source.unit, tuple(slices), nbytes + found[rank][1] + hashed, digest)


def corpus_digest(world: MPI.Comm, source: Source) -> tuple[str, int]:
    """Collective: the digest of a corpus split by byte ranges (``byteranges.piece_digest``),
    its pieces hashed in turn by the ranks that see the same file (host, device, inode): on one
    node a shared corpus is read once in all, split over its ranks, and every node-local
    (or ``-wdir``-relative) copy once. Ranks whose copies differ are one line, the
    pre-flight's (``jobkit``: "ranks differ in input.text ..."), before any scan. Returns
    (digest, bytes this rank read)."""
    import socket

    from ..inputs import byteranges as br
    from ..io.weights import describe

    rank = world.Get_rank()

    def identity() -> tuple[str, int, int, int]:
        try:
            st = source.path.stat()
        except OSError as err:
            raise InputError(f"{source.where}: cannot be read ({err.strerror})") from None
        return socket.gethostname(), st.st_dev, st.st_ino, st.st_size

    keys = _scan_agreed(world, identity)
    sharing = [r for r, key in enumerate(keys) if key == keys[rank]]  # one copy's readers
    size = keys[rank][3]
    mine = range(sharing.index(rank), br.pieces_of(size), len(sharing))
    found = _scan_agreed(world, lambda: br.hash_pieces(source.path, size, mine))
    label = f"input.text '{describe(source.path)}'"
    per_rank = []
    for key in keys:
        pieces: dict[int, str] = {}
        for r, other in enumerate(keys):
            if other == key:
                pieces.update(found[r])
        per_rank.append({label: br.piece_digest(pieces, key[3])})
    err = jobkit.disagreement(per_rank)
    if err is not None:
        raise err
    return per_rank[rank][label], br.piece_bytes(size, mine)


def _agreed_error(err: UserError) -> UserError:
    err.agreed = True
    return err


def _scan_agreed(world: Any, step: Any) -> list:
    """``step()`` on every rank, then one allgather: the first error in rank order raised on
    every rank with its own words (no rank prefix: a bad line names its global number), else
    every rank's result."""
    try:
        value, error = step(), None
    except UserError as err:
        value, error = None, (type(err), str(err))
    watchdog.at(during="scanning the corpus")
    try:
        gathered = world.allgather((error, value))
    finally:
        watchdog.at(during=None)
    for error, _ in gathered:
        if error is not None:
            raise _agreed_error(error[0](error[1]))
    return [v for _, v in gathered]


def _open_parts(cfg: Config, out: Any, info: TextInfo, key: str, layout: dict,
                resume: str | None) -> Parts:
    if resume is None:
        return Parts.new(out.path, key, layout, info.lines, cfg.input.chunk)
    return Parts.find(out.path, key, layout, None if resume == "auto" else resume,
                      records=info.chunk_digests)


def run_text(cfg: Config, world: MPI.Comm, out_path: str, force: bool,
             resume: str | None = None) -> Path | None:
    """The whole streamed job on every rank; returns the output path on rank 0.
    ``resume``: None (start afresh), "auto" (the interrupted run of this job beside the
    output) or a parts folder."""
    started = dt.datetime.now(dt.UTC)
    wall0 = time.perf_counter()
    rank = world.Get_rank()
    (finished, tok, source, digests, pipe), out = jobkit.preflight(
        world, lambda: _swept(check_inputs(cfg, world.Get_size(), rank), cfg, out_path, rank),
        output=(out_path, force))
    jobkit.set_timeout(cfg.comm.timeout)
    t_scan = time.perf_counter()
    try:
        info = scan_corpus(world, source, cfg.input.chunk)
        scan_s = time.perf_counter() - t_scan
    except UserError:
        if out is not None:
            out.discard()
        raise
    if info.slices:  # the corpus's digest, read once per distinct file (``corpus_digest``)
        from ..io.formats.common import record_inputs
        from ..io.weights import describe

        digests[f"input.text '{describe(Path(cfg.input.text))}'"] = info.sha256
        record_inputs(digests)
    if rank == 0 and "input.seq_len" in cfg.explicit and not cfg.input.max_tokens:
        limit, origin = truncation(cfg)  # (not ``source``: the corpus is passed on below)
        print(f"mpiattn: note: input.seq_len is the length of seeded input; text is cut at"
              f" {limit} tokens ({origin}): set input.max_tokens to change that", flush=True)
    parts = None
    try:
        key = job_key(cfg.to_toml(), digests)
        layout = {"world_size": world.Get_size(), "tensor": finished.tensor,
                  "pipeline": cfg.parallel.pipeline}  # what fixes the rows' exact bits
        parts = jobkit.agreed(world, lambda: _open_parts(cfg, out, info, key, layout, resume)
                              if rank == 0 else None, during="opening the parts folder")
        dog = watchdog.current()
        if dog is not None and parts is not None:  # a signal keeps the finished chunks
            dog.kept = lambda: _kept_note(parts, info.lines, cfg.input.chunk, info.unit)
        first_chunk = world.bcast(parts.done() if rank == 0 else None, root=0)
        limit = tok.max_length
        rows = min(cfg.input.batch, cfg.input.chunk, info.lines)  # no micro-batch is larger
        shape = Batch(np.zeros((rows, limit), dtype=np.int64),  # (a huge input.batch on a
                      np.ones((rows, limit), dtype=bool))  # small corpus ran out of memory)
        p = place(cfg, world, finished, shape)
        job = _Job(cfg, world, p, tok, info, parts, source, pipe)
        job.scan_s = scan_s
        job.encode(first_chunk)
        return job.finish(out, started, wall0)
    except (InputChanged, OutputExists):
        if parts is not None:  # chunks of another file, or another job published the
            parts.remove()     # output: never resumable
        raise
    except FolderSwapped:  # what is under the name is not ours: neither removed nor offered
        if parts is not None:
            parts.detach()
        raise
    finally:
        if out is not None:
            out.discard()
        if parts is not None:
            _leave_parts(parts, info.lines, cfg.input.chunk, info.unit)


def _kept_note(parts: Parts, lines: int, chunk: int, unit: str = "line") -> str | None:
    """What a stopped job leaves: its finished chunks, kept for --resume (None: none)."""
    done = parts.done()
    if done == 0:
        return None
    return (f"{min(done * chunk, lines)} of {lines} {unit}s are done and kept in"
            f" '{parts.folder}': run the same command with --resume to continue")


def _leave_parts(parts: Parts, lines: int, chunk: int, unit: str = "line") -> None:
    """After a failure: keep finished chunks for --resume (and say so), else remove."""
    note = _kept_note(parts, lines, chunk, unit)
    if note is None:
        parts.remove()
        return
    parts.release()
    print(f"mpiattn: note: {note}", flush=True)


class _Job:
    """The streamed encoding on one rank (built after the pre-flight agreed)."""

    def __init__(self, cfg: Config, world: MPI.Comm, p: Placement, tok: SentenceTokenizer,
                 info: TextInfo, parts: Parts | None, source: Source,
                 pipe: Pipeline) -> None:
        self.cfg, self.world, self.p, self.tok, self.info = cfg, world, p, tok, info
        self.source, self.units = source, f"{info.unit}s"
        self.pipe, self.width = pipe, pipe.width(cfg.model.hidden)  # the pooled rows
        self.parts = parts  # rank 0 only
        self.rank = world.Get_rank()
        grid = p.grid
        self.leader = grid.coord("tensor") == 0
        self.replicas, self.replica = grid.axis_size("data"), grid.coord("data")
        self.stages, self.stage = grid.axis_size("pipeline"), grid.coord("pipeline")
        self.head_comm = grid.comm("tensor")
        self.kept = {"all": list(range(cfg.model.layers)), "last": [cfg.model.layers - 1],
                     "none": []}[cfg.output.layers]
        self.phases = PHASES + (PIPELINE_PHASES if self.stages > 1 else ())
        self.timer = PhaseTimer(p.backend.timer(), self.phases)
        crashes, slow = crash_points(cfg, self.rank), slowdown(cfg, self.rank)
        self.phase = (FaultyPhases(self.timer, crashes, self.rank, slow)
                      if crashes or slow > 1 else self.timer)
        self.reducer = make_reducer(cfg, p)
        self.records: dict[tuple[int, str], list] = {}  # (layer, site) -> aggregate
        self.busy = self.wait = 0.0  # seconds computing, seconds waiting for other replicas
        self.lines = self.tokens = self.padded = 0  # this replica's work
        self.tokenized, self.tokenize_s = 0, 0.0  # this rank's share of the tokenizing
        self.read_bytes = 0  # bytes of input.text read after the scan
        self.scan_s = 0.0  # seconds of this rank's part of the pre-flight scan
        self.gather_tokens: Any = None  # the checked Allgather of the chunks' tokens
        t0 = time.perf_counter()
        erf(p.backend.xp.zeros(1, dtype=np.dtype(cfg.dtype)))  # the erf kernel, outside timings
        self.my_layers = stage_layers(cfg.model.layers, self.stages, self.stage)
        self.emb, self.layers = load_shards(cfg, p, world, self.my_layers)
        self.p2p = make_p2p(cfg, p) if self.stages > 1 else None
        p.backend.sync()  # weights on the device count as setup
        self.setup_s = time.perf_counter() - t0

    # --- one micro-batch ----------------------------------------------------------------

    def _forward(self, ids: np.ndarray, mask: np.ndarray, types: np.ndarray | None
                 ) -> tuple[np.ndarray | None, dict[tuple[int, str], np.ndarray]]:
        """Pooled rows (None but on the last pipeline stage) and the kept states of this
        stage's layers for real tokens (row-major), on host."""
        cfg, xp = self.cfg, self.p.backend.xp
        d_mask = xp.asarray(mask)
        pieces: dict[tuple[int, str], list[np.ndarray]] = {}

        def on_layer(i: int, rows: slice, attn: Any, hidden: Any) -> None:
            from ..parallel.comm import check_finite

            if cfg.check.finite != "off":
                check_finite(self.head_comm, i, attention=attn, mlp=hidden)  # one read
            if cfg.checksum.mode == "abft" and cfg.checksum.hash_every == "layer":
                self.reducer.check_agreement(hidden, site="hidden", layer=i)
            if self.leader and i in self.kept:  # micro-batches come in row order
                pieces.setdefault((i, "attention"), []).append(to_host(attn[d_mask[rows]]))
                pieces.setdefault((i, "hidden"), []).append(to_host(hidden[d_mask[rows]]))

        d_ids, d_types = xp.asarray(ids), None if types is None else xp.asarray(types)
        eps, options = cfg.model.layer_norm_eps, attention_options(cfg, self.p)
        if self.stages == 1:
            hidden = encoder_forward(d_ids, d_mask, self.emb, self.layers, self.reducer, eps,
                                     self.phase, lambda i, a, h: on_layer(i, slice(None), a, h),
                                     options, cfg.parallel.overlap, d_types)
        else:  # GPipe fill and drain over this micro-batch's rows (pipeline.stage_forward)
            finals = stage_forward(d_ids, d_mask, d_types, self.emb,
                                   dict(zip(self.my_layers, self.layers, strict=True)),
                                   self.reducer, eps, self.stage, self.stages, self.p2p,
                                   cfg.parallel.microbatches, self.phase, on_layer, options,
                                   cfg.parallel.overlap)
            hidden = xp.concatenate([h for _, h in finals]) if finals else None
        states = {key: np.concatenate(parts) for key, parts in pieces.items()}
        if hidden is None:
            return None, states
        if cfg.checksum.mode == "abft" and cfg.checksum.hash_every == "end":
            self.reducer.check_agreement(hidden, site="hidden", layer=cfg.model.layers - 1)
        return to_host(self.pipe(hidden, d_mask)), states

    def _drain_records(self) -> None:
        """Fold the reducer's (and the pipeline messages') records into one aggregate per
        (layer, site): memory stays bounded however many micro-batches run."""
        received = self.p2p.records if self.p2p is not None else []
        for r in [*self.reducer.records, *received]:
            agg = self.records.setdefault((r.layer, r.site), [0, 0.0, 0.0, 0.0, True, 0, 0])
            agg[0] += 1
            if r.ratio >= agg[3]:
                agg[1], agg[2], agg[3] = r.residual, r.bound, r.ratio
            agg[4] = agg[4] and r.passed
            agg[5] += r.retries
            agg[6] = r.digest or agg[6]
        self.reducer.records.clear()
        if self.p2p is not None:
            self.p2p.records.clear()

    # --- the stream ---------------------------------------------------------------------

    def _rows_folder(self) -> None:
        """With several replicas, each replica leader writes its own rows of every chunk
        into the parts folder (``Parts.write_rows``): rank 0 makes the folder first (agreed)
        and every rank learns its path; rank 0's part of a chunk then lists the rows files'
        digests instead of holding the rows."""
        self.rows_parts: Parts | None = None
        if self.replicas == 1:
            return
        folder = jobkit.agreed(self.world, lambda: str(self.parts.ready())
                               if self.rank == 0 else None, during="making the parts folder")
        folder = self.world.bcast(folder, root=0)
        if self.leader and self.stage == 0:
            self.rows_parts = self.parts if self.rank == 0 else Parts.joined(
                Path(folder), Path(folder))

    def encode(self, first_chunk: int) -> None:
        from .progress import Progress

        self._rows_folder()
        size = self.cfg.input.chunk
        start = min(first_chunk * size, self.info.lines)
        self.world.Barrier()
        clock = self.timer.timer  # CuPy: CUDA events (the forward's ends, each chunk's busy)
        t_fwd = clock.mark()
        with Progress(self.info.lines, self.units, start=start, verbose=self.rank == 0,
                      fields={"tok/s": 0.0}) as bar:
            if start:
                bar.note(f"mpiattn: resuming: {start} of {self.info.lines} {self.units}"
                         " were done")
            # tokens shown: rank 0's micro-batches times the replicas, then the chunk's own
            self.tokens_done = self.tokens_estimated = 0
            self.t0 = time.perf_counter()
            chunks = (((k, k * size, None, None, self.info.chunk_digests[k])
                       for k in range(first_chunk, len(self.info.slices)))
                      if self.info.slices else  # each rank reads its slices (_tokenize)
                      self._read_by_rank0(first_chunk))
            for index, first, items, record_ids, records_digest in chunks:
                self._chunk(index, first, items, record_ids, records_digest, bar)
        self.forward_s = clock.between(t_fwd, clock.mark())

    def _read_by_rank0(self, first_chunk: int) -> Iterator[tuple]:
        """The chunks of a stream that cannot be entered at a byte offset (gzip, bzip2,
        zstd, Parquet): rank 0 reads each one, checked against its scan
        (``checked_chunks``), and hands each rank its slice (``_tokenize``); the other ranks
        read nothing. Rank 0's error (the input changed since the scan) is agreed before
        the chunk's collectives. Yields what ``checked_chunks`` does, with ``items`` and
        ``ids`` None on the other ranks."""
        size, digests = self.cfg.input.chunk, self.info.chunk_digests
        reader = (checked_chunks(self.source, size, self.info, first_chunk)
                  if self.rank == 0 else None)

        def pull() -> tuple | None:
            try:
                return next(reader, None) if reader is not None else None
            except OSError as err:
                raise InputError(f"{self.source.where}: cannot be read"
                                 f" ({err.strerror or err})") from None

        for k in range(first_chunk, len(digests)):
            chunk = jobkit.agreed(self.world, pull, during=f"reading chunk {k}")
            yield chunk if chunk is not None else (k, k * size, None, None, digests[k])
        jobkit.agreed(self.world, pull, during="reading the end of the input")  # no more

    def _chunk(self, index: int, first: int, items: list | None, record_ids: list | None,
               records_digest: str, bar: Any) -> None:
        """Encode one chunk on every rank; rank 0 writes it. ``bar`` (rank 0's progress)
        moves with rank 0's micro-batches, by their share of the chunk. ``items`` is None
        when each rank reads its own slice (a split scan: rank 0 then receives them), and
        on the ranks other than 0 for the other formats (rank 0 hands out the slices)."""
        cfg = self.cfg
        toks, items, record_ids = self._tokenize(items, record_ids, first, index)
        lengths = toks.lengths
        batches = sorted_batches(lengths, cfg.input.batch)
        costs = [batch_cost(b, lengths, cfg.model.hidden) for b in batches]
        mine = assign(costs, self.replicas, cfg.parallel.assign)[self.replica]
        results = []
        clock = self.timer.timer
        t0 = clock.mark()
        n, mine_lines = len(lengths), sum(len(batches[j]) for j in mine)
        shown = 0  # lines of this chunk the progress shows so far
        for j in mine:
            rows = batches[j]
            ids, mask, types = toks.padded(rows)
            pooled, states = self._forward(ids, mask, types if cfg.input.pairs else None)
            results.append((rows, pooled, states))
            self.lines += len(rows)
            self.tokens += int(mask.sum())
            self.padded += mask.size
            step = min(n - shown, round(len(rows) * n / max(mine_lines, 1)))
            shown += step
            self._progress(bar, step, int(mask.sum()) * self.replicas)
        busy = clock.between(t0, clock.mark())  # queued kernels are computing time too
        self.busy += busy
        self._drain_records()
        t1 = time.perf_counter()
        if self.leader and self.stages > 1:  # each stage's layers, the last one's pooling
            parts = self.p.grid.comm("pipeline").gather(results, root=0)
            if self.stage == 0:
                results = [(rows, parts[-1][k][1],
                            {key: a for part in parts for key, a in part[k][2].items()})
                           for k, (rows, _, _) in enumerate(results)]
        if self.leader and self.stage == 0:  # one copy of each replica's rows to rank 0
            if self.rows_parts is not None:  # or the replica writes them, rank 0 checks
                written, failure = "", None
                try:
                    written = self.rows_parts.write_rows(index, self.replica, results)
                except UserError as err:
                    failure = str(err)
                payload = (busy, [rows for rows, _, _ in results], written, failure)
            else:
                payload = (busy, results, _digest(results))
            gathered = self.p.grid.comm("data").gather(payload, root=0)
        self.wait += time.perf_counter() - t1
        error = None
        if self.rank == 0:
            try:
                self._write(index, first, items, record_ids, records_digest, toks,
                            gathered)
            except OSError as err:
                error = UserError(f"cannot write chunk {index} to '{self.parts.folder}':"
                                  f" {err.strerror or err}")
            except (UserError, IntegrityError) as err:
                error = err
        # rank 0's write is agreed before the next chunk's collectives
        failed = self.world.bcast(None if error is None else (type(error), str(error)), root=0)
        if failed is not None:
            kind, text = failed
            err = error if error is not None else (
                kind(text, self.world) if issubclass(kind, IntegrityError) else kind(text))
            if isinstance(err, IntegrityError):
                err.comm = self.world
            else:
                err.agreed = True
            raise err
        self.tokens_done += int(lengths.sum()) - self.tokens_estimated
        self.tokens_estimated = 0
        self._progress(bar, n - shown, 0)

    def _read_slice(self, first: int, index: int, count: int, start: int
                    ) -> tuple[list, list | None]:
        """This rank's ``count`` records of chunk ``index`` (from line index
        ``first + start``) read at the byte range the scan found: (items, ids or None);
        InputChanged when the file's size or the slice's line count is no longer what the
        scan saw."""
        try:
            now = self.source.path.stat().st_size
        except OSError as err:
            raise InputError(f"{self.source.where}: cannot be read ({err.strerror})") from None
        if now != self.info.size:
            raise input_changed(self.source, f"{now} bytes instead of the {self.info.size}")
        items, ids, nbytes = read_records(self.source, *self.info.slices[index],
                                          first + start, self.info.ids)
        self.read_bytes += nbytes
        if len(items) != count:
            raise input_changed(self.source, f"other {self.units} {first + start + 1}-"
                                f"{first + start + count} (chunk {index}) than")
        return items, ids

    def _tokenize(self, items: list | None, record_ids: list | None, first: int, index: int
                  ) -> tuple[Tokens, list | None, list | None]:
        """The chunk's tokens on every rank, each rank tokenizing 1/N of its records, and
        the chunk's items and ids on rank 0 (split files: each rank read its slice and rank 0
        gathers them; other formats: rank 0 read the chunk and scatters the slices).

        Rank r tokenizes the r-th of N consecutive slices (``shard.partition``), then one
        checked Allgather (``transfers.CheckedAllgather``, site ``tokens``, each block's
        digest verified on arrival) gives every rank the whole chunk: lengths for the
        length sort and the cost-balanced assignment, ids for its micro-batches, all of it
        for rank 0's part. A record the tokenizer refuses (an id beyond the vocabulary) is
        agreed by all ranks before the exchange, so the job ends with one line, no hang.
        """
        from ..parallel.transfers import CheckedAllgather, RetryPolicy

        size, rank = self.world.Get_size(), self.world.Get_rank()
        split = bool(self.info.slices)
        n = min(self.cfg.input.chunk, self.info.lines - first)
        count, start = partition(n, size, rank)
        t0 = time.perf_counter()
        mine, mine_ids = None, None
        if not split:  # rank 0 read the chunk: one scatter hands each rank its slice
            mine = self.world.scatter([items[a:a + c] for c, a in (
                partition(n, size, q) for q in range(size))] if rank == 0 else None, root=0)
        try:
            if split:
                mine, mine_ids = self._read_slice(first, index, count, start)
            local, error = self.tok.encode(mine, first + start, unit=self.info.unit), None
        except UserError as err:
            local, error = None, err
        jobkit.raise_first(self.world.allgather(
            None if error is None else (type(error), str(error))))
        if split:  # rank 0 writes the records: checked against the scan's digest
            parts = self.world.gather((mine, mine_ids), root=0)
            if parts is not None:
                items = [item for part, _ in parts for item in part]
                record_ids = (None if parts[0][1] is None else
                              [rid for _, ids in parts for rid in ids])
        packed = pack_tokens(local)
        sizes = np.empty(size, dtype=np.int64)
        self.world.Allgather(np.array([packed.size], dtype=np.int64), sizes)
        block = np.zeros(int(sizes.max()), dtype=np.int64)
        block[:packed.size] = packed
        if self.gather_tokens is None:
            cs = self.cfg.checksum
            self.gather_tokens = CheckedAllgather(
                self.world, RetryPolicy(cs.on_mismatch, cs.retries),
                group_ranks=list(range(size)))
        blocks = self.gather_tokens(block, site="tokens", layer=index)
        self.tokenized += count
        self.tokenize_s += time.perf_counter() - t0
        return join_tokens(list(blocks)), items, record_ids

    def _progress(self, bar: Any, lines: int, tokens_estimate: int) -> None:
        self.tokens_estimated += tokens_estimate
        self.tokens_done += tokens_estimate
        rate = self.tokens_done / max(time.perf_counter() - self.t0, 1e-9)
        bar.update(lines, **{"tok/s": rate})

    def _write(self, index: int, first: int, items: list, record_ids: list | None,
               records_digest: str, toks: Any, gathered: list) -> None:
        cfg, n = self.cfg, len(items)
        if self.info.slices and chunk_digest(items, record_ids) != records_digest:
            raise input_changed(self.source, f"other {self.units} {first + 1}-{first + n}"
                                f" (chunk {index}) than")
        hidden = cfg.model.hidden
        offsets = np.concatenate([[0], np.cumsum(toks.lengths)])
        pooled = np.empty((n, self.width), dtype=np.dtype(cfg.dtype))
        layers = {(i, name): np.empty((int(offsets[-1]), hidden), dtype=pooled.dtype)
                  for i in self.kept for name in ("attention", "hidden")
                  if self.rows_parts is None}  # (else the replicas' rows files hold them)
        busy = []
        rows_seen = np.zeros(n, dtype=np.int64)  # every line gets exactly one row
        manifest = None
        if self.rows_parts is not None:  # each replica wrote its rows: check, list them
            manifest = []
            for replica, (seconds, rows_list, written, failure) in enumerate(gathered):
                if failure is not None:
                    raise UserError(f"replica {replica}: {failure}")
                busy.append(seconds)
                manifest.append(written)
                for rows in rows_list:
                    np.add.at(rows_seen, rows, 1)
            gathered = []
        for replica, (seconds, results, digest) in enumerate(gathered):
            if _digest(results) != digest:
                raise IntegrityError(f"the rows of replica {replica} in chunk {index} arrived"
                                     " altered (digest mismatch) at rank 0")
            busy.append(seconds)
            for rows, p_rows, states in results:
                np.add.at(rows_seen, rows, 1)
                pooled[rows] = p_rows
                lengths = toks.lengths[rows]
                starts = np.concatenate([[0], np.cumsum(lengths)])
                for key, a in states.items():
                    dest = layers[key]
                    for k, row in enumerate(rows):
                        dest[offsets[row]:offsets[row + 1]] = a[starts[k]:starts[k + 1]]
        if (rows_seen != 1).any():
            missing, twice = np.flatnonzero(rows_seen == 0), np.flatnonzero(rows_seen > 1)
            raise IntegrityError(
                f"chunk {index}: {missing.size} line(s) got no row and {twice.size} more than"
                f" one (first: {first + int((missing if missing.size else twice)[0]) + 1})"
                " at rank 0: the replicas disagree on the chunk's micro-batches; not written")
        pairs = cfg.input.pairs
        text = [it[0] for it in items] if pairs else list(items)
        mean = float(np.mean(busy)) if busy else 0.0
        stats = {"busy_max": max(busy, default=0.0), "busy_mean": mean, "lines": n,
                 "tokens": float(offsets[-1])}
        self.parts.write(index, ChunkResult(
            first, text, [it[1] for it in items] if pairs else None, toks.ids,
            toks.types if pairs else None, toks.truncated,
            pooled if manifest is None else None, layers if manifest is None else {}, stats,
            record_ids=record_ids, records_sha256=records_digest, rows_sha256=manifest))

    # --- the end ------------------------------------------------------------------------

    def bytes_read(self) -> int:
        """Bytes of ``input.text`` this rank read: its part of the pre-flight scan, then its
        slices of the chunks (plain text and JSON Lines split by byte ranges) or, on rank 0
        only, the whole (compressed) file for the chunks (other formats: rank 0 reads every
        chunk and hands the other ranks their slices)."""
        if self.info.slices:
            return self.info.scan_bytes + self.read_bytes
        reader = self.rank == 0 and (self.lines or self.tokenized)
        return self.info.scan_bytes + (self.info.size if reader else 0)

    def finish(self, out: Any, started: dt.datetime, wall0: float) -> Path | None:
        from ..parallel.comm import gather_rows

        cfg, p, phases = self.cfg, self.p, self.phases
        seconds = np.zeros((cfg.model.layers, len(phases)))
        for (layer, name), s in self.timer.seconds.items():
            seconds[layer, phases.index(name)] += s
        all_seconds = gather_rows(self.world, seconds[None])
        mine = {"forward": self.forward_s, "setup": self.setup_s,
                "total": time.perf_counter() - wall0,
                "peak_memory": p.backend.memory_high_water(), "busy": self.busy,
                "wait": self.wait, "lines": self.lines, "tokens": self.tokens,
                "padded_tokens": self.padded, "lines_tokenized": self.tokenized,
                "tokenize": self.tokenize_s, "bytes_read": self.bytes_read(),
                "scan_bytes": self.info.scan_bytes, "scan": self.scan_s}
        totals = gather_rows(self.world, np.array([[mine[k] for k in RANK_COLUMNS]]))
        records = epilogue.gather_records(self.world, [
            (self.replica, key, agg) for key, agg in self.records.items()] if self.leader
            else [])

        def check_space_first(o: Any) -> Any:
            check_space(o.path.parent, int(self.parts.size() * 1.1) + (4 << 20),
                        "the output file")
            return disk_file(o)

        def write(f: Any) -> None:
            f.attrs["write_mode"] = (
                "chunks gathered to rank 0, assembled from parts" if self.replicas == 1
                else "each replica leader wrote its rows of every chunk, rank 0 the"
                " chunk's lines; assembled from parts by rank 0")
            self._write_file(f, all_seconds, totals, records)

        def after() -> Path:
            kill_point("published")  # tests: a kill between publishing and removing
            self.parts.remove()
            self._summary(totals, out.path)
            return out.path

        return epilogue.finish(self.world, out, cfg, p, started, "run", write,
                               opener=check_space_first, after=after)

    def _write_file(self, f: Any, seconds: np.ndarray, totals: np.ndarray,
                    records: list) -> None:
        from ..parallel.transfers import Record

        cfg = self.cfg
        counts = assemble(f, self.parts, self.info.lines, cfg.model.hidden,
                          np.dtype(cfg.dtype), self.kept, cfg.input.pairs,
                          cfg.output.compression, self.width, ids=self.info.ids,
                          id_field=cfg.input.id_field)
        limit, source = truncation(cfg)
        stats = self.parts.read_stats()
        busy_max = sum(s.get("busy_max", 0.0) for s in stats)
        busy_mean = sum(s.get("busy_mean", 0.0) for s in stats)
        rows = [(replica, Record(layer, site, *agg[1:4], bool(agg[4]), int(agg[5]),
                                 int(agg[6]), int(agg[0])))
                for replica, (layer, site), agg in records]
        write_text_run(f, TextRunData(
            attrs={"lines": counts["lines"], "tokens": counts["tokens"],
                   "input_format": self.info.label, "max_tokens": limit,
                   "max_tokens_source": source, "truncated_lines": counts["truncated"],
                   "chunk_lines": cfg.input.chunk, "micro_batch": cfg.input.batch,
                   "assign": cfg.parallel.assign,
                   "replica_imbalance": busy_max / busy_mean if busy_mean else 1.0},
            pooled_attrs={"modules": self.pipe.describe(), "modules_source": self.pipe.source,
                          "prompt_name": self.pipe.prompt_name, "prompt": self.pipe.prompt},
            seconds=seconds,
            totals=totals, records=rows, phases=self.phases))

    def _summary(self, totals: np.ndarray, path: Path) -> None:
        cfg, p, m = self.cfg, self.p, self.cfg.model
        col = dict(zip(RANK_COLUMNS, totals.T, strict=True))
        lines, tokens = int(col["lines"].sum()), int(col["tokens"].sum())
        padded = int(col["padded_tokens"].sum())
        # every rank of a replica (its stages' head groups) counts the replica's work: once
        tensor = p.grid.axis_size("tensor") * p.grid.axis_size("pipeline")
        lines, tokens, padded = lines // tensor, tokens // tensor, padded // tensor
        forward = float(col["forward"].max())
        limit, source = truncation(cfg)
        print(f"mpiattn {__version__}: {m.layers} layers, {m.heads} heads, hidden {m.hidden};"
              f" {self.info.lines} {self.units} of '{cfg.input.text}' ({self.info.label}),"
              " micro-batches of"
              f" {cfg.input.batch}, {cfg.dtype}, {p.backend.name}")
        print(f"ranks {p.grid.size} = {self.replicas} data x {tensor} head; heads per rank"
              f" {p.head_counts}; BLAS threads/rank {p.threads or '-'}; assign"
              f" {cfg.parallel.assign}")
        busy = col["busy"]
        print(f"encoded {lines} lines, {tokens} tokens ({padded - tokens} padding) in"
              f" {forward:.2f} s: {lines / max(forward, 1e-9):.1f} lines/s,"
              f" {tokens / max(forward, 1e-9):.0f} tokens/s; replicas busy"
              f" {busy.min():.2f}-{busy.max():.2f} s; truncated at {limit} tokens ({source}):"
              f" see /input/truncated")
        print(f"peak memory {col['peak_memory'].max() / 2**30:.2f} GiB/rank; wall"
              f" {col['total'].max():.2f} s")
        print(f"wrote {path}")


def _digest(results: list) -> str:
    """SHA-256 over every array a replica sends to rank 0 (checked on arrival)."""
    import hashlib

    h = hashlib.sha256()
    for rows, pooled, states in results:
        h.update(np.ascontiguousarray(rows).tobytes())
        h.update(np.ascontiguousarray(pooled).tobytes())
        for key in sorted(states):
            h.update(np.ascontiguousarray(states[key]).tobytes())
    return h.hexdigest()
