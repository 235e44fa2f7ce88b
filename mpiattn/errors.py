"""Errors a user can fix: printed as one line by rank 0, exit code 2, no traceback."""


class UserError(Exception):
    """Bad configuration or input: the message says what is wrong, where, and the fix."""

    exit_code = 2
    agreed = False  # True once every rank holds it (``jobkit``): printed once, no abort


class ConfigError(UserError):
    """A configuration key is unknown, of the wrong type, or has an impossible value."""


class InputError(UserError):
    """An input file (weights, text, tokens, HDF5) is missing or malformed."""


class IntegrityError(Exception):
    """A collective's result failed validation after all retries (exit code 3).

    Raised on every rank of ``comm`` together (the verdict is collective); ranks outside
    it (other replicas) learn of it only through ``MPI_Abort``. ``comm = None``: raised
    by the ranks of one point-to-point message only; the job ends through ``MPI_Abort``.
    """

    exit_code = 3
    label = "integrity error"

    def __init__(self, message: str, comm: object = None) -> None:
        super().__init__(message)
        self.comm = comm


class NumericalError(IntegrityError):
    """Non-finite activations: a fault of the inputs or weights, not of the network."""

    exit_code = 4
    label = "numerical error"


class Stopped(Exception):
    """Training stopped on a signal at a step all ranks agreed on, its checkpoint written
    (exit code 75, EX_TEMPFAIL: run again with --resume; Slurm scripts requeue on it)."""

    exit_code = 75
