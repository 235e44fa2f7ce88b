"""The run file (``mpiattn run``), padded and text input alike: its writer
(``write_run``, ``write_heads``), its reader (``RunFile``, what ``mpiattn.open`` returns)
and what ``verify`` checks it holds (``promised``). A text run's own datasets are added by
``formats.textrun``; its rows are read by the same ``RunFile`` (``ragged``).

Layout (docs, "Files"): ``/input`` (tokens, attention_mask or offsets, token_type_ids,
text), ``/layers/NN/{attention,hidden}`` (batch, seq, hidden_unit), ``/output/pooled``
(batch | line, hidden_unit), ``/timings`` (rank, layer, phase) seconds, ``/heads``,
``/checksum/collectives``; provenance from ``formats.common``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import InputError
from .. import h5io, h5safe
from .checks import count_attr, need
from .common import PHASES, finish, write_phase_seconds, write_records
from .reading import (
    MAX_READ_BYTES,
    File,
    Labelled,
    Lazy,
    Missing,
    _array,
    _guarded,
    integer,
    scalar,
)

if TYPE_CHECKING:
    import xarray

    from ...config import Config
    from ...core.headstats import HeadResults


@dataclass
class RunData:
    """What a padded run file holds besides provenance, as plain values on rank 0."""

    tokens: np.ndarray  # (batch, seq) int64
    mask: np.ndarray  # (batch, seq) bool, True on real tokens
    types: np.ndarray | None  # (batch, seq) int64 token types; None when the input had none
    text: list[str] | None  # (batch,) the sentences of text input
    layers: dict[tuple[int, str], np.ndarray]  # (layer, "attention" | "hidden") -> (batch,
    # seq, hidden) gathered on rank 0; empty when the replicas wrote them (mpio)
    pooled: np.ndarray | None  # (batch, width) gathered on rank 0 (text input)
    seconds: np.ndarray  # (rank, layer, phase) s
    totals: np.ndarray  # (rank, 4): forward, setup, total s; peak memory bytes
    records: list  # (replica, transfers.Record) of every checked transfer
    phases: tuple[str, ...] = PHASES
    heads: HeadResults | None = None


def write_run(f: Any, cfg: Config, r: RunData) -> None:
    """Everything of a padded run after the provenance: inputs, kept layers, pooled output
    and its modules, timings, peak memory, records, per-head statistics; then ``status``."""
    comp = cfg.output.compression
    inp = f.create_group("input")
    h5io.write_array(inp, "tokens", r.tokens, ("batch", "seq"), comp, digest=True)
    h5io.write_array(inp, "attention_mask", r.mask.astype(np.uint8), ("batch", "seq"),
                     comp, digest=True)
    if r.types is not None:  # only when the input had them (absent: all 0)
        h5io.write_array(inp, "token_type_ids", r.types, ("batch", "seq"), comp, digest=True)
    if r.text is not None:
        h5io.write_array(inp, "text", list(r.text), ("batch",)).attrs[
            h5io.DIGEST_ATTR] = h5io.text_sha256(r.text)
    if r.pooled is not None and r.text is not None:
        h5io.write_array(f.require_group("output"), "pooled", r.pooled,
                         ("batch", "hidden_unit"), comp, digest=True)
    for (layer, name), array in sorted(r.layers.items()):
        g = f.require_group(h5io.layer_group(layer))
        h5io.write_array(g, name, array, ("batch", "seq", "hidden_unit"), comp, digest=True)
    written_in_parallel = [d for d in ("output/pooled", "layers") if d in f and not r.layers]
    for top in written_in_parallel:  # label and digest what the replicas wrote (mpio)
        h5io.label_and_digest(f[top])
    if "output/pooled" in f:
        from ..stmodules import sentence_pipeline

        pipe = sentence_pipeline(cfg.model.weights, cfg.model.hidden)
        f["output/pooled"].attrs.update({
            "description": "the last layer through the model's sentence-transformers modules",
            "modules": pipe.describe(), "modules_source": pipe.source})
    t = f.create_group("timings")
    write_phase_seconds(t, r.seconds, ("rank", "layer", "phase"), r.phases)
    for i, name in enumerate(("forward", "setup", "total")):
        h5io.write_array(t, name, r.totals[:, i], ("rank",), units="s")
    h5io.write_array(f["ranks"], "peak_memory", r.totals[:, 3].astype(np.int64), ("rank",),
                     units="bytes", description="peak RSS (CPU) or CuPy pool total (GPU)")
    if r.records:
        write_records(f, r.records)
    if r.heads is not None:
        write_heads(f, r.heads, comp)
    finish(f)


HEADS_DEFINITION = (
    "Clark et al. 2019, 'What Does BERT Look At?': for query token i of a head, with p_ij"
    " its attention probability on key j (0 on padding keys), entropy H_i = -sum_j p_ij"
    " ln p_ij and distance D_i = sum_j p_ij |i - j| (token positions); each (layer, head)"
    " value is the mean over the real query tokens of every sequence of the run")


def write_heads(f: Any, r: HeadResults, compression: str = "none") -> None:
    """``/heads``: entropy and distance (layer, head) float64 means (``output.head_stats``),
    and the attention probabilities of the chosen sequences (``output.attention_maps``)."""
    g = f.create_group("heads")
    g.attrs["definition"] = HEADS_DEFINITION
    if r.entropy is not None and r.distance is not None:
        g.attrs["query_tokens"] = r.query_tokens
        h5io.write_array(g, "entropy", r.entropy, ("layer", "head"), digest=True,
                         units="1", long_name="mean attention entropy in nats",
                         description="mean attention entropy over real query tokens:"
                         " -sum_j p_ij ln p_ij (natural logarithm: nats)")
        h5io.write_array(g, "distance", r.distance, ("layer", "head"), digest=True,
                         units="1", long_name="mean attention distance in token positions",
                         description="mean attention distance over real query tokens:"
                         " sum_j p_ij |i - j| (token positions)")
    if r.maps is not None:
        rows = np.array(r.sequences, dtype=np.int64)
        h5io.write_array(g, "sequences", rows, ("sequence",), digest=True,
                         coords={"sequence": rows},
                         description="row of /input/tokens of each map")
        h5io.write_array(g, "maps", r.maps, ("sequence", "layer", "head", "query", "key"),
                         compression, digest=True, units="1",
                         description="attention probabilities p_ij (rows sum to 1; 0 on"
                         " padding keys; padding query rows attend to the real keys)")



class RunFile(File):
    """A file of ``mpiattn run``: inputs, kept layer states, pooled embeddings, timings,
    checksum records, per-head statistics.

    Padded input: (batch, seq[, hidden]) rows. Text input (``ragged``): every
    (token, ...) dataset holds all lines' real tokens concatenated; ``rows(i)`` is line
    i's slice, e.g. ``f.layer(5)[f.rows(i)]``.
    """

    kind = "run"

    @property
    @_guarded
    def pooled(self) -> Lazy | None:
        """/output/pooled (batch | line, width): the output of the model's
        sentence-transformers modules (attrs ``modules``, ``modules_source``)."""
        return self._lazy("output/pooled")

    @property
    @_guarded
    def ids(self) -> Lazy | None:
        """/input/id (line,) of a text run with ``input.id_field``: each record's id, ``str``
        or int64, row i of ``pooled`` (None without ids): ``dict(zip(f.ids[:], f.pooled[:]))``."""
        return self._lazy("input/id")

    @property
    @_guarded
    def text(self) -> Lazy | None:
        """/input/text (line,) of a text run: each record's text as stored (stripped)."""
        return self._lazy("input/text")

    @property
    @_guarded
    def tokens(self) -> Lazy | None:
        """/input/tokens: (batch, seq) padded, or (token,) of a text run."""
        return self._lazy("input/tokens")

    @property
    @_guarded
    def layers(self) -> list[int]:
        """Indices of the layers whose states the file keeps (/layers/NN)."""
        import h5py

        group = self.h5.get("layers")
        if group is None:
            return []
        if not isinstance(group, h5py.Group):
            raise InputError(f"/layers is not a group: {h5safe.NOT_OURS}")
        return sorted(int(k) for k in group if k.isdigit())

    @_guarded
    def layer(self, index: int, name: str = "hidden") -> Lazy:
        """/layers/NN/``name`` ("hidden": the layer's output; "attention": its attention
        block's output) of layer ``index`` (negative: from the last kept one)."""
        kept = self.layers
        if index < 0 and kept:
            index = kept[index] if -index <= len(kept) else index
        dataset = f"layers/{index:02d}/{name}"
        if dataset not in self.h5:
            raise Missing(f"'{dataset}' is not in {self.path} (kept layers: {kept}; set"
                           " output.layers to keep more)")
        return self[dataset]

    @property
    def ragged(self) -> bool:
        """True for a text run: rows are lines of different lengths (/input/offsets)."""
        self._check_open()
        return "input/offsets" in self.h5

    @functools.cached_property
    def offsets(self) -> np.ndarray | None:
        """/input/offsets (line + 1,) int64 of a text run (None for padded input)."""
        return self._offsets()

    @_guarded
    def _offsets(self) -> np.ndarray | None:
        if "input/offsets" not in self.h5:
            return None
        edges = h5safe.read(self.h5["input/offsets"], MAX_READ_BYTES)
        if edges.ndim != 1 or edges.dtype.kind not in "iu" or np.any(np.diff(edges) < 0):
            raise InputError("/input/offsets is not a rising (line + 1,) integer array")
        return edges.astype(np.int64)

    def rows(self, line: int) -> slice:
        """Line ``line``'s rows of the (token, ...) datasets of a text run."""
        edges = self.offsets
        if edges is None:
            raise ValueError(f"'{self.path}' holds padded (batch, seq) input: index rows"
                             " directly")
        if not 0 <= line < len(edges) - 1:
            raise IndexError(f"line {line} of {len(edges) - 1} in '{self.path}'")
        return slice(int(edges[line]), int(edges[line + 1]))

    @_guarded
    def head_stats(self, raw: bool = False) -> dict[str, Labelled | xarray.DataArray] | None:
        """/heads/entropy [nats] and /heads/distance [tokens], (layer, head) means over
        the real query tokens (``output.head_stats``); None when the file has none."""
        out: dict[str, Labelled | xarray.DataArray] = {}
        for name in ("entropy", "distance"):
            lab = self._labelled(f"heads/{name}", (2,))
            if lab is not None:
                if 0 in lab.values.shape:
                    raise InputError(f"/heads/{name} has shape {lab.values.shape}: it holds no"
                                     " heads")
                out[name] = _array(lab, raw)
        shapes = {np.shape(v.values) for v in out.values()}
        if len(shapes) > 1:
            raise InputError(f"/heads/entropy and /heads/distance have shapes {sorted(shapes)}")
        return out or None

    @property
    @_guarded
    def query_tokens(self) -> int | None:
        """The real query tokens the /heads statistics average over (None without them)."""
        group = self.h5.get("heads")
        value = h5safe.attr(group, "query_tokens") if group is not None else None
        return None if value is None else integer(scalar(value, "query_tokens"),
                                                  "attribute 'query_tokens' of /heads", 0)

    @property
    @_guarded
    def attention_maps(self) -> Lazy | None:
        """/heads/maps (sequence, layer, head, query, key) attention probabilities."""
        return self._lazy("heads/maps")


def promised(f: Any, config: dict | None) -> list[str]:
    """What a run file (padded or text) promises by its ``config``: inputs, kept layers,
    pooled output, per-head statistics, records. One line per problem (``verify``)."""
    if config is None:
        return ["root attribute 'config' is missing or not TOML: cannot tell which layers"
                " the file should hold"]
    problems: list[str] = []

    def section(key: str) -> dict:
        value = config.get(key, {})
        return value if isinstance(value, dict) else {}

    text = section("input").get("text", "")
    streamed = isinstance(text, str) and bool(text)  # ragged rows (``corpusfile``)
    for name in ("input/tokens", "input/offsets" if streamed else "input/attention_mask"):
        need(f, name, problems, digest=True)

    layers, keep = section("model").get("layers"), section("output").get("layers", "all")
    if not isinstance(layers, int) or isinstance(layers, bool) or not 1 <= layers <= 10**6:
        problems.append(f"config model.layers is {layers!r}, not a layer count")
    elif keep not in ("all", "last", "none"):
        problems.append(f"config output.layers is {keep!r}, not 'all', 'last' or 'none'")
    else:
        kept = {"all": range(layers), "last": [layers - 1], "none": []}[keep]
        why = f" (output.layers = '{keep}', model.layers = {layers})"
        if kept and "layers" not in f:
            problems.append(f"group /layers is missing{why}")
        else:
            for index in kept:
                group = h5io.layer_group(index)
                if group not in f:
                    problems.append(f"group /{group} is missing{why}")
                    continue
                for name in ("attention", "hidden"):
                    need(f, f"{group}/{name}", problems, digest=True, why=why)
    if streamed:
        need(f, "output/pooled", problems, digest=True,
              why=f" (input.text = '{text}' promises pooled embeddings)")
    output = section("output")
    if output.get("head_stats") is True:
        for name in ("heads/entropy", "heads/distance"):
            need(f, name, problems, digest=True, why=" (output.head_stats = true)")
    maps = output.get("attention_maps")
    if isinstance(maps, list) and maps:
        why = f" (output.attention_maps = {maps})"
        need(f, "heads/sequences", problems, digest=True, why=why)
        if (need(f, "heads/maps", problems, digest=True, why=why)
                and f["heads/maps"].shape[:1] != (len(maps),)):
            problems.append(f"/heads/maps has shape {f['heads/maps'].shape}, not one map per"
                            f" sequence of output.attention_maps = {maps}")
    check = section("checksum")
    tensor = count_attr(f, "tensor_parallel", [], required=False) or 1
    stages = count_attr(f, "pipeline_parallel", [], required=False) or 1
    resumed_whole = streamed and str(h5safe.attr(f, "checksum_records", "")).startswith(
        "none: ")  # a --resume that found every chunk done ran no collective
    if check.get("mode", "abft") == "abft" and (tensor > 1 or stages > 1) \
            and not resumed_whole:
        need(f, "checksum/collectives", problems,
              why=f" (checksum.mode = 'abft' with tensor_parallel = {tensor},"
              f" pipeline_parallel = {stages} records every checked transfer)")
    return problems
