"""Cost and results of two probe settings on PBMC3k: xgboost's histogram bins, and the kNN search.

Run from the repository root::

    python benchmarks/probe_cost.py [--shared DIR]

- ``xgboost``: the probe's settings (300 rounds, depth 6, learning rate 0.1, early stopping
  after 20 rounds on the validation cells, one thread) with 256 histogram bins (xgboost's
  default) and with 64, 128 and 32; 5 stratified folds of PBMC3k (validation: an eighth of each
  fold's training cells), on the first 50 and on all 256 principal components of the
  z-scored log-normalized top-2,000 HVGs (a 256-wide representation like an embedding's).
  Prints each fold's test macro F1, the mean, the CPU seconds and the ratio to 256 bins.
- ``knn``: the cosine kNN probe as scikit-learn's brute-force search on the cosine distance
  against the rows scaled to unit length and searched with its Euclidean kNN (what
  ``make_knn`` builds), k = 5, 15, 30, on 40,000 training and 5,000 query cells drawn with
  replacement from PBMC3k's first 10 principal components plus Gaussian noise (s.d. 0.1, so no
  two rows are equal): CPU seconds, the ratio, and the share of equal predictions.

Both run on one thread, as in a run's probe fits. Writes ``benchmarks/results/probe_cost.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))
sys.path.insert(0, str(REPO_ROOT))

BINS = (256, 128, 64, 32)
KS = (5, 15, 30)


def principal_components(shared: Path, n_comps: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """PBMC3k's HVG principal components (cells × ``n_comps``) and integer cell-type codes."""
    import scanpy as sc

    adata = sc.read_h5ad(shared / "data" / "pbmc3k_seurat_labels_2638x13714_counts.h5ad")
    codes = adata.obs["cell_type"].astype("category").cat.codes.to_numpy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, n_top_genes=2000, subset=True)
    sc.pp.scale(adata, max_value=10)
    sc.tl.pca(adata, n_comps=n_comps, random_state=0)
    return np.asarray(adata.obsm["X_pca"], dtype=np.float32), codes


def xgboost_bins(features: np.ndarray, codes: np.ndarray) -> dict:
    """Test macro F1 per fold and CPU seconds of the xgboost probe per bin count."""
    from sklearn.metrics import f1_score
    from sklearn.model_selection import StratifiedKFold, train_test_split

    from scfmbench.evaluation.probes import make_xgboost

    folds = list(StratifiedKFold(5, shuffle=True, random_state=0).split(features, codes))
    out = {}
    for bins in BINS:
        scores, cpu = [], time.process_time()
        for k, (train, test) in enumerate(folds):
            train, val = train_test_split(
                train, test_size=1 / 8, stratify=codes[train], random_state=k
            )
            probe = make_xgboost(seed=0).set_params(max_bin=bins)  # the probe, bins changed
            probe.fit(
                features[train], codes[train], eval_set=[(features[val], codes[val])], verbose=False
            )
            predicted = probe.predict(features[test])
            scores.append(float(f1_score(codes[test], predicted, average="macro")))
        out[str(bins)] = {
            "macro_f1_per_fold": [round(s, 4) for s in scores],
            "macro_f1_mean": round(float(np.mean(scores)), 4),
            "cpu_s": round(time.process_time() - cpu, 2),
        }
    for row in out.values():
        row["speedup_vs_256"] = round(out["256"]["cpu_s"] / row["cpu_s"], 2)
        row["delta_mean_vs_256"] = round(row["macro_f1_mean"] - out["256"]["macro_f1_mean"], 4)
    return out


def knn_search(features: np.ndarray, codes: np.ndarray) -> dict:
    """CPU seconds and agreement of the cosine search and the unit-length Euclidean search."""
    from sklearn.neighbors import KNeighborsClassifier

    from scfmbench.evaluation.probes import make_knn

    rng = np.random.default_rng(0)
    rows = rng.integers(0, len(codes), 45_000)
    pool = features[rows, :10] + rng.normal(scale=0.1, size=(len(rows), 10)).astype(np.float32)
    X, y, queries = pool[:40_000], codes[rows[:40_000]], pool[40_000:]
    out = {}
    for k in KS:
        cpu = time.process_time()
        cosine = KNeighborsClassifier(k, metric="cosine", algorithm="brute").fit(X, y)
        expected = cosine.predict(queries)
        cosine_s = time.process_time() - cpu
        cpu = time.process_time()
        predicted = make_knn(seed=0, n_neighbors=k).fit(X, y).predict(queries)
        probe_s = time.process_time() - cpu
        out[str(k)] = {
            "cosine_brute_cpu_s": round(cosine_s, 2),
            "unit_euclidean_cpu_s": round(probe_s, 2),
            "speedup": round(cosine_s / probe_s, 1),
            "equal_predictions": float(np.mean(predicted == expected)),
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    from threadpoolctl import threadpool_limits

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO_ROOT.parent / "shared")
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "benchmarks/results/probe_cost.json"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    features, codes = principal_components(args.shared)
    results: dict = {"xgboost": {}, "knn": {}}
    with threadpool_limits(limits=1):
        for name, width in (("pca50", 50), ("pca256", 256)):
            results["xgboost"][name] = xgboost_bins(features[:, :width], codes)
            for bins, row in results["xgboost"][name].items():
                print(
                    f"xgboost {name} {bins:>3} bins: macro F1 {row['macro_f1_per_fold']} "
                    f"mean {row['macro_f1_mean']:.4f} ({row['delta_mean_vs_256']:+.4f}), "
                    f"{row['cpu_s']:.1f} CPU s ({row['speedup_vs_256']:.2f}× vs 256)"
                )
        results["knn"] = knn_search(features, codes)
    for k, row in results["knn"].items():
        print(
            f"knn k={k}: cosine brute {row['cosine_brute_cpu_s']:.2f} CPU s, unit-length "
            f"Euclidean {row['unit_euclidean_cpu_s']:.2f} CPU s ({row['speedup']:.1f}×), "
            f"equal predictions {row['equal_predictions']:.4f}"
        )
    from benchmarks._common import write_results

    write_results(args.out, results, started=started)
    return results


if __name__ == "__main__":
    main()
