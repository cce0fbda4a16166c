"""The report's models table: one row per model id, each with its own gene overlap."""

from __future__ import annotations

from scfmbench.report.provenance import models_table


def overlap(n_matched: int, fraction_genes: float, fraction_counts: float) -> dict:
    """A gene-overlap record as ``GeneMatch.to_dict`` writes it (``model``: the family)."""
    return {
        "model": "geneformer",
        "identifier_type": "ensembl",
        "gene_column": "gene_ids",
        "gene_column_reason": "≥90% of values are ensembl identifiers",
        "n_genes": 13714,
        "n_matched": n_matched,
        "fraction_genes": fraction_genes,
        "fraction_counts": fraction_counts,
        "missing_examples": ["ENSG00000237683"],
    }


def embedded(sha: str, record: dict) -> dict:
    """A ``diagnostics["models"]`` entry of a run: the embedding info and its overlap."""
    return {
        "checkpoint_sha256": sha,
        "layer": 1,
        "pooling": "cls",
        **record,
        "n_dropped_cells": 0,
        "from_cache": False,
    }


def rows(diag: dict) -> list[list[str]]:
    table = models_table(diag)
    assert table is not None
    return table.frame().to_numpy().tolist()


GENES = "var['gene_ids'] (≥90% of values are ensembl identifiers)"


def test_a_random_control_alone_gets_its_own_overlap_and_no_phantom_row():
    diag = {"models": {"geneformer-random": embedded("ab" * 32, overlap(11965, 0.872466, 0.9627))}}
    assert rows(diag) == [
        [
            "geneformer-random",
            "abababababab…",
            "1",
            "cls",
            "0",
            "no",
            GENES,
            "11965",
            "0.872",
            "0.963",
        ]
    ]


def test_a_model_and_its_control_each_show_their_own_overlap():
    diag = {
        "models": {
            "geneformer": embedded("cd" * 32, overlap(11000, 0.8, 0.9)),
            "geneformer-random": embedded("ef" * 32, overlap(12000, 0.875, 0.95)),
        }
    }
    assert rows(diag) == [
        ["geneformer", "cdcdcdcdcdcd…", "1", "cls", "0", "no", GENES, "11000", "0.800", "0.900"],
        [
            "geneformer-random",
            "efefefefefef…",
            "1",
            "cls",
            "0",
            "no",
            GENES,
            "12000",
            "0.875",
            "0.950",
        ],
    ]


def test_transfer_rows_are_per_model_and_dataset():
    diag = {
        "models": {
            "geneformer (pbmc3k)": {"layer": 1, "pooling": "cls", **overlap(11965, 0.872, 0.963)},
            "geneformer (kang)": {"layer": 1, "pooling": "cls", **overlap(1100, 0.868, 0.97)},
        }
    }
    assert [(r[0], r[7], r[8], r[9]) for r in rows(diag)] == [
        ("geneformer (pbmc3k)", "11965", "0.872", "0.963"),
        ("geneformer (kang)", "1100", "0.868", "0.970"),
    ]


def test_a_nested_overlap_record_takes_the_model_id_it_sits_under():
    record = {k: v for k, v in overlap(35, 0.875, 0.93).items() if k != "model"}
    diag = {"models": {"toyfm": {"checkpoint_sha256": "ab" * 32, "gene_match": record}}}
    assert [(r[0], r[7]) for r in rows(diag)] == [("toyfm", "35")]
