"""Report building blocks: cells, tables, figures and sections, rendered as Markdown or HTML.

One section model feeds both renderers, so ``report.md`` and ``report.html`` show the same
tables. Every cell keeps its raw value (``data-value`` in HTML) for sorting and for tests.
"""

from __future__ import annotations

import base64
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import pandas as pd

logger = logging.getLogger(__name__)

DASH = "—"


@dataclass(frozen=True)
class Cell:
    """One table cell: the text shown and the raw value used for sorting (None: sorts last)."""

    text: str
    value: float | str | None = None
    css: str = ""


@dataclass
class Table:
    """A table with a stable ``key`` (HTML id) and an optional caption."""

    key: str
    columns: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    caption: str = ""

    def frame(self) -> pd.DataFrame:
        """Return the displayed strings as a DataFrame (one column per header)."""
        return pd.DataFrame(
            [[c.text for c in row] for row in self.rows], columns=pd.Index(self.columns)
        )


@dataclass(frozen=True)
class Figure:
    """A PNG figure: ``rel`` is its path relative to the report's folder."""

    title: str
    path: Path
    rel: str

    def data_uri(self) -> str:
        """Return the PNG as a base64 ``data:`` URI (the HTML report embeds every figure)."""
        return "data:image/png;base64," + base64.b64encode(self.path.read_bytes()).decode("ascii")


@dataclass
class Section:
    """A report section; empty sections are left out by the builders."""

    key: str
    title: str
    bullets: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    note: str = ""


# --------------------------------------------------------------------------- cells


def is_number(value: Any) -> TypeGuard[float]:
    """Tell whether ``value`` is a finite int or float (``bool`` is not a number here)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def num(value: Any, digits: int = 3, *, css: str = "num") -> Cell:
    """Make a numeric cell with ``digits`` decimals; missing or non-finite values show a dash."""
    if not is_number(value):
        return Cell(DASH, None, css)
    return Cell(f"{value:.{digits}f}", float(value), css)


def pct(value: Any, digits: int = 1) -> Cell:
    """Show a fraction as a signed percentage (``-6.8%``), keeping the raw fraction."""
    if not is_number(value):
        return Cell(DASH, None, "num")
    return Cell(f"{100 * value:+.{digits}f}%", float(value), "num")


def text(value: Any, css: str = "") -> Cell:
    """Make a text cell of ``str(value)``; None shows a dash and sorts last."""
    if value is None:
        return Cell(DASH, None, css)
    return Cell(str(value), str(value), css)


def interval(ci: Any, digits: int = 3) -> Cell:
    """Show a ``[lo, hi]`` confidence interval, sorted by its lower end."""
    if not (isinstance(ci, list | tuple) and len(ci) == 2 and all(map(is_number, ci))):
        return Cell(DASH, None, "num")
    lo, hi = ci
    return Cell(f"[{lo:.{digits}f}, {hi:.{digits}f}]", float(lo), "num")


def mean_sd(summary: dict[str, Any]) -> Cell:
    """Show ``mean ± sd`` over splits (the plain mean for one split), sorted by the mean."""
    mean = summary.get("mean")
    if not is_number(mean):
        return Cell(DASH, None, "num")
    if len(summary.get("values", [])) > 1:
        return Cell(f"{mean:.3f} ± {summary['sd']:.3f}", float(mean), "num")
    return Cell(f"{mean:.3f}", float(mean), "num")


def p_cell(p: Any, *, significant: bool | None = None) -> Cell:
    """Show a p-value (``<0.001`` below that), with ``*`` and a highlight when significant."""
    if not is_number(p):
        return Cell(DASH, None, "num")
    shown = "<0.001" if p < 0.001 else f"{p:.3f}"
    if significant:
        return Cell(f"{shown} *", float(p), "num sig")
    return Cell(shown, float(p), "num")


def is_control(entry: dict[str, Any]) -> bool:
    """Tell whether a ``metrics.json`` method entry is a random-init control."""
    return entry.get("kind") == "control"


def method_label(name: str, entry: dict[str, Any]) -> str:
    """Return the method's name; controls carry a visible ``(control)`` in every table."""
    return f"{name} (control)" if is_control(entry) else name


def method_cell(name: str, entry: dict[str, Any]) -> Cell:
    """Make the cell naming a method (sorted by its name; controls styled apart)."""
    return Cell(method_label(name, entry), name, "control" if is_control(entry) else "")


def figure_if_exists(run_dir: Path, rel: str | None, title: str) -> list[Figure]:
    """Return ``[Figure]`` when ``run_dir / rel`` is a file, else ``[]`` (and log why)."""
    if not rel:
        return []
    path = Path(run_dir) / rel
    if not path.is_file():
        logger.debug("figure %s not found; left out of the report", path)
        return []
    return [Figure(title=title, path=path, rel=Path(rel).as_posix())]


# --------------------------------------------------------------------------- Markdown


def _md_escape(value: str) -> str:
    return value.replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame) -> str:
    """Render a DataFrame's values as a GitHub-flavoured Markdown table.

    Parameters
    ----------
    frame : DataFrame
        The table; its columns become the header, its values are shown with ``str``
        (``|`` escaped, newlines as spaces). The index is left out.

    Returns
    -------
    str
        The table's lines joined by newlines, without a trailing newline.
    """
    header = "| " + " | ".join(_md_escape(str(c)) for c in frame.columns) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    body = [
        "| " + " | ".join(_md_escape(str(v)) for v in row) + " |"
        for row in frame.itertuples(index=False)
    ]
    return "\n".join([header, rule, *body])


def render_markdown(title: str, sections: list[Section], *, intro: Sequence[str] = ()) -> str:
    """Render sections as Markdown: bullets, tables (with captions) and figure links.

    Parameters
    ----------
    title : str
        The page's level-1 heading.
    sections : list of Section
        One level-2 heading each, in order.
    intro : sequence of str, default ()
        Lines between the title and the first section.

    Returns
    -------
    str
        The page, ending with one newline.
    """
    lines = [f"# {title}", "", *intro]
    if intro:
        lines.append("")
    for section in sections:
        lines += [f"## {section.title}", ""]
        if section.bullets:
            lines += [f"- {b}" for b in section.bullets] + [""]
        for table in section.tables:
            if table.caption:
                lines += [f"**{table.caption}**", ""]
            lines += [markdown_table(table.frame()), ""]
        for fig in section.figures:
            lines += [f"![{fig.title}]({fig.rel})", ""]
        if section.note:
            lines += [section.note, ""]
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- HTML


def render_html(title: str, sections: list[Section], *, subtitle: str = "") -> str:
    """Render one self-contained HTML page from the ``report.html.j2`` template.

    CSS and JavaScript are inline and every figure is embedded as a ``data:`` URI, so the
    page can be moved or mailed on its own.

    Parameters
    ----------
    title : str
        The page's title and level-1 heading.
    sections : list of Section
        The sections, in order.
    subtitle : str, default ""
        A line under the title (data, label column, seeds, version).

    Returns
    -------
    str
        The HTML document.
    """
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(
        loader=PackageLoader("scfmbench.report", "templates"),
        autoescape=select_autoescape(["html", "j2"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    template = env.get_template("report.html.j2")
    return template.render(title=title, subtitle=subtitle, sections=sections)
