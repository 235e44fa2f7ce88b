#!/usr/bin/env python3
"""Build a small English text corpus from Python standard-library docstrings.

The corpus is used for masked-language-model training of the toy models in
this project.  It is produced deterministically from the standard library of
the *running* interpreter (record its version in ``corpus/SOURCE.md``):

* modules are enumerated with ``pkgutil.iter_modules`` over the stdlib
  directory (recursing into packages) plus the public built-in and
  ``lib-dynload`` extension modules, in sorted order;
* test packages, ``idlelib``, ``tkinter``, ``turtledemo``, ``lib2to3``,
  ``ensurepip``, ``site-packages`` and private modules (leading underscore)
  are skipped;
* per module, in this order:
  1. the module, class and function docstrings of its source, taken with
     ``ast`` + ``ast.get_docstring`` (which applies ``inspect.cleandoc``);
  2. the docstrings ``pydoc`` would show for its public names, taken with
     ``inspect.getdoc`` after importing it (this covers C implementations
     such as ``math`` or the ``_io`` classes re-exported by ``io``);
     a few modules with import side effects are never imported;
  3. runs of full-line ``#`` comments of its source (``--no-comments`` to
     leave them out);
* then the help-topic texts of ``pydoc`` (``pydoc_data.topics``);
* texts are split into paragraphs on blank lines, whitespace is normalised,
  code-like paragraphs (doctests, grammar rules, tables, indented blocks,
  commented-out code) are dropped, long paragraphs are split at sentence
  boundaries into chunks of at most ``MAX_CHARS`` characters, and exact
  duplicates are removed (first occurrence wins);
* about 5% of the paragraphs go to ``heldout.txt``, chosen by a SHA-1 hash of
  the text (not at random), the rest to ``train.txt``; one paragraph per line,
  UTF-8, ``\\n`` line endings.

The output does not depend on ``PYTHONHASHSEED`` or the working directory,
only on the interpreter's standard library.

Usage::

    python data/make_corpus.py            # writes data/corpus/{train,heldout}.txt
    python data/make_corpus.py --out DIR
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import importlib
import inspect
import io
import os
import pkgutil
import re
import sys
import sysconfig
import tokenize
import warnings

MIN_CHARS = 40
MIN_WORDS = 6
MAX_CHARS = 400
HELDOUT_MODULUS = 20  # 1 in 20 -> ~5%

SKIP_TOP = {
    "idlelib",
    "tkinter",
    "turtledemo",
    "test",
    "tests",
    "lib2to3",  # mostly grammar/fixer boilerplate, deprecated
    "ensurepip",
    "site-packages",
    "dist-packages",
    "this",
    "antigravity",
}
# Never imported (side effects on import, or they drag in a GUI); their
# source docstrings are still read with ``ast`` unless skipped above.
NO_IMPORT = {
    "antigravity",
    "this",
    "turtle",
    "webbrowser",
    "pydoc_data",
    "__main__",
    "__hello__",
    "__phello__",
}
SKIP_ANY = {"test", "tests", "idle_test", "site-packages"}

_WS = re.compile(r"\s+")
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")
_CODEY = re.compile(
    r"(>>>|^\s*\.\.\. |\s::=\s|^\s*[-=*~^+]{3,}|\{\s*$|^\s*[-+]\w|^\s*:\w+:|=>|\w->|\)\s*->)",
    re.M,
)


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def iter_module_files(root: str):
    """Yield (dotted_name, path) for stdlib modules, deterministic order."""

    def walk(path: str, prefix: str, depth: int):
        infos = sorted(pkgutil.iter_modules([path]), key=lambda m: m.name)
        for info in infos:
            name = info.name
            if name.startswith("_"):
                continue
            if depth == 0 and name in SKIP_TOP:
                continue
            if name in SKIP_ANY or name.startswith("test_"):
                continue
            full = os.path.join(path, name)
            dotted = prefix + name
            if info.ispkg:
                init = os.path.join(full, "__init__.py")
                if os.path.isfile(init):
                    yield dotted, init
                yield from walk(full, dotted + ".", depth + 1)
            else:
                file = full + ".py"
                yield dotted, (file if os.path.isfile(file) else None)

    yield from walk(root, "", 0)


def iter_modules(root: str):
    """Public stdlib modules: pure-Python ones plus built-in/extension ones.

    Yields (dotted_name, source_path_or_None) sorted by name.
    """
    mods = dict(iter_module_files(root))
    dynload = os.path.join(root, "lib-dynload")
    extra = set(sys.builtin_module_names)
    if os.path.isdir(dynload):
        extra |= {m.name for m in pkgutil.iter_modules([dynload])}
    for name in extra:
        if not name.startswith("_") and name not in SKIP_TOP and name not in mods:
            mods[name] = None
    for name in sorted(mods):
        yield name, mods[name]


def docstrings_of(path: str):
    """Yield docstrings of the module and its classes/functions, source order."""
    try:
        with open(path, "rb") as fh:
            src = fh.read()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(src, filename=path)
    except (SyntaxError, ValueError, OSError):
        return
    nodes = [tree] + [
        n
        for n in ast.walk(tree)
        if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    # ast.walk is breadth-first; sort by position for a stable, readable order
    nodes[1:] = sorted(nodes[1:], key=lambda n: (n.lineno, n.col_offset))
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield doc


def comment_blocks(path: str):
    """Runs of consecutive full-line ``#`` comments, one block per run.

    Comments are not docstrings, but the explanatory ones are plain English
    prose under the same licence; commented-out code is removed by the
    prose filter like any other code-like paragraph.
    """
    try:
        with open(path, "rb") as fh:
            toks = list(tokenize.tokenize(fh.readline))
    except (tokenize.TokenError, SyntaxError, OSError):
        return
    cur: list[str] = []
    last = -2
    for tok in toks:
        if tok.type != tokenize.COMMENT or not tok.line.lstrip().startswith("#"):
            continue
        text = tok.string.lstrip("#").strip()
        if tok.start[0] != last + 1 or not text:
            if cur:
                yield "\n".join(cur)
            cur = []
        if text and not text.startswith("!"):  # skip shebang / coding lines
            cur.append(text)
        last = tok.start[0]
    if cur:
        yield "\n".join(cur)


def _public_names(obj):
    names = getattr(obj, "__all__", None)
    if not isinstance(names, (list, tuple)):
        names = [n for n in vars(obj) if not n.startswith("_")]
    return sorted({n for n in names if isinstance(n, str)})


def runtime_docstrings(name: str):
    """Docstrings that pydoc would show for *name* (imports the module).

    Covers objects implemented in C (e.g. ``math``, ``itertools``, or the
    ``_io`` classes re-exported by ``io``), which the ``ast`` pass misses.
    """
    if name in NO_IMPORT or name.split(".")[0] in NO_IMPORT:
        return
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            mod = importlib.import_module(name)
    except BaseException:  # ImportError, SystemExit, ...
        return
    doc = inspect.getdoc(mod)
    if doc:
        yield doc
    for attr in _public_names(mod):
        obj = getattr(mod, attr, None)
        if not (inspect.isroutine(obj) or inspect.isclass(obj)):
            continue
        doc = inspect.getdoc(obj)
        if doc:
            yield doc
        if inspect.isclass(obj):
            for sub in sorted(vars(obj)):
                if sub.startswith("_"):
                    continue
                member = vars(obj)[sub]
                doc = getattr(member, "__doc__", None)
                if isinstance(doc, str) and not isinstance(member, (str, int, float, type(None))):
                    yield inspect.cleandoc(doc)


def topic_texts():
    """The help-topic texts that ``pydoc`` shows (``help('TOPIC')``)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return
    for key in sorted(topics):
        yield topics[key]


_BULLET = re.compile(r"^\s*(?:[*\u2022-]|\d{1,2}[.)])\s+(?=\S)")


def clean_paragraph(par: str) -> str | None:
    """Return the paragraph as one normalised line, or None if it is not prose."""
    if _CODEY.search(par):
        return None
    bullet = _BULLET.match(par)
    if bullet:  # a list item is prose; its continuation lines are indented
        par = par[bullet.end() :]
    else:
        lines = par.splitlines()
        # indented blocks are usually code, grammar or option tables
        if sum(1 for ln in lines if ln.startswith("   ")) > len(lines) // 2:
            return None
    text = _WS.sub(" ", par).strip()
    if len(text) < MIN_CHARS or len(text.split()) < MIN_WORDS:
        return None
    letters = sum(c.isalpha() or c == " " for c in text)
    if letters / len(text) < 0.85:
        return None
    if not text[0].isalpha() and text[0] not in "\"'(\u201c":
        return None
    if "http://" in text or "https://" in text or "Copyright" in text:
        return None
    return text


def chunk(text: str):
    """Split a normalised paragraph into <= MAX_CHARS pieces at sentence ends."""
    if len(text) <= MAX_CHARS:
        yield text
        return
    buf = ""
    for sent in _SENT_SPLIT.split(text):
        if len(sent) > MAX_CHARS:  # run-on sentence: drop it
            if buf:
                yield buf
            buf = ""
            continue
        if buf and len(buf) + 1 + len(sent) > MAX_CHARS:
            yield buf
            buf = sent
        else:
            buf = f"{buf} {sent}" if buf else sent
    if buf:
        yield buf


def paragraphs(doc: str):
    for par in re.split(r"\n\s*\n", doc):
        text = clean_paragraph(par)
        if text is None:
            continue
        for piece in chunk(text):
            if len(piece) >= MIN_CHARS and len(piece.split()) >= MIN_WORDS:
                yield piece


def is_heldout(text: str) -> bool:
    h = hashlib.sha1(text.encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") % HELDOUT_MODULUS == 0


def main(argv=None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(here, "corpus"))
    ap.add_argument(
        "--no-comments",
        dest="comments",
        action="store_false",
        help="docstrings and pydoc topics only (about 1.25 MB instead of 1.8 MB)",
    )
    args = ap.parse_args(argv)

    root = stdlib_dir()
    seen: set[str] = set()
    train, held = [], []
    n_mod = 0

    def add(docs):
        for doc in docs:
            for par in paragraphs(doc):
                if par in seen:
                    continue
                seen.add(par)
                (held if is_heldout(par) else train).append(par)

    for name, path in iter_modules(root):
        n_mod += 1
        if path is not None:
            add(docstrings_of(path))
        add(runtime_docstrings(name))
        if path is not None and args.comments:
            add(comment_blocks(path))
    add(topic_texts())

    os.makedirs(args.out, exist_ok=True)
    for fname, rows in (("train.txt", train), ("heldout.txt", held)):
        with open(os.path.join(args.out, fname), "w", encoding="utf-8", newline="\n") as fh:
            for row in rows:
                fh.write(row + "\n")
    size = lambda rows: sum(len(r.encode()) + 1 for r in rows)  # noqa: E731
    print(
        f"python {sys.version.split()[0]} stdlib={root} modules={n_mod} "
        f"train={len(train)} lines/{size(train)} B "
        f"heldout={len(held)} lines/{size(held)} B",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
