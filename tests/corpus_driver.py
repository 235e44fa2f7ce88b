"""Several text runs in one launch (tests/inputs/test_corpus_formats.py): each job of the JSON
list in argv[1] goes through ``encode.run_text`` on COMM_WORLD, as ``mpiattn run`` does
after its start-up, so one ``mpiexec`` start serves many corpus files.

    mpiexec -n 2 python -m mpi4py tests/corpus_driver.py '[{"sets": [...], "out": "a.h5"}]'

A job may hold ``"resume": "auto"`` (``--resume``) and ``"kill_after": K``: rank 0 sends
itself SIGKILL right after publishing chunk K (a node lost mid-corpus), which ends the
launch; the parts folder stays behind.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from mpi4py import MPI

from mpiattn import config
from mpiattn.commands.encode import run_text
from mpiattn.io import corpusfile


def main() -> None:
    world = MPI.COMM_WORLD
    for job in json.loads(sys.argv[1]):
        cfg = config.load(None, job["sets"])
        kill = job.get("kill_after")
        if kill is not None and world.Get_rank() == 0:
            write = corpusfile.Parts.write

            def dying(self, index, result, _write=write, _kill=kill):
                _write(self, index, result)
                if index == _kill:
                    os.kill(os.getpid(), signal.SIGKILL)

            corpusfile.Parts.write = dying
        run_text(cfg, world, job["out"], force=False, resume=job.get("resume"))
        world.Barrier()


if __name__ == "__main__":
    main()
