"""Report stage: results.md table and figures (confusion matrices, UMAP of the data)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from scfmbench._atomic import write_text
from scfmbench._stages import StageStore, safe_name
from scfmbench.hashing import hash_json

logger = logging.getLogger(__name__)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _mean_sd(summary: dict) -> str:
    if len(summary["values"]) > 1:
        return f"{summary['mean']:.3f} ± {summary['sd']:.3f}"
    return f"{summary['mean']:.3f}"


def results_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """The headline table as strings, one row per method, in run order."""
    reference = metrics["run"]["reference"]
    rows = []
    for name, entry in metrics["methods"].items():
        d_acc, d_f1 = (
            entry["delta_vs_reference"]["accuracy"],
            entry["delta_vs_reference"]["macro_f1"],
        )
        rows.append(
            {
                "method": name,
                "kind": entry["kind"],
                "accuracy": _mean_sd(entry["summary"]["accuracy"]),
                "macro F1": _mean_sd(entry["summary"]["macro_f1"]),
                "weighted F1": _mean_sd(entry["summary"]["weighted_f1"]),
                f"Δabs acc vs {reference}": _fmt(d_acc["abs"]),
                "Δrel acc": _fmt(d_acc["rel"]),
                "Δabs F1": _fmt(d_f1["abs"]),
                "Δrel F1": _fmt(d_f1["rel"]),
            }
        )
    return pd.DataFrame(rows)


def markdown_table(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def write_results_markdown(metrics: dict[str, Any], path: Path) -> None:
    """``results.md``: data diagnostics first, then the headline table."""
    diag = metrics["diagnostics"]
    run = metrics["run"]
    lines = [
        f"# scfmbench results — {run['name']}",
        "",
        "## Data",
        "",
        f"- data: `{run['data']}`, label column `{run['label_key']}`",
        f"- cells × genes: {diag['n_cells']} × {diag['n_genes']} "
        f"(input {diag['n_cells_input']} × {diag['n_genes_input']})",
        f"- expression used: {diag['matrix_kind']} from `adata.{diag['matrix_source']}`; "
        f"gene identifiers: {diag['identifier_type']}",
        f"- classes: {len(diag['classes'])}; splits: seeds {run['seeds']} "
        f"(train/val/test {'/'.join(str(f) for f in run['fractions'])})",
    ]
    lines += [f"- warning: {w}" for w in diag["warnings"]]
    for model, info in diag.get("models", {}).items():
        lines.append(
            f"- {model}: layer {info['layer']}, pooling {info['pooling']}, "
            f"{info['n_dropped_cells']} cells without tokens"
        )
    lines += [
        "",
        "## Cell-type classification (test set)",
        "",
        markdown_table(results_table(metrics)),
        "",
        f"Gains are relative to `{run['reference']}`: Δabs = method − reference, "
        "Δrel = Δabs / reference.",
        "",
    ]
    write_text(path, "\n".join(lines))


def write_figures(
    run_dir: Path,
    metrics: dict[str, Any],
    adata: AnnData,
    labels: pd.Series,
    kind: str,
    *,
    seed: int,
    n_hvg: int,
    n_pcs: int,
    stages: StageStore,
    data_hash: str,
) -> None:
    """Confusion matrix per method (first split) and a UMAP of the data by label."""
    from scfmbench.figures import plot_confusion, plot_embedding

    figures = Path(run_dir) / "figures"
    first_seed = str(metrics["run"]["seeds"][0])
    for name, entry in metrics["methods"].items():
        confusion = entry["splits"][first_seed]["confusion"]
        path = figures / f"confusion_{safe_name(name)}.png"
        key = hash_json(confusion)
        if path.exists() and stages.load(f"figure_{path.stem}", key) is not None:
            continue
        plot_confusion(
            np.asarray(confusion["matrix"]),
            confusion["labels"],
            path,
            title=f"{name} — test split seed {first_seed}",
        )
        stages.save(f"figure_{path.stem}", key, str(path.name))
    path = figures / "umap_data.png"
    key = hash_json([data_hash, seed, n_hvg, n_pcs])
    if not (path.exists() and stages.load("figure_umap_data", key) is not None):
        coords = data_umap(adata, kind=kind, seed=seed, n_hvg=n_hvg, n_pcs=n_pcs)
        plot_embedding(
            coords,
            labels.to_numpy(),
            path,
            title=f"log-normalized HVG PCA UMAP — {metrics['run']['label_key']}",
        )
        stages.save("figure_umap_data", key, path.name)


def data_umap(adata: AnnData, *, kind: str, seed: int, n_hvg: int, n_pcs: int) -> np.ndarray:
    """UMAP of all cells from log-normalized HVGs → z-score → PCA (the baseline view)."""
    from sklearn.decomposition import PCA

    from scfmbench.features import highly_variable_genes, lognormalize

    lognorm = lognormalize(adata.X, kind=kind)
    genes = highly_variable_genes(lognorm, n_top=n_hvg)
    dense = lognorm[:, genes].toarray()
    std = dense.std(axis=0, ddof=1)
    std[std == 0] = 1
    scaled = np.clip((dense - dense.mean(axis=0)) / std, -10, 10)
    n_components = min(n_pcs, *scaled.shape) - 1
    pcs = PCA(n_components=n_components, svd_solver="full", random_state=seed).fit_transform(scaled)
    from scfmbench.figures import umap_coordinates

    return umap_coordinates(pcs, seed=seed)
