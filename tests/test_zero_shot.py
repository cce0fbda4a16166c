"""Zero-shot embedding scores (scib-metrics) against slow independent computations, and
from the CLI on Kang 2018 with its donor column."""

import json

import numpy as np
import pytest
from sklearn.metrics import (
    adjusted_rand_score,
    normalized_mutual_info_score,
    silhouette_samples,
    silhouette_score,
)

from scfmbench.evaluation.embedding_quality import SCORE_KEYS, embedding_quality
from tests.test_pipeline import run_cli

SIZES = (30, 40, 50)


@pytest.fixture(scope="module")
def blobs():
    """Three far-apart Gaussian blobs; labels = blob, except six cells relabelled; two
    batches assigned at random (well mixed) in blobs 0 and 1, batch b0 only in blob 2."""
    rng = np.random.default_rng(3)
    blob = np.repeat(np.arange(3), SIZES)
    centres = np.array([[0.0] * 5, [20.0] + [0.0] * 4, [0.0, 20.0, 0, 0, 0]])
    points = (centres[blob] + rng.normal(size=(len(blob), 5))).astype(np.float32)
    labels = np.array([f"t{b}" for b in blob], dtype=object)
    noisy = [0, 1, 35, 36, 80, 81]
    labels[noisy] = ["t1", "t1", "t2", "t2", "t0", "t0"]
    batches = rng.choice(["b0", "b1"], size=len(blob))
    batches[blob == 2] = "b0"
    return points, labels.astype(str), batches, blob


def knn(points: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force euclidean k nearest neighbours (self included, first)."""
    dist = np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(-1, dtype=np.float64))
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(dist, order, axis=1)


def slow_graph_connectivity(index: np.ndarray, labels: np.ndarray) -> float:
    """Per label: largest strongly connected component of the directed kNN graph among the
    label's cells, as a share of them (reachability by breadth-first search); mean."""
    shares = []
    for label in np.unique(labels):
        members = set(np.flatnonzero(labels == label))
        edges = {i: [j for j in index[i] if j in members and j != i] for i in members}

        def reach(start, edges=edges):
            seen, todo = {start}, [start]
            while todo:
                for j in edges[todo.pop()]:
                    if j not in seen:
                        seen.add(j)
                        todo.append(j)
            return seen

        reachable = {i: reach(i) for i in members}
        largest = max(sum(1 for j in reachable[i] if i in reachable[j]) for i in members)
        shares.append(largest / len(members))
    return float(np.mean(shares))


def slow_lisi(index: np.ndarray, dist: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Harmony's LISI per cell: Gaussian weights exp(-beta·d) over the neighbours (not the
    cell itself), beta bisected until the entropy is log(perplexity), perplexity = k // 3;
    LISI = 1 / Σ_group (weight of the group)²."""
    perplexity = index.shape[1] // 3
    out = np.empty(len(index))
    for i in range(len(index)):
        others = index[i] != i
        d, g = dist[i][others], groups[index[i][others]]
        lo, hi = 0.0, 1e6
        for _ in range(200):
            beta = (lo + hi) / 2
            w = np.exp(-beta * (d - d.min()))
            p = w / w.sum()
            entropy = -(p[p > 0] * np.log(p[p > 0])).sum()
            lo, hi = (beta, hi) if entropy > np.log(perplexity) else (lo, beta)
        out[i] = 1 / sum(p[g == value].sum() ** 2 for value in np.unique(groups))
    return out


def test_scores_match_independent_computations(blobs):
    points, labels, batches, blob = blobs
    scores = embedding_quality(points, labels, batches=batches, seed=0)
    assert set(SCORE_KEYS) <= set(scores) and scores["n_cells"] == 120
    assert scores["n_neighbors"] == 90
    # silhouette of the labels, rescaled to [0, 1]
    expected = (silhouette_score(points, labels) + 1) / 2
    assert scores["silhouette_label"] == pytest.approx(expected, abs=1e-5)
    # the Leiden clusters are the blobs: ARI/NMI are those of blobs vs the noisy labels
    assert scores["ari"] == pytest.approx(adjusted_rand_score(labels, blob), abs=1e-12)
    assert scores["nmi"] == pytest.approx(normalized_mutual_info_score(labels, blob), abs=1e-12)
    assert scores["ari"] < 0.99  # the six relabelled cells cost something
    # graph connectivity on the 15-neighbour graph: relabelled cells sit in other blobs
    index15, _ = knn(points, 15)
    expected = slow_graph_connectivity(index15, labels)
    assert expected < 1
    assert scores["graph_connectivity"] == pytest.approx(expected, abs=1e-12)
    # LISI on the 90-neighbour graph, medians scaled as in scIB
    index90, dist90 = knn(points, 90)
    clisi = np.median(slow_lisi(index90, dist90, labels))
    assert scores["clisi"] == pytest.approx((3 - clisi) / (3 - 1), abs=2e-3)
    ilisi = np.median(slow_lisi(index90, dist90, batches))
    assert scores["ilisi"] == pytest.approx((ilisi - 1) / (2 - 1), abs=2e-3)
    # batch silhouette: 1 - |ASW of the batches| within each label with two batches
    per_label = []
    for label in np.unique(labels):
        rows = labels == label
        if len(np.unique(batches[rows])) > 1:
            per_label.append(np.mean(1 - np.abs(silhouette_samples(points[rows], batches[rows]))))
    assert scores["silhouette_batch"] == pytest.approx(np.mean(per_label), abs=1e-5)


def test_nan_rows_are_left_out_and_batches_are_optional(blobs):
    points, labels, _, _ = blobs
    holed = points.copy()
    holed[[5, 50]] = np.nan
    scores = embedding_quality(holed, labels, seed=0)
    assert scores["n_cells"] == 118
    assert scores["silhouette_batch"] is None and scores["ilisi"] is None
    keep = np.ones(len(labels), bool)
    keep[[5, 50]] = False
    expected = (silhouette_score(points[keep], labels[keep]) + 1) / 2
    assert scores["silhouette_label"] == pytest.approx(expected, abs=1e-5)
    # one batch everywhere: nothing to mix
    single = embedding_quality(points, labels, batches=np.array(["b"] * 120), seed=0)
    assert single["silhouette_batch"] is None and single["ilisi"] is None


def test_cli_run_on_kang_scores_every_view_with_its_donors(tmp_path):
    from tests.conftest import require_shared

    kang = require_shared("data/kang2018_ifnb_muscat_1556x1267_counts.h5ad")
    config = tmp_path / "run.yaml"
    config.write_text("n_splits: 1\ndesign: study\nbaselines: [pca+logreg]\nfigures: false\n")
    done = run_cli(
        "run",
        "--data",
        str(kang),
        "--config",
        str(config),
        "--out",
        str(tmp_path),
        "--name",
        "kang",
        "-q",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    run_dir = tmp_path / "kang"
    scores = json.loads((run_dir / "metrics.json").read_text())["embeddings"]
    assert list(scores) == ["pca"]
    pca = scores["pca"]
    assert pca["batch_key"] == "donor_id" and pca["n_cells"] == 1556
    assert pca["n_neighbors"] == 90
    for key in SCORE_KEYS:
        assert 0 <= pca[key] <= 1, key
    # cell types separate in the PCA view; the two donors mix
    assert pca["nmi"] > 0.5 and pca["ari"] > 0.3 and pca["ilisi"] > 0.5
    report = (run_dir / "report.md").read_text()
    assert "## Zero-shot embedding quality" in report
    assert "Batch mixing by donor_id." in report
    row = next(line for line in report.splitlines() if line.startswith("| pca |"))
    assert f"| {pca['nmi']:.3f} | {pca['ari']:.3f} |" in row
    html = (run_dir / "report.html").read_text()
    assert "Zero-shot embedding quality" in html and f"{pca['ilisi']:.3f}" in html
