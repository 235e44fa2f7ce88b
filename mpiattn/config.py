"""Run configuration: dataclasses with defaults, TOML files, ``--set`` overrides, validation.

The defaults are the embedded main job (BERT-base shape, seeded weights and inputs). Every
key can be set in TOML or as ``--set section.key=value``; every error names the key and
says what would be valid, before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import tomllib
import types
import typing
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError


@dataclass
class ModelConfig:
    layers: int = 12
    heads: int = 12
    hidden: int = 768
    ffn: int = 3072  # MLP width
    weights: str = ""  # "" = seeded; a .safetensors file, its folder, or "package:NAME/DIR"
    vocab: int = 30522
    type_vocab: int = 2
    max_positions: int = 512
    layer_norm_eps: float = 1e-12


@dataclass
class InputConfig:
    batch: int = 8  # sequences (seeded input); text: sentences per micro-batch
    seq_len: int = 128  # tokens per sequence (seeded input)
    text: str = ""  # a corpus file (text, JSON Lines, Parquet; gzip/bz2/zstd); "" = seeded
    format: str = "auto"  # text: "auto" (name, magic bytes) | "text" | "jsonl" | "parquet"
    field: str = "text"  # JSON Lines / Parquet: the field holding the text
    pair_field: str = ""  # JSON Lines / Parquet with pairs: the field of the second text
    id_field: str = ""  # JSON Lines / Parquet: each record's id, kept in /input/id
    pairs: bool = False  # text: each line is two tab-separated sentences (a pair)
    max_tokens: int = 0  # text: truncation length in tokens; 0 = the model's own limit
    chunk: int = 0  # text: lines read, length-sorted and written together; 0 = auto
    tokenizer: str = ""  # tokenizer.json; "" = the one beside model.weights
    tokens: str = ""  # HDF5 /input/tokens (batch, seq), e.g. a run file: sets batch and seq
    prompt: str = ""  # text: a prompt's name in the folder's config_sentence_transformers.json,
    # put before every line as SentenceTransformer.encode(prompt_name=...); "" = its default
    min_fill: float = 0.5  # seeded input: shortest sequence as a fraction of seq_len


@dataclass
class ParallelConfig:
    tensor: int = 0  # head-parallel ranks per pipeline stage; 0 = all ranks of a stage
    pipeline: int = 1  # stages of consecutive layers per replica (run and train)
    sequence: int = 1  # ranks that split the tokens of every sequence (attention.sequence)
    microbatches: int = 1  # pipeline: micro-batches each replica's batch is split into
    balance: str = "even"  # "even" | "measured"
    assign: str = "balanced"  # text: micro-batches to replicas, "balanced" | "round-robin"
    overlap: int = 1  # split the batch into this many chunks, reduce one while computing the next
    vocab: bool = True  # train: split the word table and the MLM decoder over the head group
    zero: bool = False  # train: shard the optimizer state over the replicas (ZeRO-1)


@dataclass
class AttentionConfig:
    impl: str = "auto"  # "auto" | "plain" | "blocked"
    block: int = 0  # key block of blocked attention; 0 = chosen from seq_len
    sequence: str = "auto"  # with parallel.sequence > 1: "ulysses" | "ring" | "auto"


@dataclass
class OutputConfig:
    path: str = "mpiattn-run.h5"
    layers: str = "auto"  # "all" | "last" | "none"; "auto": text "none", else "all"
    compression: str = "none"  # "none" | "gzip" | "lzf"
    head_stats: bool = False  # run: mean attention entropy and distance per (layer, head)
    attention_maps: list = field(default_factory=list)  # run: sequences whose probabilities
    # go to /heads/maps (indices into the batch; L*H*S^2 numbers each)


@dataclass
class CommConfig:
    cuda_aware: str = "auto"  # "auto" | "true" | "false": pass device buffers to MPI
    timeout: float = 600.0  # seconds a rank may wait in one MPI operation; 0 = no limit


@dataclass
class ChecksumConfig:
    mode: str = "abft"  # "abft" | "off"
    wire: str = "float64"  # "float64": sums (and checks) in float64 | "native": run dtype
    on_mismatch: str = "retry"  # "retry" | "abort"
    retries: int = 2
    hash_every: str = "collective"  # "collective" | "layer" | "end"


@dataclass
class FaultConfig:
    inject: list = field(default_factory=list)  # tables: rank, layer, site, index, bit, where
    crash: list = field(default_factory=list)  # tables: rank, layer, how = "raise" | "kill"
    slow: list = field(default_factory=list)  # tables: rank, factor: emulate a slower rank


@dataclass
class CheckConfig:
    finite: str = "layer"  # "layer" | "off": check every layer's output for inf/NaN


@dataclass
class TrainConfig:
    steps: int = 200  # optimizer steps
    optimizer: str = "adamw"  # "sgd" | "adam" | "adamw"
    lr: float = 1e-3
    warmup: int = 20  # steps of linear warm-up
    decay: str = "cosine"  # "cosine" | "linear" | "none", after warm-up, down to min_lr
    min_lr: float = 0.0
    momentum: float = 0.9  # SGD
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01  # AdamW: decoupled; Adam/SGD: added to the gradient
    clip: float = 1.0  # global gradient-norm clip; 0 = off
    mask_prob: float = 0.15  # BERT masking: 80% [MASK], 10% random, 10% kept
    corpus: str = "data/corpus/train.txt"
    heldout: str = "data/corpus/heldout.txt"
    eval_every: int = 50  # steps between held-out evaluations; 0 = only at the end
    eval_batches: int = 4
    checkpoint_every: int = 0  # steps between checkpoints; 0 = none
    checkpoint: str = "mpiattn-ckpt.h5"
    export: str = "auto"  # Hugging Face folder at the end; "auto" = OUTPUT-hf, "" = none


@dataclass
class Config:
    seed: int = 0
    dtype: str = "float32"  # "float32" | "float64"
    backend: str = "auto"  # "auto" | "numpy" | "cupy"
    model: ModelConfig = field(default_factory=ModelConfig)
    input: InputConfig = field(default_factory=InputConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    checksum: ChecksumConfig = field(default_factory=ChecksumConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    check: CheckConfig = field(default_factory=CheckConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # keys set by the file or --set (not defaults): a checkpoint may not contradict them
    explicit: set = field(default_factory=set, repr=False, compare=False)

    def to_toml(self) -> str:
        return to_toml(self)


CHOICES: dict[str, tuple[str, ...]] = {
    "dtype": ("float32", "float64"),
    "backend": ("auto", "numpy", "cupy"),
    "parallel.balance": ("even", "measured"),
    "parallel.assign": ("balanced", "round-robin"),
    "input.format": ("auto", "text", "jsonl", "parquet"),
    "attention.impl": ("auto", "plain", "blocked"),
    "attention.sequence": ("auto", "ulysses", "ring"),
    "output.layers": ("auto", "all", "last", "none"),
    "output.compression": ("none", "gzip", "lzf"),
    "comm.cuda_aware": ("auto", "true", "false"),
    "checksum.mode": ("abft", "off"),
    "checksum.wire": ("float64", "native"),
    "checksum.on_mismatch": ("retry", "abort"),
    "checksum.hash_every": ("collective", "layer", "end"),
    "check.finite": ("layer", "off"),
    "train.optimizer": ("sgd", "adam", "adamw"),
    "train.decay": ("cosine", "linear", "none"),
}

POSITIVE = (
    "model.layers", "model.heads", "model.hidden", "model.ffn", "model.vocab",
    "model.type_vocab", "model.max_positions", "model.layer_norm_eps",
    "input.batch", "input.seq_len", "parallel.overlap", "parallel.pipeline",
    "parallel.sequence", "parallel.microbatches", "train.steps", "train.lr", "train.eps",
    "train.eval_batches",
)
NON_NEGATIVE = (
    "parallel.tensor", "input.max_tokens", "input.chunk", "attention.block", "checksum.retries",
    "comm.timeout", "train.warmup", "train.min_lr",
    "train.weight_decay", "train.clip", "train.eval_every", "train.checkpoint_every",
)


def _fields(obj: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _settings(cfg: Config) -> list[tuple[str, Any]]:
    return [(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name != "explicit"]


def _section_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def all_keys(cfg: Config | None = None) -> list[str]:
    """Every dotted key the configuration understands."""
    cfg = cfg or Config()
    keys = []
    for name, value in _settings(cfg):
        if dataclasses.is_dataclass(value):
            keys += [f"{name}.{sub}" for sub in _fields(value)]
        else:
            keys.append(name)
    return keys


def _unknown(key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
    return ConfigError(f"unknown config key '{key}': {hint}")


def coerce(key: str, value: Any, kind: Any) -> Any:
    """Check ``value`` against the field type; ints are accepted where floats are expected."""
    if isinstance(kind, types.GenericAlias) or kind is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value) if abs(value) < 2**63 else math.inf
    if kind is str and isinstance(value, bool):  # comm.cuda_aware = true
        return str(value).lower()
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ConfigError(
            f"config key '{key}' must be {kind.__name__}, got {type(value).__name__} {value!r}"
        )
    if (kind is float and not math.isfinite(value)) or (kind is int and abs(value) >= 2**63):
        raise ConfigError(f"config key '{key}' is {value!r}: give a finite number below 2**63")
    if kind is str and any(unicodedata.category(c) in ("Cc", "Cs") for c in value):
        raise ConfigError(f"config key '{key}' is {value!r}: control characters (newline,"
                          " tab, ...) or bytes that are not UTF-8 are not allowed")
    return value


def _assign(cfg: Config, key: str, value: Any) -> None:
    known = all_keys(cfg)
    if key not in known:
        raise _unknown(key, known)
    head, _, tail = key.partition(".")
    target = getattr(cfg, head) if tail else cfg
    name = tail or head
    kind = _section_types(type(target))[name]
    setattr(target, name, coerce(key, value, kind))


def _flatten(table: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as TOML (``3``, ``true``, ``"x"``) or else as a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE, got '{text}' (e.g. --set model.layers=2)")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


MAX_CONFIG_BYTES = 1 << 20  # the embedded default is ~1 KiB


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the TOML file, then ``--set`` overrides; validated."""
    cfg = Config()
    explicit: set[str] = set()
    if path:
        path = Path(path)
        if path.exists() and not path.is_file():  # a folder, or a FIFO that could block
            raise ConfigError(f"config file '{path}' is not a regular file: give a TOML file")
        if path.exists() and path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file '{path}' is {path.stat().st_size} bytes, more than"
                              f" a config holds ({MAX_CONFIG_BYTES}): is it the right file?")
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file '{path}' does not exist") from None
        except OSError as err:
            raise ConfigError(f"config file '{path}' cannot be read: {err.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file '{path}' is not valid TOML: {err}") from None
        for key, value in _flatten(table).items():
            _assign(cfg, key, value)
            explicit.add(key)
    for text in overrides:
        key, value = parse_override(text)
        _assign(cfg, key, value)
        explicit.add(key)
    cfg.explicit = explicit
    validate(cfg)
    return cfg


def from_dict(flat: dict[str, Any]) -> Config:
    """A validated Config from dotted keys (tests and programmatic use)."""
    cfg = Config()
    for key, value in flat.items():
        _assign(cfg, key, value)
    cfg.explicit = set(flat)
    validate(cfg)
    return cfg


def get(cfg: Config, key: str) -> Any:
    head, _, tail = key.partition(".")
    return getattr(getattr(cfg, head), tail) if tail else getattr(cfg, head)


def validate(cfg: Config) -> None:
    """Values that no run could use; checks that need the world size live in ``check_world``."""
    for key, choices in CHOICES.items():
        value = get(cfg, key)
        if value not in choices:
            raise ConfigError(
                f"config key '{key}' is '{value}': valid values are {', '.join(choices)}"
            )
    for key in POSITIVE:
        if get(cfg, key) <= 0:
            raise ConfigError(f"config key '{key}' must be positive, got {get(cfg, key)}")
    for key in NON_NEGATIVE:
        if get(cfg, key) < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {get(cfg, key)}")
    m = cfg.model
    if m.hidden % m.heads:
        raise ConfigError(
            f"model.hidden = {m.hidden} is not a multiple of model.heads = {m.heads}:"
            " each head needs hidden/heads columns"
        )
    if m.ffn < m.heads:
        raise ConfigError(f"model.ffn = {m.ffn} must be at least model.heads = {m.heads}")
    text_default = cfg.input.text and "input.seq_len" not in cfg.explicit  # unused by text
    if cfg.input.seq_len > m.max_positions and not text_default:
        raise ConfigError(
            f"input.seq_len = {cfg.input.seq_len} exceeds model.max_positions ="
            f" {m.max_positions}: shorten the sequence or raise max_positions"
        )
    for key in ("train.beta1", "train.beta2"):
        if not 0.0 <= get(cfg, key) < 1.0:
            raise ConfigError(f"config key '{key}' must be in [0, 1), got {get(cfg, key)}")
    if not 0.0 <= cfg.train.momentum <= 1.0:
        raise ConfigError(f"config key 'train.momentum' must be in [0, 1], got"
                          f" {cfg.train.momentum}")
    if cfg.seed < 0:
        raise ConfigError(f"config key 'seed' must be >= 0, got {cfg.seed}")
    if 0 < cfg.comm.timeout < 1:
        raise ConfigError(f"comm.timeout = {cfg.comm.timeout}: give 0 (no limit) or at least"
                          " 1 second (a shorter wait ends healthy jobs)")
    if not 0.0 < cfg.train.mask_prob < 1.0:
        raise ConfigError(f"train.mask_prob must be in (0, 1), got {cfg.train.mask_prob}")
    if not 0.0 < cfg.input.min_fill <= 1.0:
        raise ConfigError(f"input.min_fill must be in (0, 1], got {cfg.input.min_fill}")
    if cfg.input.text and cfg.input.tokens:
        raise ConfigError("input.text and input.tokens are both set: give one input")
    if cfg.input.prompt and not (cfg.input.text and cfg.model.weights):
        raise ConfigError(f"input.prompt = {cfg.input.prompt!r} names a prompt of the model"
                          " folder (model.weights) put before every line of input.text: set"
                          " both, or remove input.prompt")
    if cfg.input.max_tokens == 1 or cfg.input.max_tokens > m.max_positions:
        raise ConfigError(f"input.max_tokens = {cfg.input.max_tokens}: give 0 (the model's own"
                          f" limit) or 2 .. model.max_positions = {m.max_positions}")
    maps = cfg.output.attention_maps
    if any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < 2**63 for i in maps):
        raise ConfigError(f"output.attention_maps = {maps!r}: give sequence indices, integers"
                          " >= 0 (e.g. [0, 3])")
    if len(set(maps)) != len(maps):
        raise ConfigError(f"output.attention_maps = {maps!r} repeats an index: give each"
                          " sequence once")
    if cfg.output.layers == "auto":  # per-token states of a corpus only when asked for
        cfg.output.layers = "none" if cfg.input.text else "all"


def _fits(cfg: Config, world_size: int, tensor: int) -> bool:
    """Whether ``tensor`` head ranks per replica is a valid layout of ``world_size`` ranks."""
    seeded = not (cfg.input.text or cfg.input.tokens)  # file input: the runner checks rows
    return (tensor >= 1 and world_size % tensor == 0 and tensor <= cfg.model.heads
            and (not seeded or world_size // tensor <= cfg.input.batch))


def tensor_choices(cfg: Config, world_size: int) -> list[int]:
    """Every ``parallel.tensor`` that ``check_world`` accepts at ``world_size`` ranks.

    Those are the divisors of the world size that are <= model.heads and, for seeded
    input, leave at most input.batch data-parallel replicas. Ascending; may be empty.
    """
    top = min(world_size, cfg.model.heads)
    return [t for t in range(1, top + 1) if _fits(cfg, world_size, t)]


def _spoken(values: list[int]) -> str:
    """``[1, 2, 4]`` -> ``"1, 2 or 4"``."""
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _world_fix(cfg: Config, world_size: int) -> str:
    """What to change so that some parallel.tensor fits: valid values, else other keys."""
    choices = tensor_choices(cfg, world_size)
    if choices:
        return f"use parallel.tensor = {_spoken(choices)}"
    m, batch = cfg.model, cfg.input.batch  # only seeded input can leave no choice
    ranks = next(n for n in range(min(world_size - 1, m.heads * batch), 0, -1)
                 if tensor_choices(cfg, n))
    fixes = [f"run on {ranks} ranks (parallel.tensor = {tensor_choices(cfg, ranks)[-1]})"]
    widest = max(t for t in range(1, m.heads + 1) if world_size % t == 0)
    fixes.append(f"set input.batch = {world_size // widest} (parallel.tensor = {widest})")
    heads = next(t for t in range(1, world_size + 1)
                 if world_size % t == 0 and world_size // t <= batch)
    if not m.weights and m.hidden % heads == 0 and m.ffn >= heads:  # seeded weights only
        fixes.append(f"set model.heads = {heads} (parallel.tensor = {heads})")
    return (f"no parallel.tensor fits {world_size} ranks with model.heads = {m.heads} and"
            f" input.batch = {batch}: " + ", or ".join(fixes))


def check_world(cfg: Config, world_size: int) -> tuple[int, int]:
    """(tensor, data) sizes for this world, or a ConfigError saying what to change.

    Every message names the values that work (``tensor_choices``), or, when none does,
    a rank count, input.batch or model.heads that would (each with its parallel.tensor).
    With ``parallel.pipeline = P`` the world is P stages first; the head split is then
    checked on the world / P ranks of one stage.
    """
    stages, sequence = cfg.parallel.pipeline, cfg.parallel.sequence
    if sequence > 1:
        if world_size % sequence:
            valid = [d for d in range(1, world_size + 1) if world_size % d == 0]
            raise ConfigError(f"parallel.sequence = {sequence} does not divide the {world_size}"
                              f" ranks: use parallel.sequence = {_spoken(valid)}")
        try:
            return check_world(dataclasses.replace(
                cfg, parallel=dataclasses.replace(cfg.parallel, sequence=1)),
                world_size // sequence)
        except ConfigError as err:
            raise ConfigError(f"with parallel.sequence = {sequence}, the tokens of a sequence are"
                              f" split {sequence} ways and {world_size // sequence} ranks hold"
                              f" each slice (tensor x pipeline x data): {err}") from None
    if stages > 1:
        valid = [d for d in range(1, min(world_size, cfg.model.layers) + 1)
                 if world_size % d == 0]
        if world_size % stages or stages > cfg.model.layers:
            raise ConfigError(f"parallel.pipeline = {stages} stages for {world_size} ranks and"
                              f" {cfg.model.layers} layers: use parallel.pipeline ="
                              f" {_spoken(valid)} (a divisor of the ranks, at most the layers)")
        try:
            return check_world(dataclasses.replace(
                cfg, parallel=dataclasses.replace(cfg.parallel, pipeline=1)),
                world_size // stages)
        except ConfigError as err:
            raise ConfigError(f"with parallel.pipeline = {stages}, each stage has"
                              f" {world_size // stages} ranks: {err}") from None
    tensor = cfg.parallel.tensor or world_size
    data = world_size // tensor
    if world_size % tensor:
        problem = (f"parallel.tensor = {tensor} does not divide the {world_size} ranks"
                   " (world = tensor x data)")
    elif tensor > cfg.model.heads:
        problem = (f"parallel.tensor = {tensor} head ranks but model.heads = {cfg.model.heads}"
                   f" (each needs a head: parallel.tensor <= {cfg.model.heads})")
    elif not _fits(cfg, world_size, tensor):
        problem = f"{data} data-parallel replicas but input.batch = {cfg.input.batch}"
    else:
        return tensor, data
    raise ConfigError(f"{problem}: {_world_fix(cfg, world_size)}")


def to_toml(cfg: Config) -> str:
    """The resolved configuration as TOML text (stored in every output file)."""

    def fmt(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):  # TOML basic string: JSON's escapes are TOML's
            text = json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
            return text.encode("utf-8", "backslashreplace").decode("utf-8")
        if isinstance(value, list):
            return "[" + ", ".join(fmt(v) for v in value) + "]"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k if re.fullmatch(r'[A-Za-z0-9_-]+', k) else fmt(k)}"
                                   f" = {fmt(v)}" for k, v in value.items()) + "}"
        if isinstance(value, float) and not math.isfinite(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return repr(value)

    top, sections = [], []
    for name, value in _settings(cfg):
        if dataclasses.is_dataclass(value):
            body = "\n".join(f"{k} = {fmt(v)}" for k, v in vars(value).items())
            sections.append(f"[{name}]\n{body}")
        else:
            top.append(f"{name} = {fmt(value)}")
    return "\n".join(top) + "\n\n" + "\n\n".join(sections) + "\n"
