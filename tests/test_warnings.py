"""Warnings about the data: recorded for result files, given once per task."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from scfmbench._warnings import recording_data_warnings
from scfmbench.embed.stream import embedding_info
from scfmbench.models.base import Embeddings


def _warn_twice() -> None:
    warnings.warn("values are log-normalized", UserWarning, stacklevel=1)
    warnings.warn("values are log-normalized", UserWarning, stacklevel=1)
    warnings.warn("old API", FutureWarning, stacklevel=1)


def test_recording_keeps_data_warnings_once_and_gives_them_on():
    with warnings.catch_warnings(record=True) as outside:
        warnings.simplefilter("always")
        with recording_data_warnings() as kept:
            _warn_twice()
            assert kept == []  # filled when the block ends
    assert kept == ["values are log-normalized"]  # the library's FutureWarning is not kept
    assert [str(w.message) for w in outside] == [
        "values are log-normalized",
        "values are log-normalized",
        "old API",
    ]


def test_given_warnings_are_recorded_but_not_given_again():
    given: set[str] = set()
    with warnings.catch_warnings(record=True) as outside:
        warnings.simplefilter("always")
        for _ in range(3):  # e.g. three chunks of one streamed embedding
            with recording_data_warnings(given=given) as kept:
                _warn_twice()
            assert kept == ["values are log-normalized"]
    assert [str(w.message) for w in outside] == ["values are log-normalized", "old API"]


def test_embedding_info_leaves_out_what_h5ad_cannot_store():
    embedding = Embeddings(
        matrix=np.zeros((2, 4), dtype=np.float32),
        obs_names=pd.Index(["c1", "c2"]),
        model_id="scgpt",
        layer=12,
        pooling="cls",
        checkpoint_sha256="ab",
        dropped=pd.Index(["c3"]),
        tokenizer={"n_bins": 51, "gene_column": None},
    )
    assert embedding_info(embedding) == {
        "model": "scgpt",
        "layer": 12,
        "pooling": "cls",
        "checkpoint_sha256": "ab",
        "dropped_cells": ["c3"],
        "tokenizer": {"n_bins": 51},  # None cannot be written to .h5ad
        "genes": {},
    }  # no warnings, no chunk size
    streamed = embedding_info(embedding, warnings=["w"], chunk_size=8)
    assert streamed["warnings"] == ["w"] and streamed["chunk_size"] == 8
