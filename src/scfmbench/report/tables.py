"""Report building blocks: cells, tables, figures and sections, rendered as Markdown or HTML.

One section model feeds both renderers, so ``report.md`` and ``report.html`` show the same
tables. Every cell keeps its raw value (``data-value`` in HTML) for sorting and for tests.
"""

from __future__ import annotations

import base64
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
        """The displayed strings as a DataFrame (one column per header)."""
        return pd.DataFrame([[c.text for c in row] for row in self.rows], columns=self.columns)


@dataclass(frozen=True)
class Figure:
    """A PNG figure: ``rel`` is its path relative to the report's folder."""

    title: str
    path: Path
    rel: str

    def data_uri(self) -> str:
        """The PNG as a base64 ``data:`` URI (the HTML report embeds every figure)."""
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


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def num(value: Any, digits: int = 3, *, css: str = "num") -> Cell:
    """A numeric cell with ``digits`` decimals; missing or non-finite values show a dash."""
    if not is_number(value):
        return Cell(DASH, None, css)
    return Cell(f"{value:.{digits}f}", float(value), css)


def pct(value: Any, digits: int = 1) -> Cell:
    """A fraction shown as a signed percentage (``-6.8%``); the raw fraction is kept."""
    if not is_number(value):
        return Cell(DASH, None, "num")
    return Cell(f"{100 * value:+.{digits}f}%", float(value), "num")


def text(value: Any, css: str = "") -> Cell:
    if value is None:
        return Cell(DASH, None, css)
    return Cell(str(value), str(value), css)


def interval(ci: Any, digits: int = 3) -> Cell:
    """A ``[lo, hi]`` confidence interval; sorted by its lower end."""
    if not (isinstance(ci, list | tuple) and len(ci) == 2 and all(map(is_number, ci))):
        return Cell(DASH, None, "num")
    lo, hi = ci
    return Cell(f"[{lo:.{digits}f}, {hi:.{digits}f}]", float(lo), "num")


def figure_if_exists(run_dir: Path, rel: str | None, title: str) -> list[Figure]:
    """``[Figure]`` when ``run_dir / rel`` is a file, else ``[]`` (and a debug log line)."""
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
    """A GitHub-flavoured Markdown table of a DataFrame's values."""
    header = "| " + " | ".join(_md_escape(str(c)) for c in frame.columns) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    body = [
        "| " + " | ".join(_md_escape(str(v)) for v in row) + " |"
        for row in frame.itertuples(index=False)
    ]
    return "\n".join([header, rule, *body])


def render_markdown(title: str, sections: list[Section], *, intro: list[str] = ()) -> str:
    """Sections as Markdown: bullets, tables (with captions) and figure links."""
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
    """One self-contained HTML page (inline CSS/JS, figures as data URIs) from the template."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(
        loader=PackageLoader("scfmbench.report", "templates"),
        autoescape=select_autoescape(["html", "j2"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    template = env.get_template("report.html.j2")
    return template.render(title=title, subtitle=subtitle, sections=sections)
