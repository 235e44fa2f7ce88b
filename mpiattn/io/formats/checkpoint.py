"""The training checkpoint (``mpiattn train``'s ``train.checkpoint_every``): whole-model
parameters, optimizer state and history in one HDF5 file (Hugging Face names, so any head
split resumes from it), written atomically. Its writer (``write_checkpoint``), its readers
(``read_checkpoint`` for ``--resume``, ``read_model`` for run and export, and
``CheckpointFile``, what ``mpiattn.open`` returns), what ``verify`` checks it promises
(``promised``), and the job identity ``--resume`` compares (``job_identity``), side by side.

Layout (docs, "Training"): ``/params/<Hugging Face name>``, ``/optimizer/<moment>/<name>``,
``/train`` (the history so far), ``/vocab``, ``/tokenizer``; root attributes ``step``
(steps done), ``job_identity``, ``model_type``, ``padding_idx``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...config import Config, ModelConfig
from ...core.mlm import MLMHead
from ...core.model import Embeddings, LayerShard
from ...errors import InputError
from .. import h5io
from ..hf import to_hf
from .reading import Lazy, _guarded, integer
from .train import TrainFile

TYPE_CHECKING = False  # type checkers take it as True
if TYPE_CHECKING:
    from ...inputs.corpus import Corpus

MAX_TOKENIZER = 64 << 20  # bytes of one stored tokenizer file
IDENTITY_ATTR = "job_identity"  # JSON {key: value}: what makes a checkpoint this job's

# Config keys that do not change a training result, left out of the job identity: where
# files go and how often (output.*, train.checkpoint*, train.export, evaluation), how the
# work is laid out and checked (parallel.*, attention.*, comm.*, checksum.*, check.*,
# fault.*, backend: checkpoints re-slice across layouts), train.steps (raising it continues
# a run), and the paths of inputs (their contents are in the identity by digest).
NOT_IDENTITY = ("output.", "comm.", "checksum.", "check.", "fault.", "parallel.",
                "attention.", "backend", "train.steps", "train.eval_", "train.checkpoint",
                "train.export", "train.corpus", "train.heldout", "model.weights",
                "input.text", "input.tokens", "input.tokenizer")
CONTENT = " (content)"  # the suffix of an input digest's key in an identity


def checkpoint_due(step: int, t: Any) -> bool:
    done = step + 1
    return t.checkpoint_every > 0 and (done % t.checkpoint_every == 0 or done == t.steps)


def checkpoint_path(t: Any, done: int) -> Path:
    """train.checkpoint with ``{step}`` replaced by the steps done (one file per checkpoint)."""
    return Path(t.checkpoint.replace("{step}", str(done)))


@dataclass
class History:
    """Per-step records, continued across resumes (stored in checkpoints)."""

    step: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    lr: list = field(default_factory=list)
    grad_norm: list = field(default_factory=list)
    tokens_per_second: list = field(default_factory=list)
    eval_step: list = field(default_factory=list)
    eval_loss: list = field(default_factory=list)

    def record(self, step: int, loss: float, lr: float, grad_norm: float,
               tokens_per_second: float) -> None:
        """One optimizer step's row."""
        self.step.append(step)
        self.loss.append(loss)
        self.lr.append(lr)
        self.grad_norm.append(grad_norm)
        self.tokens_per_second.append(tokens_per_second)

    def write(self, g: Any) -> None:
        """One dataset per field in ``g``: ``step`` and ``eval_step`` are the coordinates
        (dimension scales) of the per-step and the held-out records."""
        loss = {"units": "1", "long_name": "masked-LM cross-entropy in nats per masked token"}
        attrs = {"loss": loss, "eval_loss": loss, "lr": {"units": "1"},
                 "grad_norm": {"units": "1"},
                 "tokens_per_second": {"units": "1/s", "long_name": "tokens per second"},
                 "step": {"long_name": "optimizer step (0-based)"},
                 "eval_step": {"long_name": "optimizer step after which the held-out loss"
                               " was measured (-1: the starting model)"}}
        fields = vars(self)
        for name in sorted(fields, key=lambda k: not k.endswith("step")):  # coordinates first
            kind = np.int64 if name.endswith("step") else np.float64
            h5io.write_array(g, name, np.asarray(fields[name], dtype=kind),
                             ("eval_step" if name.startswith("eval") else "step",),
                             **attrs.get(name, {}))

    @classmethod
    def read(cls, g: Any) -> History:
        from ..h5safe import read

        return cls(**{f.name: list(read(g[f.name])) for f in dataclasses.fields(cls)})


def param_dims(name: str, ndim: int) -> tuple[str, ...]:
    """Dimension names of a whole-model tensor in Hugging Face naming (``hf.to_hf``):
    linear weights are (out, in); ``hidden_out`` is the output axis of a hidden x hidden
    matrix, ``model_id`` the model's vocabulary, ``position`` and ``token_type`` the rows
    of those embedding tables."""
    tables = {"word_embeddings.weight": "model_id", "position_embeddings.weight": "position",
              "token_type_embeddings.weight": "token_type",
              "leading_position_rows": "leading_position"}  # RoBERTa family's kept rows
    for suffix, rows in tables.items():
        if name.endswith(suffix):
            return (rows, "hidden_unit")
    if name.endswith("intermediate.dense.weight"):
        return ("ffn_unit", "hidden_unit")
    if name.endswith("intermediate.dense.bias"):
        return ("ffn_unit",)
    if name.endswith("output.dense.weight") and ".attention." not in name:
        return ("hidden_unit", "ffn_unit")
    if name == "cls.predictions.bias":
        return ("model_id",)
    return ("hidden_out", "hidden_unit")[2 - ndim :]  # biases, LayerNorm, (h, h) weights


def job_identity(cfg: Config, digests: dict[str, str]) -> dict[str, str]:
    """What makes a checkpoint this training job's: every config value that changes the
    result (all keys but ``NOT_IDENTITY``: the seed, dtype, model shape, hyperparameters,
    batch and masking), shown as text, and the SHA-256 of each input's content
    (``digests`` of ``jobkit.input_digests``, labels "train.corpus 'PATH'" keyed by the
    part before the path: the corpus, held-out text, tokenizer and model folder files).
    The resume checkpoint itself and the digests of the config and command line
    ("the ..." labels) are not part of it."""
    from ...config import all_keys, get

    ident = {k: _shown(get(cfg, k)) for k in all_keys(cfg) if not k.startswith(NOT_IDENTITY)}
    for label, digest in digests.items():
        name = label.split(" '", 1)[0]
        if not name.startswith(("the ", "--resume")):
            ident[name + CONTENT] = digest
    return ident


def _shown(value: Any) -> str:
    import json

    return json.dumps(value) if isinstance(value, (str, bool, list)) else repr(value)


def identity_differences(stored: dict[str, str], here: dict[str, str]) -> list[tuple]:
    """(key, value here, value stored) of every difference, config keys first. Config keys
    one side lacks (another mpiattn version's) are not compared; inputs are."""
    out = []
    for key in sorted(set(stored) | set(here), key=lambda k: (k.endswith(CONTENT), k)):
        if not key.endswith(CONTENT) and (key not in stored or key not in here):
            continue
        if stored.get(key) != here.get(key):
            out.append((key, here.get(key, "none"), stored.get(key, "none")))
    return out


def describe_differences(diffs: list[tuple], name: str) -> str:
    """The first difference in words, and how many more: 'train.lr 0.0001 here, 5e-05
    in ckpt-10.h5 (and 2 more: seed, train.corpus)'."""
    key, here, there = diffs[0]
    if key.endswith(CONTENT):
        first = (f"{key.removesuffix(CONTENT)} differs in content ({here[:12]} here,"
                 f" {there[:12]} in {name}; sha256)")
    else:
        first = f"{key} {here} here, {there} in {name}"
    rest = [k.removesuffix(CONTENT) for k, _, _ in diffs[1:]]
    more = f" (and {len(rest)} more: {', '.join(rest[:4])}{', ...' if len(rest) > 4 else ''})"
    return first + (more if rest else "")


def stored_identity(f: Any, path: Any) -> dict[str, str] | None:
    """The job identity stored in an open checkpoint (None: written before checkpoints
    recorded one); InputError when it is there but not readable."""
    import json

    from .. import h5safe

    raw = h5safe.attr(f, IDENTITY_ATTR)
    if raw is None:
        return None
    try:
        ident = json.loads(h5safe.text(raw, f"attribute '{IDENTITY_ATTR}' of /"))
    except ValueError:
        ident = None
    if not isinstance(ident, dict) or not all(isinstance(v, str) for v in ident.values()):
        raise InputError(f"'{path}': its attribute '{IDENTITY_ATTR}' is not a job identity"
                         " (altered?): resume from another checkpoint or start without --resume")
    return ident


def write_checkpoint(path: Any, cfg: Config, done: int, params: dict[str, Any],
                     state: dict[str, dict[str, Any]], corpus: Corpus, history: History,
                     tensor: int, tokenizer: dict[str, bytes],
                     identity: dict[str, str] | None = None,
                     family: dict[str, Any] | None = None) -> None:
    """Whole-model parameters and optimizer state (HF naming), written atomically to
    ``path`` (a file name, refused if it exists, or an ``outfile.Reservation``), with the
    tokenizer files (``export.tokenizer_files``) so the file alone is a usable model, the
    job's ``identity`` (``job_identity``) that ``--resume`` compares, and ``family``
    (``families.trained_as``: attributes ``model_type``, ``padding_idx``)."""
    import json

    with h5io.atomic_file(path) as f:
        if identity is not None:
            f.attrs[IDENTITY_ATTR] = json.dumps(identity, sort_keys=True)
        f.attrs.update(family or {"model_type": "bert", "padding_idx": -1})
        f.attrs.update({"format_version": h5io.FORMAT_VERSION, "command": "train checkpoint",
                        "step": done, "optimizer": cfg.train.optimizer, "seed": cfg.seed,
                        "config": cfg.to_toml(), "tensor_parallel": tensor,
                        "data_position": done * cfg.input.batch,
                        "rng": "stateless: batches and masks are seeded by (seed, step)"})
        g = f.create_group("params")
        for name, a in params.items():
            h5io.write_array(g, name, a, param_dims(name, a.ndim))
        for kind, tensors in state.items():
            s = f.create_group(f"optimizer/{kind}")
            for name, a in tensors.items():
                h5io.write_array(s, name, a, param_dims(name, a.ndim))
        h5io.write_array(f.create_group("vocab"), "token_ids", corpus.token_ids,
                         ("model_id",), description="tokenizer id of each model id")
        history.write(f.create_group("train"))
        tok = f.create_group("tokenizer")
        tok.attrs["description"] = "the tokenizer files the model was trained with, as bytes"
        for name, data in tokenizer.items():
            h5io.write_array(tok, name, np.frombuffer(data, dtype=np.uint8),
                             (re.sub(r"\W", "_", name) + "_byte",), units="bytes")
        f.attrs["status"] = "complete"


@dataclass
class Checkpoint:
    step: int
    params: dict[str, np.ndarray]
    state: dict[str, dict[str, np.ndarray]]
    token_ids: np.ndarray
    history: History
    optimizer: str
    identity: dict[str, str] | None = None  # None: written before identities were stored


def read_checkpoint(path: str | Path, cfg: Config,
                    identity: dict[str, str] | None = None) -> Checkpoint:
    """A checkpoint someone handed us: only what is inside the file (``h5safe``), every
    dataset's declared size checked before it is read, any malformed part one line.
    With ``identity`` (``job_identity`` of this job), one whose stored identity differs
    is refused in one line naming the first difference (InputError, exit 2); one that
    stores none (older) is compared by seed only."""
    from .. import h5safe

    with h5io.open_for_reading(path) as f:
        if h5safe.attr(f, "status") != "complete" or "params" not in f:
            raise InputError(f"'{path}' is not a complete mpiattn training checkpoint")
        stored_id = stored_identity(f, path)
        if identity is not None and stored_id is not None:
            diffs = identity_differences(stored_id, identity)
            if diffs:
                raise InputError(f"--resume: refused '{path}', a checkpoint of another job:"
                                 f" {describe_differences(diffs, Path(path).name)}; resume"
                                 " with that job's config and inputs, or start without"
                                 " --resume")
        try:
            params = {k: h5safe.read(f["params"][k]) for k in f["params"]}
            state = {kind: {k: h5safe.read(g[k]) for k in g}
                     for kind, g in f.get("optimizer", {}).items()}
            stored = h5safe.attr(f, "config")
            ck = Checkpoint(int(h5safe.attr(f, "step")), params, state,
                            h5safe.read(f["vocab/token_ids"]), History.read(f["train"]),
                            h5safe.text(h5safe.attr(f, "optimizer"), "optimizer"))
        except h5safe.MALFORMED as err:
            raise InputError(f"'{path}' is not a readable mpiattn training checkpoint:"
                             f" {h5safe.one_line(err)}") from None
    ck.identity = stored_id
    seed = _stored_seed(stored)
    if seed is not None and seed != cfg.seed:  # another experiment's (--resume auto too)
        raise InputError(f"'{path}' is a checkpoint of another experiment (seed {seed}, this"
                         f" job's seed {cfg.seed}): not resumed; pass --set seed={seed} to"
                         " continue it, or start without --resume")
    if ck.optimizer != cfg.train.optimizer:
        raise InputError(f"'{path}' holds {ck.optimizer} state but train.optimizer ="
                         f" {cfg.train.optimizer}: set train.optimizer={ck.optimizer}")
    if ck.step >= cfg.train.steps:
        raise InputError(f"'{path}' is at step {ck.step}, train.steps = {cfg.train.steps}:"
                         " raise train.steps to continue")
    return ck


@dataclass
class TrainedModel:
    """What a checkpoint holds of the model alone (``mpiattn export``, ``model.weights``)."""

    path: Path
    step: int
    model: ModelConfig  # the model's shape (model.* of the training job)
    token_ids: np.ndarray  # tokenizer id of each model id
    tokenizer: dict[str, bytes]  # file name -> contents
    family: dict[str, Any] | None = None  # model_type, padding_idx (``families.trained_as``)


def read_model(path: str | Path, with_params: bool = True) -> tuple[TrainedModel, dict]:
    """The model of a complete checkpoint and (``with_params``) its whole tensors in HF
    naming; only what is inside the file, every size checked (``h5safe``), every tensor
    the model needs there with its shape (and finite, when read). Raises ``InputError``
    for anything else, including checkpoints without their tokenizer."""
    import h5py

    from .. import h5safe
    from ..hf import PASSTHROUGH, TOKENIZER_FILES, module_files

    path = Path(path)
    bad = f"'{path}' is not a readable mpiattn training checkpoint"
    with h5io.open_for_reading(path) as f:
        if h5safe.attr(f, "status") != "complete" or "params" not in f \
                or h5safe.attr(f, "command") != "train checkpoint":
            raise InputError(f"'{path}' is not a complete mpiattn training checkpoint")
        if "tokenizer" not in f:
            raise InputError(f"'{path}' holds no tokenizer (written before checkpoints kept"
                             " theirs): train again, or continue it with --resume, to get one")
        try:
            shape = _model_shape(h5safe.text(h5safe.attr(f, "config"), "config"))
            group = f["tokenizer"]
            listing = group.get("modules.json")
            dense = module_files(h5safe.read(listing, MAX_TOKENIZER).tobytes()
                                 if isinstance(listing, h5py.Dataset) else None)
            tok = {name: h5safe.read(group[name], MAX_TOKENIZER).tobytes()
                   for name in (*TOKENIZER_FILES, *dense)
                   if name in group and isinstance(group[name], h5py.Dataset)}
            token_ids = h5safe.read(f["vocab/token_ids"])
            if token_ids.ndim != 1 or token_ids.dtype.kind not in "iu" or not token_ids.size:
                raise ValueError("/vocab/token_ids is not a list of token ids")
            family = {"model_type": h5safe.text(f.attrs.get("model_type", "bert"),
                                                "attribute 'model_type' of /"),
                      "padding_idx": f.attrs.get("padding_idx", -1)}
            pad = family["padding_idx"]
            if family["model_type"] not in ("bert", "roberta", "xlm-roberta", "camembert") \
                    or not isinstance(pad, int | np.integer) or pad < -1 \
                    or (pad < 0) != (family["model_type"] == "bert"):
                raise ValueError(f"its model_type {family['model_type']!r} and padding_idx"
                                 f" {pad!r} are not a family mpiattn trains")
            family["padding_idx"] = int(pad)
            model = TrainedModel(path, int(h5safe.attr(f, "step")), shape, token_ids, tok,
                                 family)
            want = model_shapes(shape, token_ids.size)
            stored = f["params"]
            for name, need in want.items():
                got = stored[name].shape if name in stored else None
                if got != need:
                    raise ValueError(f"/params/{name} has shape {got}, the model needs {need}")
            names = [*want, *(n for n in PASSTHROUGH if n in stored)]
            params = {k: h5safe.read(stored[k]) for k in names} if with_params else {}
        except h5safe.MALFORMED as err:
            raise InputError(f"{bad}: {h5safe.one_line(err)}") from None
    for name, a in params.items():
        if a.dtype.kind != "f" or not np.isfinite(a).all():
            raise InputError(f"{bad}: /params/{name} holds non-finite or non-float values")
    if "tokenizer.json" not in model.tokenizer:
        raise InputError(f"'{path}': /tokenizer has no tokenizer.json")
    return model, params


def _stored_seed(raw: Any) -> int | None:
    """``seed`` of a checkpoint's stored config attribute (None when it has none)."""
    import tomllib

    from .. import h5safe

    if raw is None:
        return None
    try:
        seed = tomllib.loads(h5safe.text(raw, "attribute 'config' of /")).get("seed", 0)
    except (tomllib.TOMLDecodeError, InputError):
        return None
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def _model_shape(toml: str) -> ModelConfig:
    """model.* of a stored training config (``model.weights``, where it started, dropped)."""
    import tomllib

    from ...config import ConfigError, coerce

    default = ModelConfig()
    try:
        table = tomllib.loads(toml).get("model", {})
        return ModelConfig(**{k: coerce(f"model.{k}", v, type(getattr(default, k)))
                              for k, v in table.items()
                              if k != "weights" and hasattr(default, k)})
    except (tomllib.TOMLDecodeError, ConfigError, AttributeError) as err:
        raise ValueError(f"its config attribute is not a training config: {err}") from None


def is_checkpoint(path: str | Path) -> bool:
    """Does ``path`` name an HDF5 file (by its signature; a training checkpoint, say)?"""
    from ...errors import UserError
    from ..safefile import open_regular

    try:  # never blocks on a FIFO: that is no checkpoint
        with open_regular(path, "checkpoint") as fh:
            return fh.read(8) == b"\x89HDF\r\n\x1a\n"
    except (OSError, UserError):
        return False


def model_shapes(m: ModelConfig, vocab: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the whole-model tensors of a model of shape ``m`` with ``vocab`` ids.
    Raises ``ValueError`` when the heads do not divide the hidden width."""
    h = m.hidden
    if m.heads < 1 or h % m.heads:
        raise ValueError(f"model.heads = {m.heads} does not divide model.hidden = {h}")
    z = np.zeros
    layer = LayerShard(z((h, 3 * h)), z(3 * h), z((h, h)), z(h), z(h), z(h), z((h, m.ffn)),
                       z(m.ffn), z((m.ffn, h)), z(h), z(h), z(h), h // m.heads)
    emb = Embeddings(z((vocab, h)), z((m.max_positions, h)), z((m.type_vocab, h)), z(h), z(h))
    head = MLMHead(z((h, h)), z(h), z(h), z(h), z(vocab))
    return {k: a.shape for k, a in to_hf(emb, [layer] * m.layers, head).items()}


def check_shapes(path: str, ck: Checkpoint, want: dict[str, tuple[int, ...]]) -> None:
    for name, shape in want.items():
        got = ck.params.get(name)
        if got is None or got.shape != shape:
            have = None if got is None else got.shape
            raise InputError(f"'{path}': {name} has shape {have}, this model needs {shape}"
                             " (the config's model.* must match the checkpoint's)")
    from ...core.optim import STATE

    for kind in STATE.get(ck.optimizer, ()):  # every moment the optimizer resumes from
        moments = ck.state.get(kind)
        if moments is None:
            raise InputError(f"'{path}' has no optimizer moment '{kind}' of {ck.optimizer}"
                             f" (/optimizer/{kind} is missing): the checkpoint is incomplete;"
                             " resume from another checkpoint or start without --resume")
        for name, shape in want.items():
            got = moments.get(name)
            if got is None or got.shape != shape:
                have = "missing" if got is None else f"of shape {got.shape}"
                raise InputError(f"'{path}': optimizer moment {kind} of {name} is {have}, the"
                                 f" model needs {shape}: the checkpoint is incomplete; resume"
                                 " from another checkpoint or start without --resume")


def latest_checkpoint(t: Any, identity: dict[str, str] | None = None,
                      skipped: list[str] | None = None) -> Path | None:
    """``--resume auto``: the newest complete checkpoint of ``train.checkpoint`` (any
    ``{step}``), or None when there is none yet (a first run starts from scratch).

    Only this user's files are considered (a shared folder may hold another user's file
    matching the pattern: passed over and named in ``skipped``). With ``identity``
    (``job_identity``), only a checkpoint of this job: one storing another identity (or,
    older ones storing none, another seed) is passed over and named in ``skipped`` with
    its first difference ("NAME (seed 7 here, 0 in NAME)")."""
    import os

    from .. import h5safe

    pattern = Path(t.checkpoint.replace("{step}", "*"))
    found: list[tuple[int, str, Path, Any]] = []
    for path in pattern.parent.glob(pattern.name):
        try:  # in a shared folder, a file of another user's (or a link of theirs) is not ours
            owners = {os.lstat(path).st_uid, os.stat(path).st_uid}
        except OSError:
            continue
        if owners != {os.geteuid()}:
            if skipped is not None:
                other = max(owners - {os.geteuid()})
                skipped.append(f"{path.name} (another user's file, uid {other})")
            continue
        try:  # the safe reader: a FIFO, device or hostile file is passed over, not opened
            with h5safe.open_for_reading(path) as f:
                if h5safe.attr(f, "status") != "complete" or "step" not in f.attrs:
                    continue
                step = int(h5safe.attr(f, "step"))
                stored = stored_identity(f, path)
                seed = _stored_seed(h5safe.attr(f, "config"))
        except (InputError, *h5safe.MALFORMED):
            continue
        found.append((step, path.name, path, stored if stored is not None else seed))
    for _, name, path, stored in sorted(found, key=lambda x: (x[0], x[1]), reverse=True):
        if identity is not None and isinstance(stored, dict):
            diffs = identity_differences(stored, identity)
            if diffs:
                if skipped is not None:
                    skipped.append(f"{name} ({describe_differences(diffs[:1], name)})")
                continue
        elif identity is not None and stored is not None and _shown(stored) != identity.get(
                "seed", _shown(stored)):
            if skipped is not None:
                skipped.append(f"{name} (seed {identity['seed']} here, {stored} in {name})")
            continue
        return path
    return None


# --- the reader of ``mpiattn.open`` and verify's check ---------------------------------

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
    reads every tensor the model needs with its shape: ``read_model``)."""
    return [f"group /{name} is missing" for name in ("params", "train", "vocab")
            if name not in f]
