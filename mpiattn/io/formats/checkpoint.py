"""The training checkpoint (``mpiattn train``'s ``checkpoint_every``): its reader
(``CheckpointFile``) and what ``verify`` checks it holds. Its writer and the model reader
the commands use are ``io.checkpoints`` (``write_checkpoint``, ``read_checkpoint``,
``read_model``).

Layout (docs, "Training"): ``/params/<Hugging Face name>``, ``/optimizer/<moment>/<name>``,
``/train`` (the history so far), ``/vocab``; root attribute ``step`` (steps done).
"""

from __future__ import annotations

from typing import Any

from .reading import Lazy, _guarded, integer
from .train import TrainFile


class CheckpointFile(TrainFile):
    """A training checkpoint: whole-model parameters (Hugging Face names), optimizer state,
    history; ``step`` is the steps done."""

    kind = "checkpoint"

    @property
    def step(self) -> int:
        return integer(self.attrs.get("step"), "attribute 'step' of /", 0)

    @_guarded
    def params(self) -> dict[str, Lazy]:
        """Every parameter tensor by its Hugging Face name, unread."""
        group = self.h5.get("params")
        return {k: self[f"params/{k}"] for k in group} if group is not None else {}


def promised(f: Any, config: dict | None) -> list[str]:
    """Parameters, optimizer state, history and vocabulary are there (``verify`` then
    reads every tensor the model needs with its shape: ``io.checkpoints.read_model``)."""
    return [f"group /{name} is missing" for name in ("params", "train", "vocab")
            if name not in f]
