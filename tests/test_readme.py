"""The README and docs point at things that exist: files, modules, links."""

import importlib.util
import re

import pytest

from tests.helpers import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PATH = re.compile(r"(?<![\w/.-])((?:experiments|docs|notebooks|benchmarks|tests)/[\w./{},*-]+)")
MODULE = re.compile(r"python -m ([\w.]+)")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _expand(path: str) -> list[str]:
    """``a/{b,c}.yaml`` -> ``[a/b.yaml, a/c.yaml]``."""
    match = re.search(r"\{([^}]*)\}", path)
    if not match:
        return [path]
    head, tail = path[: match.start()], path[match.end():]
    return [p for alt in match.group(1).split(",") for p in _expand(head + alt + tail)]


def _paths(text: str) -> set[str]:
    found = set()
    for raw in PATH.findall(text):
        raw = raw.rstrip(".,")
        if any(part in raw for part in ("version_N", "<", "N.")):
            continue
        found.update(_expand(raw))
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_mentioned_paths_exist(doc):
    missing = [p for p in sorted(_paths(doc.read_text()))
               if not (list(REPO.glob(p)) if "*" in p else (REPO / p).exists())]
    assert not missing, f"{doc.name} mentions missing paths: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_python_m_modules_exist(doc):
    modules = set(MODULE.findall(doc.read_text()))
    missing = [m for m in sorted(modules) if importlib.util.find_spec(m) is None]
    assert not missing, f"{doc.name}: python -m of missing modules {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    links = [link for link in LINK.findall(doc.read_text()) if "://" not in link]
    missing = [link for link in links if not (doc.parent / link).exists()]
    assert not missing, f"{doc.name} links to missing files: {missing}"
