"""What every MPI command (run, bench, train) does around its computation.

    world = jobkit.start(MPI.COMM_WORLD, timeout, signals="exit")  # watchdog, signals
    cfg = jobkit.agreed(world, lambda: config.load(path, sets))     # same verdict everywhere
    (value, out) = jobkit.preflight(world, check, output=(path, force))
    ... collectives, computation ...
    jobkit.conclude(world, write if rank == 0 else None)           # publish, agreed

The rule: a check that one rank makes is agreed by all before the next collective. The
pre-flight runs every local check (config, inputs, model files, output name, checkpoint)
on every rank with no collective in between, then one ``allgather`` carries each rank's
first error and the digests of the files it read: the first error in rank order is raised
on every rank (exit 2, printed once), and files that differ between ranks (a stale copy on
one node) are an error naming the file and the ranks. Rank 0 reserves the output (an
exclusive temporary) in the same step, so a bad name fails before any work.

Failures after the pre-flight that only some ranks see end the job through ``MPI_Abort``
(see ``cli``); waits that never end are cut by the watchdog (``watchdog``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..errors import ConfigError, InputError, UserError
from ..io import outfile
from ..io.outfile import Reservation, stale_note
from ..parallel import watchdog

TYPE_CHECKING = False  # type checkers take it as True
if TYPE_CHECKING:
    from mpi4py import MPI

T = TypeVar("T")


def start(raw_world: Any, timeout: float = watchdog.DEFAULT_TIMEOUT,
          signals: str = "exit") -> Any:
    """COMM_WORLD with every blocking call watched; signals handled as ``signals`` says
    (``"exit"``: at once, ``"flag"``: the step loop asks ``watchdog.current()``)."""
    dog = watchdog.install(timeout, raw_world.Abort, raw_world.Get_rank())
    dog.on_cleanup(outfile.discard_all)  # before handling signals: none slips through
    dog.handle_signals(signals)
    return watchdog.watch(raw_world)


def set_timeout(seconds: float) -> None:
    """``comm.timeout`` from the agreed config (0: off)."""
    dog = watchdog.current()
    if dog is not None:
        dog.timeout = seconds


def _local(check: Callable[[], T]) -> tuple[T | None, UserError | None]:
    try:
        return check(), None
    except UserError as err:
        return None, err
    except ValueError as err:  # a value the validator let through but a constructor refuses
        return None, ConfigError(str(err))


def _first_error(items: list[tuple[type, str] | None]) -> UserError | None:
    for rank, item in enumerate(items):
        if item is not None:
            kind, text = item
            err = kind(text if rank == 0 or len(items) == 1 else f"rank {rank}: {text}")
            err.agreed = True
            return err
    return None


def agreed(world: MPI.Comm, check: Callable[[], T], during: str | None = "start-up") -> T:
    """``check()`` on every rank; its first error (rank order) raised on every rank.
    ``during`` names the moment for the watchdog's message while the ranks agree."""
    value, error = _local(check)
    item = None if error is None else (type(error), str(error))
    watchdog.at(during=during)
    try:
        raise_first(world.allgather(item))
    finally:
        watchdog.at(during=None)
    return value  # type: ignore[return-value]


def raise_first(items: list) -> None:
    err = _first_error(items)
    if err is not None:
        raise err


def file_digest(path: str | Path, what: str = "input") -> str:
    """SHA-256 of a regular file's bytes (1.5 GB/s with SHA-NI: 0.3 s for BERT-base
    weights); InputError (one line) for a FIFO, device or folder (``safefile``)."""
    from ..io.safefile import digest

    return digest(path, what)


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def preflight(world: MPI.Comm, check: Callable[[], tuple[T, dict[str, str]]],
              output: tuple[str, bool] | None = None) -> tuple[T, Reservation | None]:
    """Every rank's local checks, then one agreement on errors and input digests.

    ``check()`` returns (value, digests): digests maps a label (``"input.text 'a.txt'"``) to
    the digest of what this rank read (``file_digest``/``text_digest``). With ``output``
    = (path, force), rank 0 reserves the output file after its own checks passed; if any
    rank failed, the reservation is dropped. Returns (value, reservation on rank 0).
    """
    _READ.clear()
    result, error = _local(check)
    value, digests = result if result is not None else (None, {})
    out = None
    if error is None and output is not None and world.Get_rank() == 0:
        try:
            refuse_input_as_output(output[0])
            out = Reservation.make(*output)
        except UserError as err:
            error = err
    item = None if error is None else (type(error), str(error))
    watchdog.at(during="start-up")
    gathered = world.allgather((item, digests))
    err = _first_error([e for e, _ in gathered]) or disagreement([d for _, d in gathered])
    watchdog.at(during=None)
    if err is not None:
        if out is not None:
            out.discard()
        raise err
    from ..io.formats.common import record_inputs

    record_inputs(digests)  # the same on every rank now: written into the output file
    if out is not None:
        note = stale_note(out.path)
        if note:
            print(note, flush=True)
    return value, out  # type: ignore[return-value]


_READ: list[Path] = []  # the input files the last ``input_digests`` call named


def refuse_input_as_output(path: str | Path) -> None:
    """UserError (one line) when the output name is one of the job's own input files
    (``input_digests``'s): ``--force`` would replace the corpus, the weights or a tokenizer
    with the job's output once it is done. A link at the output name is replaced itself,
    never what it points to, so only the name's own file counts."""
    import os

    try:
        st = os.lstat(path)
    except OSError:
        return  # nothing there yet
    for src in _READ:
        try:
            same = os.path.samestat(st, os.stat(src))
        except OSError:
            continue
        if same:
            raise UserError(f"output '{path}' is an input of this job ('{src}'): writing the"
                            " output would replace it; choose another -o")


def disagreement(per_rank: list[dict[str, str]]) -> UserError | None:
    """An InputError naming the first input whose digest differs between ranks."""
    labels = sorted({k for d in per_rank for k in d})
    for label in labels:
        groups: dict[str | None, list[int]] = {}
        for rank, digests in enumerate(per_rank):
            groups.setdefault(digests.get(label), []).append(rank)
        if len(groups) > 1:
            parts = " vs ".join(f"ranks {watchdog.rank_ranges(r)}" for r in
                                sorted(groups.values(), key=lambda r: r[0]))
            hint = ("give every rank the same command line and config"
                    if label.startswith("the ") else
                    "a stale or node-local copy? Give every rank the same file")
            err = InputError(f"ranks differ in {label} ({parts}): {hint}")
            err.agreed = True
            return err
    return None


def conclude(world: MPI.Comm, write: Callable[[], Any] | None, final: bool = True) -> Any:
    """Rank 0 (the caller that passes ``write``) writes and publishes; the outcome is
    agreed, so a failed write is one line and the same exit code on every rank. After
    the ``final`` output is published a late signal no longer fails the job."""
    dog = watchdog.current()
    if dog is not None and final:
        dog.concluding = True  # a signal now waits until the output is published
    try:
        value, error = _local(write) if write is not None else (None, None)
        raise_first(world.allgather(None if error is None else (type(error), str(error))))
    finally:
        if dog is not None:
            dog.concluding = False
    if dog is not None and final:
        dog.finished = True  # published on every rank: a late signal changes nothing
    return value


def input_digests(cfg: Any, extra: dict[str, Path] | None = None,
                  skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Digests of the resolved config and of every input file a job of ``cfg`` reads: the
    weights, every file of their model folder that can change a result (config.json,
    the tokenizer files, sentence-transformers' module files such as
    ``sentence_bert_config.json``, and those of every module ``modules.json`` lists: a
    Pooling's or Dense's ``config.json``, a Dense's ``model.safetensors``), the text,
    tokens and tokenizer, and ``extra`` (the training corpus, the checkpoint). Each read
    through ``safefile`` (regular files only). Labels in ``skip`` are left out (e.g.
    "input.text" of a text run split by byte ranges, whose digest is taken once per
    distinct file after the pre-flight: ``encode``)."""
    import os

    from ..inputs.data import tokenizer_path
    from ..io.formats.checkpoint import is_checkpoint
    from ..io.hf import TOKENIZER_FILES
    from ..io.stmodules import pipeline_files
    from ..io.weights import describe, resolve_weights

    files: dict[str, Path] = {}
    if cfg.model.weights:
        weights = resolve_weights(cfg.model.weights)
        files["model.weights"] = weights
        if not is_checkpoint(weights):  # (a checkpoint's own files are in its digest)
            for name in ("config.json", *TOKENIZER_FILES):  # all that can change a result
                if os.path.lexists(weights.parent / name):  # a FIFO too: refused when read
                    files[f"model.weights {name}"] = weights.parent / name
            for path in pipeline_files(weights.parent):  # each listed module's files (Dense)
                name = os.path.relpath(path, weights.parent)
                files.setdefault(f"model.weights {name}", path)
    for key in ("text", "tokens"):
        if getattr(cfg.input, key):
            files[f"input.{key}"] = Path(getattr(cfg.input, key))
    if cfg.input.text or cfg.input.tokenizer:
        files["input.tokenizer"] = tokenizer_path(cfg)
    files.update(extra or {})
    _READ[:] = list(files.values())  # skipped ones too: never to be replaced by the output
    for label in skip:
        files.pop(label, None)
    import sys

    out = {"the resolved config": text_digest(cfg.to_toml()),
           "the command line (e.g. --force on some ranks only)": text_digest(
               "\0".join(sys.argv[1:]))}
    for label, path in files.items():
        try:
            out[f"{label} '{describe(path)}'"] = file_digest(path, label)
        except OSError as err:
            raise InputError(f"{label} '{path}' cannot be read: {err.strerror}") from None
    return out
