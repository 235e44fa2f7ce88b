"""The process grid: named parallel axes, rank <-> coordinates, one communicator per axis.

    shape = GridShape.of(world_size=8, tensor=2, pipeline=2)   # data = 2
    shape.coords(5)            # {'data': 1, 'pipeline': 0, 'tensor': 1}
    grid = make_grid(world, shape)
    grid.comm("tensor")        # this rank's head group (Megatron's tensor-parallel group)

Axes, outermost first: ``data`` (replicas of the model, each on its share of the batch),
``pipeline`` (stages of consecutive layers), ``sequence`` (slices of the tokens of every
sequence, Ulysses or ring attention between them), ``tensor`` (the heads of a layer). The
world rank is the mixed-radix number of the coordinates with ``tensor`` fastest, so a head
group is a run of neighbouring ranks (on one node when it fits), then its sequence group, as
in Megatron-LM's ``initialize_model_parallel`` (tensor, then context parallel). With
pipeline = sequence = 1: world rank = replica * T + head rank.
The shape is pure arithmetic (tested without MPI); only ``make_grid`` talks.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

TYPE_CHECKING = False  # type checkers take it as True
if TYPE_CHECKING:
    from mpi4py import MPI

AXES = ("data", "pipeline", "sequence", "tensor")  # outermost first; the last varies fastest


@dataclass(frozen=True)
class GridShape:
    """Sizes of the axes; their product is the world size."""

    data: int = 1
    pipeline: int = 1
    tensor: int = 1
    sequence: int = 1

    @classmethod
    def of(cls, world_size: int, tensor: int, pipeline: int = 1,
           sequence: int = 1) -> GridShape:
        """The shape that puts ``tensor`` x ``sequence`` x ``pipeline`` ranks on one replica
        and the rest on data parallelism; a ConfigError (one line, with the valid values)
        otherwise."""
        for name, value in (("parallel.tensor", tensor), ("parallel.pipeline", pipeline),
                            ("parallel.sequence", sequence)):
            if value < 1:
                raise ConfigError(f"{name} = {value}: give a positive number of ranks")
        model = tensor * pipeline * sequence
        if world_size % model:
            valid = [d for d in range(1, world_size + 1) if world_size % d == 0]
            raise ConfigError(f"parallel.tensor x parallel.pipeline x parallel.sequence ="
                              f" {tensor} x {pipeline} x {sequence} = {model} does not divide"
                              f" the {world_size} ranks: their product must be one of {valid}")
        return cls(world_size // model, pipeline, tensor, sequence)

    @property
    def sizes(self) -> dict[str, int]:
        return {axis: getattr(self, axis) for axis in AXES}

    @property
    def world_size(self) -> int:
        return math.prod(self.sizes.values())

    def coords(self, rank: int) -> dict[str, int]:
        """Coordinates of world rank ``rank`` (``tensor`` fastest)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside a grid of {self.world_size}")
        out = {}
        for axis in reversed(AXES):
            rank, out[axis] = divmod(rank, getattr(self, axis))
        return {axis: out[axis] for axis in AXES}

    def rank(self, coords: dict[str, int]) -> int:
        """World rank at ``coords`` (missing axes: 0)."""
        rank = 0
        for axis in AXES:
            rank = rank * getattr(self, axis) + coords.get(axis, 0)
        return rank

    def group(self, rank: int, axis: str) -> list[int]:
        """World ranks that differ from ``rank`` only along ``axis``, in axis order."""
        return self.group_over(rank, (axis,))

    def group_over(self, rank: int, axes: tuple[str, ...]) -> list[int]:
        """World ranks that differ from ``rank`` only along ``axes``, ascending (e.g. the
        data x sequence ranks whose parameter gradients are summed)."""
        at = self.coords(rank)
        ranges = [range(getattr(self, a)) for a in axes]
        return sorted(self.rank({**at, **dict(zip(axes, c, strict=True))})
                      for c in itertools.product(*ranges))


@dataclass
class ProcessGrid:
    """This rank's place in the grid and one communicator per axis."""

    world: MPI.Comm  # MPI.Comm
    shape: GridShape
    comms: dict[str, Any]  # axis -> communicator of the ranks along it
    local_rank: int  # rank on this node
    local_size: int  # ranks on this node

    @property
    def rank(self) -> int:
        return self.world.Get_rank()

    @property
    def size(self) -> int:
        return self.world.Get_size()

    def comm(self, axis: str) -> Any:
        return self.comms[axis]

    def coord(self, axis: str) -> int:
        return self.shape.coords(self.rank)[axis]

    def axis_size(self, axis: str) -> int:
        return getattr(self.shape, axis)

    def group_ranks(self, axis: str) -> list[int]:
        """World ranks of this rank's group along ``axis`` (for messages and records)."""
        return self.shape.group(self.rank, axis)

    def comm_over(self, axes: tuple[str, ...]) -> Any:
        """Collective over ``world``: a communicator of the ranks that differ from this one
        only along ``axes`` (ranked as in ``GridShape.group_over``); an axis's own when
        only one of ``axes`` has more than one rank (no new communicator then)."""
        wide = [a for a in axes if getattr(self.shape, a) > 1]
        if len(wide) <= 1:
            return self.comms[wide[0] if wide else axes[0]]
        at = self.shape.coords(self.rank)
        color = self.shape.rank({**at, **dict.fromkeys(axes, 0)})
        return self.world.Split(color=color, key=self.rank)


def make_grid(world: MPI.Comm, shape: GridShape) -> ProcessGrid:
    """Collective over ``world``: split it into one communicator per axis."""
    from mpi4py import MPI

    rank = world.Get_rank()
    if shape.world_size != world.Get_size():
        raise ValueError(f"grid {shape.sizes} has {shape.world_size} ranks, world"
                         f" {world.Get_size()}")
    at = shape.coords(rank)
    comms = {}
    for axis in AXES:  # color: the coordinates on the other axes; key: this axis's
        others = {a: c for a, c in at.items() if a != axis}
        comms[axis] = world.Split(color=shape.rank({**others, axis: 0}), key=at[axis])
    node = world.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = node.Get_rank(), node.Get_size()
    node.Free()
    return ProcessGrid(world, shape, comms, local_rank, local_size)
