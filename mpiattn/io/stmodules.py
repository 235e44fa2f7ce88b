"""The sentence-transformers pipeline a model folder describes, read as
sentence-transformers reads it.

    pipe = read_pipeline(folder)       # core.pooling.Pipeline; InputError: one line
    pipe.describe()                    # "Transformer > Pooling(cls) > Dense(12->6, tanh)"

``modules.json`` lists the modules in order: the Transformer (mpiattn's encoder), then
Pooling (``1_Pooling/config.json``: ``pooling_mode`` or the older ``pooling_mode_*``
flags, concatenated in sentence-transformers' order), Dense layers (``config.json`` and
``model.safetensors`` in the module's folder; ``activation_function`` a torch.nn class,
Tanh when absent; ``use_residual`` adds the input, projected by ``residual.weight`` when
the widths differ) and Normalize, each only when listed; a Dense or Normalize on another
feature than the sentence embedding (``module_input_name``) is refused. A folder without
``modules.json`` gets sentence-transformers' own default for a Hugging Face encoder:
mean pooling, no Normalize. Prompts (``config_sentence_transformers.json`` ``prompts``
and ``default_prompt_name``) are chosen as ``encode`` chooses them (``read_prompt``); a
Pooling's ``include_prompt = false`` leaves the prompt's tokens out. Anything else
(another module type, a Dense layer stored as a PyTorch pickle) is one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..core.pooling import ACTIVATIONS, POOLING_MODES, Dense, Normalize, Pipeline, Pool
from ..errors import InputError

BUILT = ("Transformer", "Pooling", "Dense", "Normalize")
_LEGACY = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
           "pooling_mode_mean_tokens": "mean",
           "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
           "pooling_mode_weightedmean_tokens": "weightedmean",
           "pooling_mode_lasttoken": "lasttoken"}  # in sentence-transformers' order
DEFAULT_SOURCE = ("no modules.json: sentence-transformers' default for a Hugging Face"
                  " encoder (mean pooling, no Normalize)")


def _json(path: Path) -> Any:
    """The JSON document in a module file, read as ``safefile.read_json`` reads (regular
    files only, size-bounded): InputError (one line) otherwise."""
    from .safefile import read_json

    try:
        return read_json(path, "sentence-transformers module file")
    except OSError as err:
        raise InputError(f"'{path}' cannot be read: {err.strerror}") from None


SENTENCE = "sentence_embedding"  # the feature a module must read and write to be built


def _on_sentence(config: dict, path: Path, kind: str) -> None:
    """A Dense or Normalize module that reads or writes another feature than the pooled
    sentence embedding (``module_input_name``/``module_output_name``: token embeddings
    of a multi-vector model, or a side output) would leave /output/pooled as it is in
    sentence-transformers: refused in one line rather than applied to it."""
    for key in ("module_input_name", "module_output_name"):
        value = config.get(key)
        if value is not None and value != SENTENCE:
            raise InputError(f"'{path}': {kind} {key} = {value!r}; mpiattn builds {kind}"
                             f" modules on '{SENTENCE}' only")


def pipeline_files(folder: Path) -> list[Path]:
    """Every file of the modules ``folder``'s ``modules.json`` lists that the pipeline
    reads: each module's ``config.json`` and a Dense module's ``model.safetensors``
    (those that exist: ``read_pipeline`` says what is missing). [] without a readable
    listing. The pre-flight digests them: a Dense layer that differs on one rank, or was
    edited between a kill and ``--resume``, changes every row it pools. (What travels
    into checkpoints and exports is ``hf.module_files``: the Dense files only.)"""
    listing = folder / "modules.json"
    try:
        entries = _json(listing) if listing.is_file() else []
    except InputError:
        return []  # read_pipeline names what is wrong with it
    out = []
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or str(entry.get("type", "")).endswith(".Transformer"):
            continue
        path = folder / str(entry.get("path", ""))
        for name in ("config.json", "model.safetensors"):
            if os.path.lexists(path / name) and path / name not in out:
                out.append(path / name)
    return out


def read_pipeline(folder: Path, prompt_name: str = "") -> Pipeline:
    """The modules after the Transformer in ``folder`` (see the module docstring), with
    the prompt named ``prompt_name`` (``input.prompt``; "" = the folder's
    ``default_prompt_name``, if any)."""
    prompt, name = read_prompt(folder, prompt_name)
    pipe = _modules(folder)
    pipe.prompt, pipe.prompt_name = prompt, name
    return pipe


def _modules(folder: Path) -> Pipeline:
    listing = folder / "modules.json"
    if not listing.is_file():
        return Pipeline([Pool(("mean",))], DEFAULT_SOURCE)
    entries = _json(listing)
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise InputError(f"'{listing}' must be a JSON list of modules")
    kinds = [str(e.get("type", "")).rsplit(".", 1)[-1] for e in entries]
    other = [k for k in kinds if k not in BUILT]
    if other:
        raise InputError(f"'{listing}': module '{other[0]}' is not built; mpiattn runs"
                         f" {', '.join(BUILT)}")
    if kinds[:2] != ["Transformer", "Pooling"] or kinds.count("Transformer") != 1 \
            or kinds.count("Pooling") != 1:
        raise InputError(f"'{listing}': modules {' > '.join(kinds)}; mpiattn runs a"
                         " Transformer, one Pooling, then Dense and Normalize modules")
    steps: list[Any] = []
    for entry, kind in zip(entries[1:], kinds[1:], strict=True):
        path = folder / str(entry.get("path", ""))
        if kind == "Pooling":
            steps.append(_pooling(path / "config.json"))
        elif kind == "Dense":
            steps.append(_dense(path))
        else:
            config = _json(path / "config.json") if (path / "config.json").is_file() else {}
            _on_sentence(config if isinstance(config, dict) else {}, path / "config.json",
                         "Normalize")
            steps.append(Normalize())
    return Pipeline(steps, "modules.json")


def read_prompt(folder: Path, name: str = "") -> tuple[str, str]:
    """(prompt text, its name) that ``SentenceTransformer(folder).encode(lines,
    prompt_name=name or None)`` puts before every line: ``prompts[name]``, else the
    ``default_prompt_name``'s, else none (("", "")). An empty prompt is none.

    Raises InputError (one line): ``name`` (or the default) is not among the folder's
    ``config_sentence_transformers.json`` prompts (ConfigError for ``input.prompt``), or
    the file's prompts are not a table of strings.
    """
    path = folder / "config_sentence_transformers.json"
    config = _json(path) if path.is_file() else {}
    if not isinstance(config, dict):
        raise InputError(f"'{path}' must hold a JSON object")
    prompts = config.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(
            isinstance(k, str) and isinstance(v, str | None) for k, v in prompts.items()):
        raise InputError(f"'{path}': prompts must map names to strings")
    listed = ", ".join(repr(k) for k in prompts) or "none"
    if name:
        if name not in prompts:
            from ..errors import ConfigError

            raise ConfigError(f"input.prompt = {name!r} is not a prompt of '{folder}'"
                              f" (config_sentence_transformers.json prompts: {listed})")
    else:
        name = config.get("default_prompt_name") or ""
        if not isinstance(name, str) or (name and name not in prompts):
            raise InputError(f"'{path}': default_prompt_name = {name!r} is not one of its"
                             f" prompts ({listed})")
    text = prompts.get(name) or "" if name else ""
    return text, name if text else ""


def _pooling(path: Path) -> Pool:
    config = _json(path) if path.is_file() else None
    if not isinstance(config, dict):
        raise InputError(f"'{path}' is missing or not a JSON object: the Pooling module"
                         " listed in modules.json needs it")
    modes = config.get("pooling_mode")
    if modes is None:
        modes = [mode for key, mode in _LEGACY.items() if config.get(key)] or ["mean"]
    if not isinstance(modes, str | list):
        raise InputError(f"'{path}': pooling_mode = {modes!r}; a mode name or a list of them"
                         f" ({', '.join(POOLING_MODES)})")
    modes = [modes] if isinstance(modes, str) else modes
    wrong = [m for m in modes if m not in POOLING_MODES]
    if wrong or not modes:
        raise InputError(f"'{path}': pooling mode {wrong[0] if wrong else modes!r} is not"
                         f" built; mpiattn pools {', '.join(POOLING_MODES)}")
    dim = config.get("word_embedding_dimension", config.get("embedding_dimension"))
    return Pool(tuple(modes), dim if isinstance(dim, int) else None,
                bool(config.get("include_prompt", True)))  # as `if not include_prompt`


def _dense(path: Path) -> Dense:
    from .tensorfile import TensorFile

    config = _json(path / "config.json") if (path / "config.json").is_file() else None
    if not isinstance(config, dict):
        raise InputError(f"'{path / 'config.json'}' is missing or not a JSON object: the"
                         " Dense module listed in modules.json needs it")
    name = str(config.get("activation_function", "torch.nn.modules.activation.Tanh"))
    activation = name.rsplit(".", 1)[-1].lower()
    if not name.startswith("torch.") or activation not in ACTIVATIONS:
        raise InputError(f"'{path / 'config.json'}': activation_function {name!r} is not"
                         f" built; mpiattn runs torch.nn {', '.join(ACTIVATIONS)}")
    _on_sentence(config, path / "config.json", "Dense")
    weights = path / "model.safetensors"
    if not weights.is_file():
        bin_ = path / "pytorch_model.bin"
        raise InputError(f"'{weights}' is missing" + (
            f"; '{bin_}' is a PyTorch pickle, which mpiattn does not read: convert it to"
            " safetensors" if bin_.is_file() else ": the Dense module needs its weights"))
    f = TensorFile(weights)
    fan_in, fan_out = config.get("in_features"), config.get("out_features")
    if "linear.weight" not in f:
        raise InputError(f"'{weights}': tensor 'linear.weight' is missing")
    if f.shape("linear.weight") != (fan_out, fan_in):
        raise InputError(f"'{weights}': tensor 'linear.weight' has shape"
                         f" {f.shape('linear.weight')}, config.json says"
                         f" ({fan_out}, {fan_in})")
    bias = None
    if config.get("bias", True):
        if "linear.bias" not in f:
            raise InputError(f"'{weights}': tensor 'linear.bias' is missing")
        bias = f.read("linear.bias")
    residual, residual_w = bool(config.get("use_residual", False)), None
    if residual and fan_in != fan_out:  # projected through a Linear without bias
        if "residual.weight" not in f or f.shape("residual.weight") != (fan_out, fan_in):
            raise InputError(f"'{weights}': use_residual with in_features {fan_in} !="
                             f" out_features {fan_out} needs tensor 'residual.weight' of"
                             f" shape ({fan_out}, {fan_in})")
        residual_w = np.ascontiguousarray(f.read("residual.weight").T)
    return Dense(np.ascontiguousarray(f.read("linear.weight").T), bias, activation,
                 residual, residual_w)


def sentence_pipeline(weights: str, hidden: int, prompt_name: str = "") -> Pipeline:
    """The pipeline of ``model.weights`` (its model folder) for a model of ``hidden``
    units, with the prompt ``prompt_name`` (``input.prompt``), or mpiattn's default for
    seeded weights (mean pooling, Normalize) when ``weights`` is empty. InputError (one
    line) as ``read_pipeline`` and ``check_width``; ConfigError for a prompt name without
    a folder or not in it."""
    from ..core.pooling import default_pipeline
    from .weights import model_folder

    if not weights:
        if prompt_name:
            from ..errors import ConfigError

            raise ConfigError(f"input.prompt = {prompt_name!r} names a prompt of a model"
                              " folder's config_sentence_transformers.json: set"
                              " model.weights, or remove input.prompt")
        return default_pipeline()
    folder = model_folder(weights)
    pipe = read_pipeline(folder, prompt_name)
    check_width(pipe, folder, hidden)
    return pipe


def check_width(pipe: Pipeline, folder: Path, hidden: int) -> None:
    """Each Dense's ``in_features`` fits what the modules before it give (where
    sentence-transformers would fail in its matrix product)."""
    width = hidden
    for step in pipe.steps:
        if isinstance(step, Dense):
            if step.w.shape[0] != width:
                raise InputError(f"'{folder}': a Dense module takes {step.w.shape[0]} inputs,"
                                 f" the modules before it give {width}")
            width = step.w.shape[1]
        elif isinstance(step, Pool):  # its word_embedding_dimension is not checked:
            width *= len(step.modes)    # sentence-transformers pools whatever comes
