"""Report, manifest and compare: a real tiny run, enriched metrics, checked in headless Chromium.

The browser test needs selenium, chromium and chromedriver; it is skipped locally when they
are missing and fails when ``CI=true`` (``.ci/run`` installs them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

import scfmbench  # noqa: E402
from scfmbench.cli import main as cli_main  # noqa: E402
from scfmbench.hashing import hash_file  # noqa: E402
from scfmbench.report.compare import compare_runs  # noqa: E402
from scfmbench.report.manifest import PACKAGES, write_manifest  # noqa: E402
from scfmbench.report.write import write_report  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO_ROOT / "test-artifacts"
SECTION_ORDER = [
    "Verdict",
    "Δ macro F1 vs the best baseline",
    "Data and diagnostics",
    "Methods and configuration",
    "Cell-type classification (test set)",
    "Frozen vs fine-tuned",
    "Per-class F1 and recall",
    "Confusion matrices",
    "Zero-shot embedding quality",
    "UMAPs",
    "Layer-wise probes",
    "Transfer across datasets",
    "Fine-tuning learning curves",
    "Time per stage",
]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data_path(tmp_path_factory, tiny_adata_sess) -> Path:
    path = tmp_path_factory.mktemp("data") / "tiny.h5ad"
    tiny_adata_sess.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_path) -> Path:
    """A real run: two splits, figures on."""
    result = scfmbench.run(
        data_path,
        label_key="cell_type",
        out=tmp_path_factory.mktemp("runs"),
        name="tiny",
        n_splits=2,
        baselines=["hvg+logreg", "pca+logreg", "pca+xgboost", "majority"],
        progress=False,
        figures=True,
    )
    return result.run_dir


def _png(path: Path, values: list[float]) -> str:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot(values, marker="o")
    fig.savefig(path, dpi=60)
    plt.close(fig)
    return f"figures/{path.name}"


def _fake_method(template: dict, *, kind: str, model: str | None, shift: float) -> dict:
    """A copy of a real method entry with shifted scores (for optional report blocks)."""
    entry = json.loads(json.dumps(template))
    entry.update(kind=kind, model=model, representation=model or "random", probe="logreg")
    for summary in entry["summary"].values():
        summary["values"] = [min(1.0, v + shift) for v in summary["values"]]
        summary["mean"] = sum(summary["values"]) / len(summary["values"])
    return entry


def enrich(metrics: dict, run_dir: Path) -> dict:
    """Add the blocks later work writes: CIs, significance, controls, FM methods, extras."""
    methods = metrics["methods"]
    base = methods["pca+logreg"]
    methods["random+logreg"] = _fake_method(
        methods["majority"], kind="control", model=None, shift=0.05
    )
    methods["toyfm+logreg"] = _fake_method(base, kind="frozen", model="toyfm", shift=-0.2)
    methods["toyfm+finetune"] = _fake_method(base, kind="finetuned", model="toyfm", shift=-0.1)
    methods["toyfm+logreg"]["warnings"] = ["ran on lognorm input, not raw counts"]
    best = metrics["run"]["reference"]
    metrics["run"]["best_baseline"] = best
    for i, (name, entry) in enumerate(methods.items()):
        for metric in ("accuracy", "macro_f1"):
            mean = entry["summary"][metric]["mean"]
            entry["summary"][metric]["ci95"] = [max(0.0, mean - 0.05), min(1.0, mean + 0.05)]
        entry.setdefault("delta_vs_reference", methods[best]["delta_vs_reference"])
        if name != best:
            entry["significance"] = {
                "baseline": best,
                "mcnemar_p": 0.5 / (i + 1),
                "f1_diff": -0.1 * i,
                "f1_diff_ci95": [-0.1 * i - 0.05, -0.1 * i + 0.05],
                "bootstrap_p": 0.2 / (i + 1),
                "p_holm": 0.0004 * (i + 1) if i % 2 else 0.6,
                "significant": bool(i % 2),
            }
    figures = run_dir / "figures"
    shutil.copy(figures / "umap_pca.png", figures / "umap_toyfm.png")
    metrics["embeddings"] = {
        **metrics.get("embeddings", {}),
        "toyfm": {
            "nmi": 0.71,
            "ari": 0.62,
            "silhouette_label": 0.56,
            "clisi": 0.93,
            "graph_connectivity": 0.88,
            "silhouette_batch": None,
            "ilisi": None,
            "n_cells": 60,
            "n_neighbors": 60,
            "batch_key": None,
            "umap_png": "figures/umap_toyfm.png",
        },
    }
    metrics["layers"] = {"toyfm": [{"layer": k, "macro_f1": 0.5 + 0.1 * k} for k in range(4)]}
    _png(figures / "layers_toyfm.png", [0.5, 0.6, 0.7, 0.8])
    epochs = [
        {"epoch": e, "train_loss": 1 / (e + 1), "val_loss": 1.2 / (e + 1), "val_macro_f1": 0.3 * e}
        for e in range(1, 4)
    ]
    metrics["finetune"] = {
        "toyfm": {"epochs": epochs, "curve_png": _png(figures / "curve_toyfm.png", [3, 2, 1])}
    }
    metrics["transfer"] = {
        "matrix": {
            "tiny": {
                "other": {
                    "hvg+logreg": {"accuracy": 0.9, "macro_f1": 0.85},
                    "random+logreg": {"accuracy": 0.3, "macro_f1": 0.2},
                }
            },
            "other": {"tiny": {"hvg+logreg": {"accuracy": 0.8, "macro_f1": 0.75}}},
        }
    }
    metrics["timings"]["embed:toyfm"] = {"seconds": 2.0, "n_cells": 60, "peak_memory_mb": 512.0}
    metrics["diagnostics"]["models"] = {
        "toyfm": {
            "checkpoint_sha256": "ab" * 32,
            "layer": 3,
            "pooling": "mean",
            "n_dropped_cells": 1,
            "from_cache": False,
            "gene_match": {
                "n_matched": 35,
                "fraction_genes": 0.875,
                "fraction_counts": 0.93,
                "gene_column": "gene_ids",
                "gene_column_reason": "--gene-column",
            },
        }
    }
    return metrics


@pytest.fixture(scope="module")
def enriched_dir(run_dir, tmp_path_factory) -> Path:
    """A copy of the real run with every optional block added, and its report written."""
    target = tmp_path_factory.mktemp("enriched") / "tiny_full"
    shutil.copytree(run_dir, target)
    path = target / "metrics.json"
    metrics = enrich(json.loads(path.read_text()), target)
    metrics["run"]["name"] = "tiny_full"
    path.write_text(json.dumps(metrics, indent=2))
    write_report(target)
    return target


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


# --------------------------------------------------------------------------- Markdown helpers


def md_sections(text: str) -> dict[str, str]:
    parts = text.split("\n## ")[1:]
    return {p.split("\n", 1)[0]: p.split("\n", 1)[1] for p in parts}


def md_tables(text: str) -> list[list[dict[str, str]]]:
    """Every Markdown table in ``text`` as a list of {header: cell} rows."""
    tables, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([c.strip().replace("\\|", "|") for c in line.strip("|").split(" | ")])
            continue
        if block:
            header, rows = block[0], block[2:]
            tables.append([dict(zip(header, row, strict=True)) for row in rows])
            block = []
    return tables


def mean_sd_text(summary: dict) -> str:
    if len(summary["values"]) > 1:
        return f"{summary['mean']:.3f} ± {summary['sd']:.3f}"
    return f"{summary['mean']:.3f}"


def label(name: str, entry: dict) -> str:
    return f"{name} (control)" if entry["kind"] == "control" else name


def headline_label(name: str, entry: dict) -> str:
    """The results table's name: † marks the zero-width interval its note explains."""
    return label(name, entry) + (" †" if entry.get("constant_within_class") else "")


# --------------------------------------------------------------------------- tests


def test_plain_run_report_has_core_sections_only(run_dir):
    html = write_report(run_dir)
    assert html == run_dir / "report.html"
    sections = list(md_sections((run_dir / "report.md").read_text()))
    assert sections == [s for s in SECTION_ORDER if s in sections]
    for absent in (
        "Frozen vs fine-tuned",
        "Layer-wise probes",
        "Transfer across datasets",
        "Fine-tuning learning curves",
    ):
        assert absent not in sections
    assert sections[:5] == SECTION_ORDER[:5]


def test_confusion_tables_without_figures(run_dir, tmp_path):
    target = tmp_path / "nofig"
    shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("figures"))
    write_report(target)
    sections = md_sections((target / "report.md").read_text())
    assert ".png" not in sections.get("UMAPs", "")  # scores table only, no figures
    tables = md_tables(sections["Confusion matrices"])
    metrics = _metrics(target)
    assert len(tables) == len(metrics["methods"])
    for table, entry in zip(tables, metrics["methods"].values(), strict=True):
        confusion = entry["splits"]["42"]["confusion"]
        shown = [[int(row[c]) for c in confusion["labels"]] for row in table]
        assert shown == confusion["matrix"]


def test_markdown_report_matches_metrics(enriched_dir):
    metrics = _metrics(enriched_dir)
    text = (enriched_dir / "report.md").read_text()
    sections = md_sections(text)
    assert list(sections) == SECTION_ORDER
    headline = md_tables(sections["Cell-type classification (test set)"])[0]
    assert [r["method"] for r in headline] == [
        headline_label(n, e) for n, e in metrics["methods"].items()
    ]
    for row, entry in zip(headline, metrics["methods"].values(), strict=True):
        summary = entry["summary"]
        assert row["kind"] == entry["kind"]
        assert row["accuracy"] == mean_sd_text(summary["accuracy"])
        assert row["macro F1"] == mean_sd_text(summary["macro_f1"])
        lo, hi = summary["macro_f1"]["ci95"]
        assert row["macro F1 95% CI"] == f"[{lo:.3f}, {hi:.3f}]"
        gain = entry["delta_vs_reference"]["macro_f1"]["abs"]
        assert row["Δabs F1"] == f"{gain:.3f}"
        assert row["warnings"] == "; ".join(entry.get("warnings", [])) or "—"
        sig = entry.get("significance")
        p_col = next(c for c in row if c.startswith("p vs "))
        if sig:
            assert row[p_col].endswith(" *") == sig["significant"]
    # controls are labelled in every table that lists methods
    for table in md_tables(text):
        cells = " ".join(" ".join(r.values()) for r in table)
        assert "random+logreg" not in cells.replace("random+logreg (control)", "")
    frozen = md_tables(sections["Frozen vs fine-tuned"])[0]
    assert [r["frozen method"] for r in frozen] == ["toyfm+logreg"]
    f1_frozen = metrics["methods"]["toyfm+logreg"]["summary"]["macro_f1"]["mean"]
    f1_tuned = metrics["methods"]["toyfm+finetune"]["summary"]["macro_f1"]["mean"]
    assert frozen[0]["Δabs F1"] == f"{f1_tuned - f1_frozen:.3f}"
    assert "genes matched" in md_tables(sections["Data and diagnostics"])[0][0]
    assert md_tables(sections["Data and diagnostics"])[0][0]["genes matched"] == "35"
    assert md_tables(sections["Data and diagnostics"])[0][0]["gene identifiers"] == (
        "var['gene_ids'] (--gene-column)"
    )
    zero_shot = md_tables(sections["Zero-shot embedding quality"])[0]
    assert [r["view"] for r in zero_shot] == list(metrics["embeddings"])
    assert zero_shot[1] == {
        "view": "toyfm",
        "NMI": "0.710",
        "ARI": "0.620",
        "cell-type ASW": "0.560",
        "cLISI": "0.930",
        "graph connectivity": "0.880",
        "cells": "60",
    }
    assert "batch mixing not scored" in sections["Zero-shot embedding quality"]
    timings = {r["stage"]: r for r in md_tables(sections["Time per stage"])[0]}
    assert timings["embed:toyfm"]["cells/s"] == "30.0"
    assert timings["embed:toyfm"]["peak memory (MB)"] == "512"


def test_report_errors_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["scfmbench", "report", str(tmp_path)])
    with pytest.raises(SystemExit) as stop:
        cli_main()
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path} has no metrics.json; run `scfmbench run` first"]


def test_manifest_fields_and_hashes(run_dir, data_path, tmp_path):
    run_dir = shutil.copytree(run_dir, tmp_path / "run")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"not really weights")
    config = scfmbench.RunConfig(data=str(data_path), label_key="cell_type", n_splits=2)
    path = write_manifest(
        run_dir,
        config=config,
        data_path_or_none=data_path,
        seeds=[42, 43],
        checkpoints={"toyfm": str(weights), "known": "cd" * 32},
    )
    doc = json.loads(path.read_text())
    assert set(doc["packages"]) == set(PACKAGES)
    assert doc["packages"]["scfmbench"] == scfmbench.__version__
    assert doc["packages"]["numpy"] and doc["python"]
    assert doc["hardware"]["cores"] >= 1 and "gpu" in doc["hardware"]
    assert doc["seeds"] == [42, 43]
    assert doc["data"]["sha256"] == hash_file(data_path)
    splits = json.loads((run_dir / "splits" / "splits.json").read_text())
    for info in splits["files"].values():
        assert doc["splits"][info["file"]] == info["sha256"]
    assert doc["splits"]["splits.json"] == hash_file(run_dir / "splits" / "splits.json")
    assert doc["checkpoints"]["toyfm"]["sha256"] == hash_file(weights)
    assert doc["checkpoints"]["known"]["sha256"] == "cd" * 32
    assert doc["config"]["sha256"] == hash_file(run_dir / "config.yaml")
    # the package is imported from a git checkout (an editable install): its commit is named
    root = Path(scfmbench.__file__).resolve().parents[2]
    head = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    git = doc["scfmbench"]["git"]
    if (root / ".git").exists() and head.returncode == 0:
        assert git is not None and git["commit"] == head.stdout.strip()
    else:
        assert git is None
    write_report(run_dir)  # the report shows the manifest's environment
    assert f"python {doc['python']}" in (run_dir / "report.md").read_text()


def test_compare_table_matches_runs(run_dir, enriched_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    monkeypatch.setattr(
        "sys.argv", ["scfmbench", "compare", str(run_dir), str(enriched_dir), "--out", str(out)]
    )
    cli_main()  # returns normally on success
    assert "compare.html" in capsys.readouterr().out
    assert (out / "compare.html").exists()
    scores, runs = md_tables((out / "compare.md").read_text())
    plain, full = _metrics(run_dir), _metrics(enriched_dir)
    assert [r["method"] for r in scores] == [label(n, e) for n, e in full["methods"].items()]
    for row in scores:
        name = row["method"].removesuffix(" (control)")
        for run_name, metrics in (("tiny", plain), ("tiny_full", full)):
            entry = metrics["methods"].get(name)
            for metric, column in (("accuracy", "accuracy"), ("macro_f1", "macro F1")):
                expected = mean_sd_text(entry["summary"][metric]) if entry else "—"
                assert row[f"{run_name} {column}"] == expected
    assert [r["run"] for r in runs] == ["tiny", "tiny_full"]
    assert runs[0]["data"] == str(plain["run"]["data"]) and runs[0]["n_splits"] == "2"


# --------------------------------------------------------------------------- browser


def _fail_or_skip(message: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium via selenium and the system chromedriver (never downloaded)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _fail_or_skip("selenium is not installed (pip install -e '.[dev]')")
    binary = next(
        filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None
    )
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        _fail_or_skip("chromium/chromedriver not found (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def requested_urls(driver) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


ROWS_JS = """
return Array.from(document.querySelectorAll(arguments[0] + ' tbody tr')).map(
  tr => Array.from(tr.cells).map(td => [td.textContent, td.getAttribute('data-value')]));
"""
HEADERS_JS = """
return Array.from(document.querySelectorAll(arguments[0] + ' thead th')).map(
  th => th.textContent);
"""


def test_html_report_in_browser(browser, enriched_dir):
    from selenium.webdriver.common.by import By

    metrics = _metrics(enriched_dir)
    html_path = enriched_dir / "report.html"
    source = html_path.read_text()
    links = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", source)
    assert links and all(u.startswith(("data:", "#")) for u in links), links
    assert "@import" not in source and "url(" not in source
    browser.get_log("performance")  # drop earlier entries
    browser.get(html_path.as_uri())

    # nothing left the page: only the file itself and embedded data: URIs were requested
    urls = requested_urls(browser)
    assert html_path.as_uri() in urls
    assert all(u.startswith(("file:", "data:")) for u in urls), urls

    # sections in order, each present
    titles = [h.text for h in browser.find_elements(By.CSS_SELECTOR, "section > h2")]
    assert titles == SECTION_ORDER

    # every figure is embedded and decoded
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.src.slice(0, 22), i.complete,"
        " i.naturalWidth]);"
    )
    # the forest plot, 4 confusion matrices (the added methods have none), 2 UMAPs, layer and
    # learning curves
    assert len(images) == 9 == (enriched_dir / "report.md").read_text().count("](figures/")
    assert all(src == "data:image/png;base64," and ok and width > 0 for src, ok, width in images)

    # headline numbers equal metrics.json (shown text and full-precision data-value)
    headers = browser.execute_script(HEADERS_JS, "#headline")
    rows = browser.execute_script(ROWS_JS, "#headline")
    col = {h.split(" ⇅")[0].strip(): i for i, h in enumerate(headers)}
    assert len(rows) == len(metrics["methods"])
    for row, (name, entry) in zip(rows, metrics["methods"].items(), strict=True):
        assert row[col["method"]] == [headline_label(name, entry), name]
        for metric, column in (("accuracy", "accuracy"), ("macro_f1", "macro F1")):
            summary = entry["summary"][metric]
            shown, value = row[col[column]]
            assert float(value) == pytest.approx(summary["mean"], abs=1e-12)
            assert float(shown.split(" ± ")[0]) == pytest.approx(summary["mean"], abs=5e-4)
            lo, hi = summary["ci95"]
            assert row[col[f"{column} 95% CI"]][0] == f"[{lo:.3f}, {hi:.3f}]"
    control_rows = browser.find_elements(By.CSS_SELECTOR, "#headline tr.control")
    assert [r.find_element(By.TAG_NAME, "td").text for r in control_rows] == [
        headline_label("random+logreg", metrics["methods"]["random+logreg"])
    ]

    # sorting: click macro F1 → ascending, click again → descending
    header = browser.find_elements(By.CSS_SELECTOR, "#headline thead th")[col["macro F1"]]
    for direction in ("ascending", "descending"):
        header.click()
        assert header.get_attribute("aria-sort") == direction
        values = [
            float(r[col["macro F1"]][1]) for r in browser.execute_script(ROWS_JS, "#headline")
        ]
        assert values == sorted(values, reverse=direction == "descending")
        assert len(values) == len(metrics["methods"])

    ARTIFACTS.mkdir(exist_ok=True)
    header.click()  # back to ascending for the picture
    browser.execute_script("window.scrollTo(0, 0);")
    height = browser.execute_script("return document.body.scrollHeight")
    browser.set_window_size(1400, min(int(height), 8000))
    assert browser.save_screenshot(str(ARTIFACTS / "report.png"))
    browser.set_window_size(1400, 1000)


def test_compare_html_in_browser(browser, run_dir, enriched_dir, tmp_path):
    html = compare_runs([run_dir, enriched_dir], out=tmp_path)
    browser.get_log("performance")
    browser.get(html.as_uri())
    assert all(u.startswith(("file:", "data:")) for u in requested_urls(browser))
    rows = browser.execute_script(ROWS_JS, "#compare")
    expected = _metrics(enriched_dir)["methods"]
    assert [r[0][1] for r in rows] == list(expected)
    for row, entry in zip(rows, expected.values(), strict=True):
        assert float(row[3][1]) == pytest.approx(entry["summary"]["accuracy"]["mean"], abs=1e-12)


def test_per_class_recall_marks_rare_classes(run_dir):
    from scfmbench.report.classification import per_class_table

    metrics = _metrics(run_dir)
    metrics["diagnostics"]["classes"] = {"type_0": 100, "type_1": 100, "type_2": 4}
    table = per_class_table(metrics, metric="recall")
    rows = {row[0].value: row for row in table.rows}
    assert rows["type_2"][0].text == "type_2 ⚑ rare" and rows["type_0"][0].text == "type_0"
    first = next(iter(metrics["methods"].values()))
    recalls = [s["per_class"]["type_1"]["recall"] for s in first["splits"].values()]
    assert rows["type_1"][2].value == pytest.approx(sum(recalls) / len(recalls))
