"""MkDocs hook: pages in docs/ that mkdocs.yml's nav does not list are added under "More".

A helper that adds ``docs/topic.md`` then sees it in the site at once; moving it to its
place in the nav is an edit of mkdocs.yml. Missing pages named in the nav still fail the
strict build (MkDocs' own check).
"""

from __future__ import annotations

from typing import Any


def _listed(nav: Any) -> set[str]:
    """Every page path named anywhere in a nav (nested lists and one-key dicts)."""
    if isinstance(nav, str):
        return {nav}
    if isinstance(nav, dict):
        return set().union(*(_listed(v) for v in nav.values()))
    if isinstance(nav, list):
        return set().union(*(_listed(v) for v in nav))
    return set()


def on_files(files: Any, config: Any) -> Any:
    """Append the unlisted Markdown pages (sorted by path) to the nav as "More"."""
    nav = config["nav"]
    if nav is None:
        return files
    listed = _listed(nav)
    extra = sorted(f.src_uri for f in files.documentation_pages()
                   if f.src_uri not in listed)
    if extra:
        nav.append({"More": extra})
    return files
