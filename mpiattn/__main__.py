"""``python -m mpiattn ...`` is the ``mpiattn`` command (for launchers that want an
interpreter: ``mpiexec -n 4 python -m mpiattn run``)."""

import sys

from mpiattn.commands.cli import main

sys.exit(main())
