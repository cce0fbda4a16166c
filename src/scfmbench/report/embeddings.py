"""Sections on the embeddings themselves: zero-shot quality, UMAPs and layer-wise probes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scfmbench.report.tables import Figure, Section, Table, figure_if_exists, is_number, num, text
from scfmbench.stages import safe_name

ZERO_SHOT_COLUMNS = {
    "nmi": "NMI",
    "ari": "ARI",
    "silhouette_label": "cell-type ASW",
    "clisi": "cLISI",
    "graph_connectivity": "graph connectivity",
    "silhouette_batch": "batch ASW",
    "ilisi": "iLISI",
}


def _view_title(view: str) -> str:
    return "HVG-PCA (baseline view)" if view == "pca" else f"{view} embedding"


def zero_shot_section(metrics: dict[str, Any]) -> list[Section]:
    """Build "Zero-shot embedding quality": the scib-metrics scores, without any classifier.

    One row per embedding (and the HVG-PCA view) of ``metrics.json["embeddings"]``; a score
    column only when some view has that score. None without embeddings.
    """
    embeddings = metrics.get("embeddings") or {}
    if not embeddings:
        return []
    batch_keys = {info.get("batch_key") for info in embeddings.values()} - {None}
    columns = [
        key
        for key in ZERO_SHOT_COLUMNS
        if any(is_number(info.get(key)) for info in embeddings.values())
    ]
    table = Table(
        "zero-shot",
        ["view", *(ZERO_SHOT_COLUMNS[c] for c in columns), "cells"],
        caption="Zero-shot embedding quality (scib-metrics; 0–1, higher is better)",
    )
    for view, info in embeddings.items():
        table.rows.append(
            [text(view), *(num(info.get(c)) for c in columns), num(info.get("n_cells"), 0)]
        )
    note = (
        "NMI/ARI: Leiden clusters (15-neighbour graph, resolution with the best NMI) vs the "
        "labels; ASW: silhouette rescaled to 0–1; cLISI/iLISI: scaled local inverse Simpson "
        "index of the 90-neighbour graph; graph connectivity: share of each label's cells in "
        "its largest connected component."
    )
    if batch_keys:
        note += f" Batch mixing by {', '.join(sorted(batch_keys))}."
    else:
        note += " No batch/donor column: batch mixing not scored."
    return [Section("zero-shot", "Zero-shot embedding quality", tables=[table], note=note)]


def umap_section(metrics: dict[str, Any], run_dir: Path) -> list[Section]:
    """Build "UMAPs": each view's UMAP by label (and by batch) that exists under ``run_dir``."""
    embeddings = metrics.get("embeddings") or {}
    figures: list[Figure] = []
    for view, info in embeddings.items():
        title = _view_title(view)
        figures += figure_if_exists(run_dir, info.get("umap_png"), title)
        figures += figure_if_exists(run_dir, info.get("umap_batch_png"), f"{title} by batch")
    if not figures:
        return []
    return [Section("umap", "UMAPs", figures=figures)]


def _figure_any(run_dir: Path, candidates: list[str | None], title: str) -> list[Figure]:
    for rel in candidates:
        found = figure_if_exists(run_dir, rel, title)
        if found:
            return found
    return []


def layers_section(metrics: dict[str, Any], run_dir: Path) -> list[Section]:
    """Build "Layer-wise probes": macro F1 per model and layer, and each model's curve."""
    layers = metrics.get("layers") or {}
    if not layers:
        return []
    depth = sorted({int(p["layer"]) for points in layers.values() for p in points})
    table = Table("layers", ["layer", *layers], caption="Macro F1 of a probe on each layer")
    lookup = {m: {int(p["layer"]): p.get("macro_f1") for p in pts} for m, pts in layers.items()}
    table.rows = [[num(layer, 0), *[num(lookup[m].get(layer)) for m in layers]] for layer in depth]
    figures: list[Figure] = []
    for model in layers:
        figures += _figure_any(
            run_dir,
            [f"figures/layers_{model}.png", f"figures/layers_{safe_name(model)}.png"],
            f"{model}: macro F1 by layer",
        )
    return [Section("layers", "Layer-wise probes", tables=[table], figures=figures)]
