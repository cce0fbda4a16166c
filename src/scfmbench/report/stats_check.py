"""What ``scfmbench stats`` prints after recomputing a run's statistics."""

from __future__ import annotations

import json

from scfmbench.results import StatisticsCheck

MAX_SHOWN = 20
"""Differing values listed one per line (the rest are counted)."""


def shown(value: object, width: int = 60) -> str:
    """Return a value of ``metrics.json`` as one short line (JSON, cut at ``width`` characters)."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def check_lines(check: StatisticsCheck) -> list[str]:
    """Say what was recomputed, from which files, what differs and what was not checked.

    Parameters
    ----------
    check : StatisticsCheck
        From :func:`scfmbench.results.check_statistics`.

    Returns
    -------
    list of str
        ``recomputed <sections> from <files>: every value matches metrics.json``, or ``…: N
        value(s) differ (metrics.json vs recomputed):`` followed by one indented line
        ``<key>: <stored> vs <recomputed>`` per differing value (at most ``MAX_SHOWN``); then
        ``not checked: …`` when some section of ``metrics.json`` was not recomputed.
    """
    source = f"recomputed {', '.join(check.checked)} from {', '.join(check.sources)}"
    if check.differences:
        n = len(check.differences)
        lines = [f"{source}: {n} value(s) differ (metrics.json vs recomputed):"]
        lines += [
            f"  {where}: {shown(stored)} vs {shown(recomputed)}"
            for where, stored, recomputed in check.differences[:MAX_SHOWN]
        ]
        if n > MAX_SHOWN:
            lines.append(f"  … and {n - MAX_SHOWN} more")
    else:
        lines = [f"{source}: every value matches metrics.json"]
    if check.not_checked:
        lines.append(f"not checked: {'; '.join(check.not_checked)}")
    return lines
