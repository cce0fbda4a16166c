"""benchmarks/readme_table.py: the README's benchmark table is the one built from the JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from readme_table import (  # noqa: E402
    END,
    ROW_FAMILIES,
    START,
    baselines_cost_rows,
    geneformer_rows,
    generated_readme,
    gpu_rows,
    main,
    model_cost_rows,
    probe_cost_rows,
    read_results,
)


def _block(text: str) -> str:
    return text[text.index(START) : text.index(END)]


def test_readme_table_is_the_one_generated_from_the_committed_json():
    current, generated = generated_readme()
    assert _block(current) == _block(generated), (
        "README.md's benchmark table is stale: run `python benchmarks/readme_table.py`"
    )
    assert current == generated


def test_every_row_of_the_committed_table_names_result_files_that_exist():
    docs = read_results()
    rows = [row for family in ROW_FAMILIES for row in family(docs)]
    assert rows  # the committed JSON gives rows
    for row in rows:
        assert row.sources and set(row.sources) <= set(docs), row


def test_geneformer_row_builder_on_a_hand_made_result():
    doc = {
        "tokenize_speedup": 20.66,
        "embed_speedup_vs_pad_to_max": 2.994,
        "pipeline_overhead_fraction": 0.0251,
        "targets": {"tokenize_speedup": 20.0, "pipeline_overhead_fraction": 0.15},
    }
    rows = [row.markdown() for row in geneformer_rows({"geneformer_throughput.json": doc})]
    link = "[geneformer_throughput.json](benchmarks/results/geneformer_throughput.json)"
    assert rows == [
        "| Geneformer tokenizer vs per-cell loop (PBMC3k, identical tokens) | 20.7× | ≥ 20× | "
        + link
        + " |",
        "| Geneformer embedding, length-sorted dynamic batches vs pad-to-max (6L shape) | 2.99× "
        "| — | " + link + " |",
        "| Geneformer `embed()` overhead over the bare forward | 2.5% | ≤ 15% | " + link + " |",
    ]  # no FLOP row: the file has no flop_utilization
    assert geneformer_rows({}) == []  # file absent: no rows, no error


def test_gpu_rows_judge_each_model_against_the_targets_and_skip_the_cpu_form():
    doc = {
        "card": "Card X",
        "n_cells": 1024,
        "targets": {"flop_fraction_gpu": 0.4, "bf16_cosine_min": 0.999},
        "models": {
            "geneformer": {"flop_fraction_bf16": 0.41, "bf16_cosine_min": 0.9989},
            "scgpt": {"error": "RuntimeError: boom"},
        },
        "finetune": {
            "cells_per_s_ratio_vs_trainer": 1.5,
            "steps_per_s_ratio_vs_trainer": 1.7,
            "batch_size": 16,
            "max_length": 2048,
        },
    }
    cpu = {"card": "cpu", "models": {"geneformer": {"flop_fraction": 0.6}}}
    docs = {"gpu_check_card_x.json": doc, "gpu_check_cpu.json": cpu}
    rows = [(row.benchmark, row.value, row.target, row.sources) for row in gpu_rows(docs)]
    shape = "(Geneformer V2-104M shape, random weights, 1,024 PBMC3k cells)"
    source = ("gpu_check_card_x.json",)
    assert rows == [
        (
            f"Card X: bf16 forward FLOP rate / the card's bf16 `torch.mm` rate {shape}",
            "0.41",
            "≥ 0.4: met",
            source,
        ),
        (
            f"Card X: bf16 vs fp32 embeddings, smallest per-cell cosine {shape}",
            "0.99890",
            "≥ 0.999: not met",
            source,
        ),
        (
            "Card X: fine-tuning training cells/s vs Hugging Face `Trainer` (batch 16, cells of "
            "up to "
            "2048 genes)",
            "1.50×",
            "≥ 1.0",
            source,
        ),
    ]  # the failed scgpt part and the CPU form give no rows
    assert gpu_rows({"gpu_check_cpu.json": cpu}) == []


def test_probe_cost_rows_read_the_64_bin_rows_and_the_k15_knn_row():
    doc = {
        "xgboost": {
            "pca50": {"64": {"speedup_vs_256": 2.331, "delta_mean_vs_256": -0.0022}},
            "pca256": {"256": {"speedup_vs_256": 1.0, "delta_mean_vs_256": 0.0}},
        },
        "knn": {"15": {"speedup": 7.36, "equal_predictions": 0.9996}},
    }
    rows = probe_cost_rows({"probe_cost.json": doc})
    assert [(row.value, row.sources) for row in rows] == [
        ("2.33×", ("probe_cost.json",)),
        ("7.4×", ("probe_cost.json",)),
    ]  # pca256 has no 64-bin entry: no row
    assert "50 HVG PCs" in rows[0].benchmark and "-0.0022" in rows[0].benchmark
    assert "equal predictions 0.9996" in rows[1].benchmark
    assert probe_cost_rows({}) == []


def test_model_cost_rows_compare_the_run_with_both_bare_passes():
    def part(wall, cpu):
        return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": 1.0}

    doc = {
        "stages": {
            "baselines": {**part(50.0, 100.0), "n_cells": 2638},
            "bare": part(300.0, 600.0),
            "bare-all": part(350.0, 700.0),
            "model": part(500.0, 1000.0),
        },
        "model": {"layers": 6, "hidden": 256},
        "ratio_run_vs_baselines_plus_bare_embedding": 1000 / 700,
        "ratio_run_vs_baselines_plus_bare_embedding_wall": 500 / 350,
        "ratio_run_vs_baselines_plus_bare_embedding_all_layers": 1000 / 800,
        "ratio_run_vs_baselines_plus_bare_embedding_all_layers_wall": 500 / 400,
        "target": 1.3,
    }
    rows = model_cost_rows({"run_cost.json": doc})
    assert [(row.value, row.target) for row in rows] == [
        ("1.43×", "≤ 1.3×: not met"),
        ("1.43×", "≤ 1.3×: not met"),
        ("1.25×", "≤ 1.3×: met"),
        ("1.25×", "≤ 1.3×: met"),
    ]
    assert "to the default layer, wall s 500.0 / 350.0" in rows[0].benchmark
    assert "through every layer, process CPU s 1000.0 / 800.0" in rows[3].benchmark
    assert "6 layers, hidden 256; 2,638 PBMC3k cells" in rows[3].benchmark
    del doc["stages"]["bare-all"]  # measured without the all-layer pass: its rows go
    assert len(model_cost_rows({"run_cost.json": doc})) == 2


def test_baseline_run_row_says_met_or_not_from_the_wall_time_and_reads_optional_keys():
    def doc(wall: float, **extra) -> dict:
        part = {"wall_s": wall, "cpu_s": 40.0, "n_cells": 2638, "load_avg_1min": [1.2, 0.9]}
        return {"stages": {"baselines": {**part, **extra}}, "targets": {"baselines_s": 60.0}}

    fast = baselines_cost_rows({"run_cost_baselines.json": doc(59.96)})
    assert [(r.value, r.target) for r in fast] == [("60.0 s wall, 40.0 s CPU", "≤ 60 s: met")]
    assert fast[0].benchmark == (
        "baseline-only default `run` on PBMC3k (2,638 cells, scVI included, load 1; "
        "`run_cost.py --parts baselines`)"
    )
    slow = baselines_cost_rows(
        {
            "run_cost_baselines.json": doc(
                61.0,
                workers_cpu_s=12.34,
                n_jobs=2,
                timings={"features:scvi": {"seconds": 30.0, "cpu_seconds": 20.0}},
            ),
            "run_cost_baselines_one_process.json": {
                "stages": {"baselines": {"wall_s": 91.5, "cpu_s": 80}}
            },
        }
    )
    assert [(r.value, r.target, r.sources) for r in slow] == [
        (
            "61.0 s wall, 40.0 s CPU, 12.3 s of it in the probes' worker processes "
            "(scVI 20.0 s CPU)",
            "≤ 60 s: not met",
            ("run_cost_baselines.json",),
        ),
        ("1.50×", "—", ("run_cost_baselines.json", "run_cost_baselines_one_process.json")),
    ]


def _checkout(tmp_path: Path, table_text: str) -> tuple[Path, Path]:
    results = tmp_path / "results"
    results.mkdir()
    (results / "finetune_throughput.json").write_text(
        json.dumps({"steps_per_s_ratio_vs_trainer": 1.5})
    )
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nintro\n\n{START}\n{table_text}\n{END}\n\n## next\n")
    return readme, results


def test_check_exits_1_when_the_readme_differs_and_a_rewrite_fixes_it(tmp_path, capsys):
    readme, results = _checkout(tmp_path, "| old | table |")
    paths = ["--readme", str(readme), "--results", str(results)]
    assert main(["--check", *paths]) == 1
    err = capsys.readouterr().err
    assert err == (
        "README.md's benchmark table differs from benchmarks/results/*.json; run "
        "`python benchmarks/readme_table.py` to regenerate it\n"
    )
    assert main(paths) == 0
    assert main(["--check", *paths]) == 0
    assert readme.read_text() == (
        f"# x\n\nintro\n\n{START}\n"
        "| benchmark | figure | target | JSON |\n| --- | ---: | ---: | --- |\n"
        "| fine-tuning steps/s vs Hugging Face `Trainer` (same model, data, batch) | 1.50× "
        "| ≥ 1.0 | [finetune_throughput.json](benchmarks/results/finetune_throughput.json) |\n"
        f"{END}\n\n## next\n"
    )


def test_bad_readme_or_json_is_a_one_line_error_with_exit_2(tmp_path, capsys):
    readme, results = _checkout(tmp_path, "")
    readme.write_text("# no markers\n")
    assert main(["--readme", str(readme), "--results", str(results)]) == 2
    assert capsys.readouterr().err == (
        f"error: README.md has no {START} … {END} block; put the two markers around the "
        "benchmark table\n"
    )
    assert readme.read_text() == "# no markers\n"
    readme.write_text(f"{START}\n{END}\n")
    (results / "scaling.json").write_text("{")
    assert main(["--check", "--readme", str(readme), "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: scaling.json is not valid JSON (") and err.count("\n") == 1


def test_a_result_file_that_is_absent_gives_no_rows():
    docs = read_results()
    assert all(family({}) == [] for family in ROW_FAMILIES)
    for name in docs:  # the table without each file: its rows go, the others stay
        rest = {other: doc for other, doc in docs.items() if other != name}
        rows = [row for family in ROW_FAMILIES for row in family(rest)]
        assert all(name not in row.sources for row in rows)
