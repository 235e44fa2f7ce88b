"""``mpiattn`` command line: run, bench, train (MPI); verify, report, plan, info.

Imports stay inside the subcommands, so ``mpiattn verify`` needs neither MPI nor SciPy and
every rank of a large job imports only what its command uses.

Failure policy, the same for every MPI command: a ``UserError`` (bad config or input) that
all ranks agree on is printed once by rank 0, exit code 2; a failed integrity check (3) or
non-finite numbers (4) are reported once by the group that saw them; any other exception
is printed by the rank that raised it, prefixed with its rank, and ``COMM_WORLD.Abort``
ends the job at once instead of leaving the others in a collective.
"""

from __future__ import annotations

import argparse
import io
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from ..version import __version__

TYPE_CHECKING = False  # type checkers take it as True
if TYPE_CHECKING:
    from mpi4py import MPI


class OneLineParser(argparse.ArgumentParser):
    """Command-line mistakes are one line (not usage + error), exit 2. Under a launcher
    the ranks agree on it first (``_agree_on_usage``), so that a mistake made on one rank
    only (an MPMD launch) ends every rank, and rank 0 alone says it."""

    def error(self, message: str) -> NoReturn:
        line = f"mpiattn: error: {message} (see '{self.prog} --help')"
        agreed = _agree_on_usage(line)
        if _launcher_rank() == 0:
            print(agreed or line, file=sys.stderr, flush=True)
        raise SystemExit(2)


def _agree_on_usage(line: str) -> str | None:
    """Under a launcher with several ranks: join the job's first agreement (the allgather of
    ``jobkit.agreed``) with this error, so the ranks that parsed fine end too; the first
    error in rank order, or None when MPI cannot be reached."""
    import os

    sizes = [os.environ.get(k, "") for k in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")]
    if not any(s.isdigit() and int(s) > 1 for s in sizes):
        return None
    try:
        from mpi4py import MPI

        from ..errors import UserError

        items = MPI.COMM_WORLD.allgather((UserError, line.removeprefix("mpiattn: error: ")))
    except Exception:  # no MPI here: this rank's line is all there is
        return None
    first = next((item for item in items if item is not None), None)
    return None if first is None else f"mpiattn: error: {first[1]}"


def _add_config_args(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("config", nargs="?", help="TOML file (default: the embedded default job)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set model.layers=2 (repeatable)")
    p.add_argument("-o", "--output", help=f"output HDF5 file (default: {default_out})")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")


def parser() -> argparse.ArgumentParser:
    ap = OneLineParser(
        prog="mpiattn",
        description="Head-sharded Transformer attention over MPI, checksum-validated, in HDF5.",
    )
    ap.add_argument("--version", action="version", version=f"mpiattn {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="sharded encoder forward pass, written to HDF5",
                         description="Run under mpiexec -n K; K ranks share the heads.")
    _add_config_args(run, "mpiattn-run.h5 or output.path")
    run.add_argument("--resume", action="store_true",
                     help="continue an interrupted text run from its finished chunks (the"
                     " parts folder of this job beside the output)")
    run.add_argument("--resume-from", metavar="PARTS",
                     help="continue an interrupted text run from this parts folder")
    bench = sub.add_parser("bench", help="the sharded layer against the measured limits",
                           description="Run under mpiexec -n K; writes results to HDF5.")
    _add_config_args(bench, "mpiattn-bench.h5")
    bench.add_argument("--repeats", type=int, default=5, help="timed repeats (default 5)")
    bench.add_argument("--warmup", type=int, default=1,
                       help="untimed layers before the repeats at each sweep length with"
                       " parallel.sequence > 1 (default 1; 0 for one long cold run)")
    bench.add_argument("--sweep", default="", metavar="S1,S2,...",
                       help="also time the layer at these sequence lengths")
    tr = sub.add_parser("train", help="masked-language-model training, head-sharded",
                        description="Run under mpiexec -n K; world = data x parallel.tensor.")
    _add_config_args(tr, "mpiattn-train.h5")
    tr.add_argument("--resume", metavar="CKPT.h5", help="continue from a training checkpoint"
                    " (any head split)")
    ex = sub.add_parser("export", help="a training checkpoint as a Hugging Face model folder"
                        " (no MPI)")
    ex.add_argument("checkpoint", help="a checkpoint written by mpiattn train")
    ex.add_argument("folder", help="the folder to create (model.safetensors, config.json,"
                    " tokenizer files)")
    ex.add_argument("--force", action="store_true", help="replace an existing folder")
    ver = sub.add_parser("verify", help="re-check a finished HDF5 file offline (no MPI)")
    ver.add_argument("files", nargs="+", help="HDF5 files written by mpiattn")
    ver.add_argument("--inputs", action="store_true", help="also list the SHA-256 of every"
                     " input the job read (model folder files, tokenizer, text, corpus,"
                     " checkpoint), as recorded in the file")
    sub.add_parser("info", help="versions, MPI library, GPUs, BLAS; per rank under mpiexec")
    rep = sub.add_parser("report", help="tables, JSON and plots from HDF5 files (no MPI)")
    rep.add_argument("files", nargs="+", help="HDF5 files written by mpiattn")
    form = rep.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="machine-readable output, per rank")
    form.add_argument("--csv", action="store_true",
                      help="bench files: the Allreduce table as CSV on stdout (nccl-tests"
                      " columns: size B, count, type, redop, root, time us, algbw GB/s,"
                      " busbw GB/s, #wrong; then spread, copy_time, copy_bw, ranks, file)")
    rep.add_argument("--plot", metavar="OUT.png", help="phase breakdown (one panel per kind of"
                     " file), scaling, loss curves, Allreduce bandwidth")
    rep.add_argument("--heads", action="store_true",
                     help="per-head attention entropy and distance as layer x head tables;"
                     " with --plot, as heatmaps (files of output.head_stats = true)")
    pl = sub.add_parser("plan", help="predict time and speed-up at N ranks from runs or bench"
                        " files (no MPI)")
    pl.add_argument("files", nargs="+", help="mpiattn bench files, or run files at several"
                    " rank counts")
    pl.add_argument("--ranks", default="", metavar="1,2,4,...",
                    help="rank counts to predict (default: powers of two up to 1024)")
    pl.add_argument("--cores", type=float,
                    help="cores per node of the predicted job (default: the measured machine's)")
    pl.add_argument("--measured-cores", type=float,
                    help="cores of the machine the files came from (default: from the files,"
                    " or this host's when they were made here)")
    pl.add_argument("--ranks-per-node", type=int, help="ranks per node (default: all on one)")
    pl.add_argument("--nodes-alpha", type=float, metavar="S",
                    help="inter-node Allreduce latency per step (default: the fitted one)")
    pl.add_argument("--nodes-beta", type=float, metavar="S_PER_BYTE",
                    help="inter-node seconds per byte (default: the fitted one)")
    pl.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="model.hidden|heads|layers|ffn, input.batch|"
                    "seq_len, dtype, checksum.mode|wire, parallel.microbatches|sequence,"
                    " attention.sequence (auto|ulysses|ring) of the predicted job (repeatable)")
    pl.add_argument("--layout", choices=("heads", "best"), default="heads",
                    help="heads: most head ranks first (default); best: fastest data x"
                    " pipeline x sequence x tensor split")
    pl.add_argument("--memory", type=float, metavar="GIB",
                    help="GiB per rank: layouts whose estimated weights + activations do not"
                    " fit are left out")
    pl.add_argument("--gpu-speedup", type=float, metavar="X",
                    help="text-run and training files: also model GPU ranks that compute X"
                    " times as fast as one measured CPU rank (scan, tokenize, write and"
                    " the allreduce stay as measured)")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    return ap


NO_MPI_FIX = ('install the MPICH wheel with pip install "mpiattn[mpi]", or load your site\'s'
              " MPI (e.g. module load) and rebuild mpi4py against it with"
              " pip install --no-binary mpi4py --force-reinstall mpi4py")

# Global rank as the launchers export it (MPICH Hydra, Open MPI, PMIx, Slurm): known
# before MPI loads, so that a job whose ranks cannot load MPI prints its one line once.
_LAUNCHER_RANK = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")


def _launcher_rank() -> int:
    """This process's rank from the launcher's environment; 0 when started alone."""
    import os

    for name in _LAUNCHER_RANK:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def _world() -> Any:
    """``MPI.COMM_WORLD``; when MPI cannot load, one line naming the fixes and exit 2.

    Raises SystemExit(2) when ``from mpi4py import MPI`` fails (mpi4py missing: ImportError;
    libmpi not found or not loadable: RuntimeError). Only launcher rank 0 prints.
    """
    import warnings

    try:
        with warnings.catch_warnings():  # mpi4py's own mislaunch warning: ``launch`` says
            warnings.filterwarnings("ignore", "suspicious MPI execution environment")
            from mpi4py import MPI
    except (ImportError, RuntimeError, OSError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        if _launcher_rank() == 0:
            print(f"mpiattn: error: cannot load MPI ({reason}): {NO_MPI_FIX}",
                  file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    return MPI.COMM_WORLD


def _startup_timeout(args: argparse.Namespace | None) -> float:
    """``comm.timeout`` of the config this rank sees (read again after MPI starts, and
    agreed then); the default when there is none or it does not load."""
    from ..parallel.watchdog import DEFAULT_TIMEOUT

    if args is None or not hasattr(args, "overrides"):
        return DEFAULT_TIMEOUT
    try:
        from .. import config

        return config.load(args.config, args.overrides).comm.timeout
    except Exception:  # reported properly once MPI runs; here only the timeout matters
        return DEFAULT_TIMEOUT


def _mpi_command(body: Callable[[Any], int], signals: str = "exit",
                 args: argparse.Namespace | None = None) -> int:
    """Run ``body(world)`` under the failure policy above, with the watchdog on."""
    from ..errors import IntegrityError, Stopped, UserError
    from ..parallel import watchdog
    from . import jobkit

    # MPI_Init itself waits for every rank: one that never starts MPI (a --help or a
    # missing MPI library on one rank) would hold the others there for ever
    with watchdog.startup_guard(_startup_timeout(args), _launcher_rank()):
        raw_world = _world()
    if raw_world.Get_size() == 1:  # N singletons of a broken launch: each says so, exits
        from .launch import Mislaunched, check

        try:
            from mpi4py import MPI

            check(1, MPI.Get_library_version().splitlines()[0])
        except Mislaunched as err:
            if _launcher_rank() == 0:
                print(f"mpiattn: error: {err}", file=sys.stderr, flush=True)
            return err.exit_code
    world = jobkit.start(raw_world, signals=signals)
    rank, size = world.Get_rank(), world.Get_size()
    import numpy as np

    def abort(code: int) -> int:
        """End every rank: this one's failure cannot be agreed on any more."""
        dog = watchdog.current()
        if dog is not None:
            dog.cleanup()
        if size > 1:
            import time

            time.sleep(watchdog.GRACE_SECONDS)  # the launcher forwards the line first
            world.Abort(code)
        return code

    try:
        with np.errstate(all="ignore"):  # inf/NaN are found by check.finite, once, not warned
            status = body(world)
        # done: a late signal must not kill the interpreter's shutdown (it restores the
        # default action of Python-level handlers, not of ignored signals)
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)
        return status
    except UserError as err:
        if err.agreed:  # every rank holds it: rank 0 says it, all leave with its code
            if rank == 0:
                print(f"mpiattn: error: {err}", file=sys.stderr, flush=True)
            return err.exit_code
        who = f"rank {rank}: " if size > 1 else ""
        print(f"mpiattn: error: {who}{err}", file=sys.stderr, flush=True)
        return abort(err.exit_code)
    except Stopped as err:  # agreed at a step boundary, checkpointed
        if rank == 0:
            print(f"mpiattn: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    except IntegrityError as err:  # collective within err.comm: its rank 0 reports
        if err.comm is None:  # seen by this rank (and one peer) alone: end the job
            print(f"mpiattn: {err.label}: rank {rank}: {err}; no output written",
                  file=sys.stderr, flush=True)
            return abort(err.exit_code)
        group = err.comm
        if group.Get_rank() == 0:
            print(f"mpiattn: {err.label}: {err}; no output written", file=sys.stderr,
                  flush=True)
        if group.Get_size() < size:  # other replicas wait in a collective
            group.Barrier()  # the message is out before the job is torn down
            return abort(err.exit_code)
        return err.exit_code
    except MemoryError:  # on one rank, mid-job: one line, then the job ends
        print(f"mpiattn: rank {rank}: out of memory: use a smaller model.* or input.*, more"
              " ranks (parallel.tensor, parallel.pipeline) or a node with more memory",
              file=sys.stderr, flush=True)
        return abort(1)
    except BaseException as err:
        if isinstance(err, SystemExit) and not err.code:
            raise
        detail = "".join(traceback.format_exception(err)).rstrip()
        print(f"mpiattn: rank {rank}: {type(err).__name__}: {err}\n{detail}", file=sys.stderr,
              flush=True)
        return abort(1)


def _output(args: argparse.Namespace, default: str) -> str:
    """``-o`` as given ("" included: refused by the name check), else ``default``."""
    return default if args.output is None else args.output


def _load_config(args: argparse.Namespace) -> Any:
    """The config file, ``--set`` overrides and ``-o``, validated (the same on every rank)."""
    from .. import config
    from . import jobkit

    cfg = config.load(args.config, args.overrides)
    if args.output is not None:  # "" too: the name check refuses it
        cfg.output.path = args.output
    jobkit.set_timeout(cfg.comm.timeout)  # the start-up agreement waits at most this long
    return cfg


def cmd_run(args: argparse.Namespace) -> int:
    def body(world: MPI.Comm) -> int:
        from . import jobkit
        from .runner import run

        def load() -> Any:
            from ..errors import ConfigError

            cfg = _load_config(args)
            if (args.resume or args.resume_from) and not cfg.input.text:
                raise ConfigError("--resume continues an interrupted text run (input.text);"
                                  " this job runs as one batch: run it again without --resume")
            return cfg

        cfg = jobkit.agreed(world, load)
        resume = args.resume_from or ("auto" if args.resume else None)
        run(cfg, world, cfg.output.path, args.force, resume)
        return 0

    return _mpi_command(body, args=args)


def _bench_args(args: argparse.Namespace) -> tuple[Any, list[int]]:
    from ..errors import ConfigError

    cfg = _load_config(args)
    try:
        sweep = [int(x) for x in args.sweep.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--sweep expects comma-separated lengths, got '{args.sweep}'"
                          ) from None
    if sweep and cfg.parallel.pipeline > 1:
        raise ConfigError(f"--sweep times one layer; parallel.pipeline = {cfg.parallel.pipeline}"
                          " times the pipelined forward: drop --sweep or set"
                          " parallel.pipeline = 1")
    if not 1 <= args.repeats <= 10_000:
        raise ConfigError(f"--repeats {args.repeats}: give 1 to 10000 timed repeats")
    if not 0 <= args.warmup <= 100:
        raise ConfigError(f"--warmup {args.warmup}: give 0 to 100 untimed runs")
    bad = [x for x in sweep if not 1 <= x <= cfg.model.max_positions]
    if bad:
        raise ConfigError(f"--sweep length {bad[0]} is outside 1..model.max_positions"
                          f" ({cfg.model.max_positions})")
    return cfg, sweep


def cmd_bench(args: argparse.Namespace) -> int:
    def body(world: MPI.Comm) -> int:
        from . import jobkit
        from .bench import bench

        cfg, sweep = jobkit.agreed(world, lambda: _bench_args(args))
        bench(cfg, world, _output(args, "mpiattn-bench.h5"), args.force, args.repeats, sweep,
              args.warmup)
        return 0

    return _mpi_command(body, args=args)


def cmd_train(args: argparse.Namespace) -> int:
    def body(world: MPI.Comm) -> int:
        from .. import config
        from . import jobkit
        from .train import train

        def load() -> Any:
            cfg = config.load(args.config, args.overrides)
            jobkit.set_timeout(cfg.comm.timeout)  # the start-up agreement waits this long
            return cfg

        cfg = jobkit.agreed(world, load)
        train(cfg, world, _output(args, "mpiattn-train.h5"), args.force, args.resume)
        return 0

    return _mpi_command(body, signals="flag", args=args)


def cmd_verify(args: argparse.Namespace) -> int:
    from ..errors import UserError
    from ..io.verify import recorded_inputs, verify

    status = 0
    for path in args.files:
        if getattr(args, "inputs", False):
            try:
                listed = recorded_inputs(path)
            except UserError:
                listed = {}  # verify says what is wrong with the file
            for label, digest in sorted(listed.items()):
                print(f"{path}: input {label}: sha256 {digest}")
            if not listed:
                print(f"{path}: no input digests recorded (seeded inputs only, or an older"
                      " file)")
        try:
            problems = verify(path)
        except UserError as err:
            problems = [str(err)]
        if problems:
            status = 1
            print(f"{path}: FAILED: {problems[0]}"
                  + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))
            for extra in problems[1:]:
                print(f"  {extra}")
        else:
            print(f"{path}: OK (complete, digests match, all collectives passed)")
    return status


def cmd_export(args: argparse.Namespace) -> int:
    import signal

    from ..errors import UserError
    from ..io.export import export_checkpoint, stale_temporaries

    if _launcher_rank() > 0:  # started under a launcher: one copy writes the folder
        return 0

    def stop(signum: int, _frame: Any) -> None:  # unwinds: the temporary folder is removed
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    for tmp in stale_temporaries(args.folder):
        if tmp.suffix == ".old":  # an export --force killed between its two renames
            print(f"mpiattn export: note: '{tmp}/model' is the previous '{args.folder}',"
                  " moved aside by an interrupted export --force: move it back with mv if"
                  " you need it", file=sys.stderr)
            continue
        print(f"mpiattn export: note: '{tmp}' is the temporary of an export whose process is"
              " gone (safe to delete)", file=sys.stderr)
    try:
        folder = export_checkpoint(args.checkpoint, args.folder, args.force)
    except UserError as err:
        print(f"mpiattn export: error: {err}", file=sys.stderr)
        return err.exit_code
    import json

    kind = json.loads((folder / "config.json").read_text()).get("architectures", ["?"])[0]
    print(f"exported {folder} (Hugging Face {kind})")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .info import info

    return _mpi_command(info)


def cmd_report(args: argparse.Namespace) -> int:
    from ..analysis.report import report
    from ..errors import UserError

    try:
        return report(args.files, args.json, args.plot, args.heads, args.csv)
    except UserError as err:
        print(f"mpiattn report: error: {err}", file=sys.stderr)
        return err.exit_code


def cmd_plan(args: argparse.Namespace) -> int:
    from ..analysis.plan import plan_command
    from ..errors import UserError

    try:
        return plan_command(args)
    except UserError as err:
        print(f"mpiattn plan: error: {err}", file=sys.stderr)
        return err.exit_code


COMMANDS = {"run": cmd_run, "bench": cmd_bench, "train": cmd_train, "export": cmd_export,
            "verify": cmd_verify,
            "info": cmd_info, "report": cmd_report, "plan": cmd_plan}


CLOSED_PIPE = 141  # 128 + SIGPIPE: what a shell reports for `yes | head -1`


class _GuardedStdout:
    """``sys.stdout`` for one command: when its reader goes away (EPIPE), file descriptor 1
    is pointed at /dev/null and the command carries on, its output discarded.

    Carrying on matters under MPI: rank 0 leaving early would strand the other ranks in a
    collective (and the MPI commands' catch-all would report the error as a crash).
    """

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.closed = False  # True once the reader went away

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self.gone()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self.gone()
            self.stream.flush()  # the buffered rest goes to /dev/null now

    def gone(self) -> None:
        """Point file descriptor 1 at /dev/null: the exit-time flush cannot fail again."""
        import os

        self.closed = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self.stream.fileno())
        os.close(devnull)

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding, ...
        return getattr(self.stream, name)


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the command; returns the exit status.

    When the reader of stdout goes away early (``mpiattn info | head -1``), every command
    ends quietly, without a traceback or an "Exception ignored" line, and with status 141
    (128 + SIGPIPE, as a shell reports a program a closed pipe ended) unless the command
    failed on its own (then its status). The command runs to its end: an MPI job still
    writes its HDF5 file.
    """
    real = sys.stdout
    guard = _GuardedStdout(real) if _has_fd(real) else None
    sys.stdout = guard or real
    try:
        if _launcher_rank() > 0:  # --help and --version: rank 0 alone prints them
            sys.stdout = io.StringIO()
        args = parser().parse_args(argv)
        sys.stdout = guard or real
        if args.command in ("run", "bench", "train", "info"):  # before the job's handlers:
            from ..parallel.watchdog import record_early_signals  # a signal is kept, then acted on

            record_early_signals()
        if args.command in OFFLINE and _launcher_rank() > 0:
            _quiet()  # started under a launcher: rank 0 alone speaks for the copies
        status = COMMANDS[args.command](args)
        sys.stdout.flush()
    except SystemExit as stop:  # --help, --version, argparse errors, no MPI
        sys.stdout.flush()
        if guard is None or not guard.closed or stop.code not in (0, None):
            raise
        status = 0
    except KeyboardInterrupt:  # Ctrl-C in verify, report, plan: no traceback
        print("mpiattn: interrupted by SIGINT", file=sys.stderr, flush=True)
        status = 130
    finally:
        sys.stdout = real
    return CLOSED_PIPE if guard is not None and guard.closed and not status else status


OFFLINE = ("verify", "report", "plan", "export")  # commands without MPI


def _quiet() -> None:
    """Send this process's stdout and stderr to /dev/null (file descriptors included)."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        if _has_fd(stream):
            stream.flush()
            os.dup2(devnull, stream.fileno())
    os.close(devnull)


def _has_fd(stream: Any) -> bool:
    """Whether ``stream`` is a real file (not a test's capture object, not None)."""
    try:
        stream.fileno()
    except (AttributeError, ValueError, OSError):
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
