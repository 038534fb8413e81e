"""Builds the notebooks (``notebooks/*.ipynb``, without outputs) from their sources.

Each notebook is written as a percent-format script in ``notebooks/src/NAME.py``: a line
``# %%`` starts a code cell, ``# %% [markdown]`` a markdown cell whose lines are comments
(``# `` is stripped). In a code cell, a commented IPython magic (``# %matplotlib inline``)
becomes the magic; comment lines before the first marker are a header left out of the
notebook. Sources diff, lint and review like code; the .ipynb files are what users open.
After editing a source, run::

    .venv/bin/python notebooks/build.py

``tests/test_notebooks.py`` checks that every .ipynb matches its source, then executes it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.notebooknode import NotebookNode

HERE = Path(__file__).resolve().parent
SOURCES = HERE / "src"
CODE, MARKDOWN = "# %%", "# %% [markdown]"
METADATA = {
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}


def _markdown_line(line: str, source: Path) -> str:
    if line.strip() in ("", "#"):
        return ""
    if not line.startswith("# "):
        raise ValueError(f"{source}: markdown cells hold '# ' comment lines only, got {line!r}")
    return line[2:]


def _code_line(line: str) -> str:
    """A commented magic (``# %name ...``, not a cell marker) becomes the magic itself."""
    if line.startswith("# %") and not line.startswith(CODE):
        return line[2:]
    return line


def split_cells(text: str, source: Path) -> list[tuple[str, str]]:
    """``(kind, source)`` of every cell of a percent-format script."""
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.strip() in (CODE, MARKDOWN):
            cells.append(("markdown" if line.strip() == MARKDOWN else "code", []))
        elif not cells:  # a header (lint settings) that is not part of the notebook
            if line.strip() and not line.startswith("#"):
                raise ValueError(f"{source}: code before the first '# %%' cell marker: {line!r}")
        elif cells[-1][0] == "markdown":
            cells[-1][1].append(_markdown_line(line, source))
        else:
            cells[-1][1].append(_code_line(line))
    return [(kind, "\n".join(lines).strip("\n")) for kind, lines in cells]


def build(source: Path) -> NotebookNode:
    """The notebook of one source; cell ids are stable (``NAME-INDEX``) so rebuilds diff clean."""
    cells = []
    for i, (kind, text) in enumerate(split_cells(source.read_text(), source)):
        make = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        cells.append(make(text, id=f"{source.stem}-{i:02d}"))
    notebook = nbformat.v4.new_notebook(cells=cells, metadata=METADATA)
    nbformat.validate(notebook)
    return notebook


def render(source: Path) -> str:
    """The .ipynb text of one source, exactly as written to disk."""
    return nbformat.writes(build(source)) + "\n"


def main() -> int:
    for source in sorted(SOURCES.glob("*.py")):
        target = HERE / f"{source.stem}.ipynb"
        target.write_text(render(source))
        print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
