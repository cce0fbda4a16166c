"""Tiny scFoundation checkpoints in the released ``models.ckpt`` layout, for tests.

The checkpoint holds a 'cell' and a 'gene' entry (nested config, ``model.``-prefixed weights,
a few decoder tensors) and the gene index is written beside it, as the release ships them.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from scfmbench.models.scfoundation.network import (
    RELEASED_CONFIG,
    ScFoundationConfig,
    ScFoundationEncoder,
)
from scfmbench.models.scfoundation.tokenizer import GENE_INDEX_FILE

HIDDEN = 8
GENES = ["G0", "G1", "G2", "G3", "G4", "G5"]


def tiny_config(n_genes: int) -> dict:
    """A released-style model config with tiny dimensions."""
    return {
        **RELEASED_CONFIG,
        "seq_len": n_genes + 2,
        "bin_num": 6,
        "encoder": {"module_type": "transformer", "hidden_dim": HIDDEN, "depth": 2, "heads": 2},
    }


def released_entry(network: ScFoundationEncoder, config: dict) -> dict:
    """One ``models.ckpt`` entry as released: nested config, ``model.``-prefixed weights."""
    state = {f"model.{k}": v.clone() for k, v in network.state_dict().items()}
    state["model.decoder_embed.weight"] = torch.zeros(4, HIDDEN)
    state["model.decoder.layers.0.weight"] = torch.zeros(4)
    state["model.norm.weight"] = torch.ones(4)
    state["model.to_final.weight"] = torch.zeros(1, 4)
    stored = {
        "model": "mae_autobin",
        "model_config": {"mae_autobin": config},
        "dataset_config": {"rnaseq": {"seq_len": config["seq_len"]}},
    }
    return {"config": stored, "state_dict": state}


def write_checkpoint(folder: Path, genes: list[str], *, seed: int = 0) -> Path:
    """``folder/models.ckpt`` ('cell' and 'gene' entries) and the gene index beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_config(len(genes))
    torch.manual_seed(seed)
    network = ScFoundationEncoder(ScFoundationConfig.from_dict(config, source="test"))
    entry = released_entry(network, config)
    torch.save({"cell": entry, "gene": entry}, folder / "models.ckpt")
    index = pd.DataFrame({"gene_name": genes, "index": range(len(genes))})
    index.to_csv(folder / GENE_INDEX_FILE, sep="\t", index=False)
    return folder / "models.ckpt"


def counts_adata(counts, genes, **var) -> ad.AnnData:
    """Cells ``c0``, ``c1``, … × ``genes`` with sparse ``counts``; ``var`` columns as given."""
    counts = np.asarray(counts, dtype=np.float32)
    obs = pd.DataFrame(index=[f"c{i}" for i in range(counts.shape[0])])
    return ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(var, index=genes))
