"""Fixtures for the scGPT tests: the real vocab from ../shared and tiny official-format checkpoints.

Tests that need ``../shared`` skip locally when it is absent but fail when ``CI=true``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from anndata import AnnData

from scfmbench.models.scgpt.network import ScGPTConfig, TransformerModel, to_flash_layout
from scfmbench.models.scgpt.tokenizer import load_scgpt_vocab
from tests.conftest import require_shared  # noqa: F401  (used by the scGPT tests too)

__all__ = ["make_scgpt_dir", "scgpt_human_dir", "scgpt_tiny_state", "scgpt_vocab"]  # fixtures

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SCGPT_HUMAN = SHARED / "vocab" / "scgpt" / "scGPT_human"
PBMC3K = SHARED / "data" / "pbmc3k_seurat_labels_2638x13714_counts.h5ad"
TINY_ARGS = {"embsize": 16, "nheads": 2, "d_hid": 32, "nlayers": 2}

# gene symbols of the tiny data set: 10 in the scGPT_human vocabulary, 2 not
TINY_GENES = [
    "CD3D",
    "CD3E",
    "MS4A1",
    "CD79A",
    "LYZ",
    "CD14",
    "NKG7",
    "GNLY",
    "PPBP",
    "FCGR3A",
    "NOT_A_GENE_1",
    "NOT_A_GENE_2",
]


@pytest.fixture(scope="session")
def scgpt_human_dir() -> Path:
    """The real scGPT_human folder (args.json + vocab.json, no weights)."""
    require_shared(SCGPT_HUMAN / "vocab.json")
    return require_shared(SCGPT_HUMAN)


@pytest.fixture(scope="session")
def scgpt_vocab(scgpt_human_dir: Path) -> dict[str, int]:
    return load_scgpt_vocab(scgpt_human_dir / "vocab.json")


def tiny_state(scgpt_human_dir: Path, *, n_tokens: int, seed: int = 0) -> dict:
    """A tiny network's state_dict in the torch layout, official key names, seeded by ``seed``."""
    args = {**json.loads((scgpt_human_dir / "args.json").read_text()), **TINY_ARGS}
    torch.manual_seed(seed)
    network = TransformerModel(ScGPTConfig.from_args(args, ntoken=n_tokens))
    return {k: v.clone() for k, v in network.state_dict().items()}


def write_scgpt_dir(
    folder: Path,
    scgpt_human_dir: Path,
    state: dict | None,
    *,
    layout: str = "flash",
    edit: Callable[[dict], dict] | None = None,
    **arg_overrides,
) -> Path:
    """Write a scGPT folder: the real vocab.json, the real args.json with tiny shapes (and
    ``arg_overrides``) and ``state`` as best_model.pt (skipped when ``state`` is None).

    ``layout`` is ``"flash"`` (``Wqkv``, as the released checkpoint) or ``"torch"``;
    ``edit(state)`` may change the state_dict before it is saved.
    """
    folder.mkdir(parents=True)
    shutil.copy(scgpt_human_dir / "vocab.json", folder / "vocab.json")
    args = {**json.loads((scgpt_human_dir / "args.json").read_text()), **TINY_ARGS}
    (folder / "args.json").write_text(json.dumps({**args, **arg_overrides}))
    if state is not None:
        state = dict(state)
        if layout == "flash":
            state = to_flash_layout(state)
        if edit is not None:
            state = edit(state)
        torch.save(state, folder / "best_model.pt")
    return folder


@pytest.fixture(scope="session")
def scgpt_tiny_state(scgpt_vocab: dict[str, int], scgpt_human_dir: Path) -> dict:
    """A tiny network's state_dict in the torch layout, official key names (seeded)."""
    return tiny_state(scgpt_human_dir, n_tokens=len(scgpt_vocab))


@pytest.fixture
def make_scgpt_dir(
    tmp_path: Path, scgpt_human_dir: Path, scgpt_tiny_state: dict
) -> Callable[..., Path]:
    """Write a tiny scGPT folder (see :func:`write_scgpt_dir`) under ``tmp_path / name``;
    ``weights=False`` skips best_model.pt."""

    def make(
        *,
        layout: str = "flash",
        edit: Callable[[dict], dict] | None = None,
        weights: bool = True,
        name: str = "scgpt_tiny",
        **arg_overrides,
    ) -> Path:
        state = scgpt_tiny_state if weights else None
        return write_scgpt_dir(
            tmp_path / name, scgpt_human_dir, state, layout=layout, edit=edit, **arg_overrides
        )

    return make


def make_tiny_adata(*, n_cells: int = 12, seed: int = 0, genes: list[str] | None = None) -> AnnData:
    """Cells × TINY_GENES raw counts (sparse), ~50% zeros, one all-zero cell at the end."""
    genes = genes or TINY_GENES
    rng = np.random.default_rng(seed)
    counts = rng.poisson(1.5, size=(n_cells, len(genes))).astype(np.float32)
    counts[rng.random(counts.shape) < 0.3] = 0
    counts[-1] = 0
    return AnnData(
        X=sp.csr_matrix(counts),
        obs=pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)]),
        var=pd.DataFrame(index=genes),
    )
