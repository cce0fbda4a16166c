"""Tiny Geneformer checkpoints in the real on-disk format, for tests and benchmarks.

The dictionaries are the released ones, copied from ../shared at run time; the network is a
small BERT with the real vocabulary size and position limit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

VOCAB_DIRS = {"V1": "vocab/geneformer/v1_gc30M", "V2": "vocab/geneformer/v2_gc95M"}
CONFIGS = {
    "V1": "vocab/geneformer/configs/gf-6L-30M-i2048/config.json",
    "V2": "vocab/geneformer/configs/gf-12L-95M-i4096/config.json",
}
TINY = {
    "num_hidden_layers": 2,
    "hidden_size": 32,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}


def hf_hidden_states(network, model, adata, *, layer: int):
    """``(tokens, states)``: the model's tokens of ``adata`` and the Hugging Face network's
    hidden states after ``layer`` layers (``output_hidden_states``), padded as one batch."""
    import numpy as np

    from scfmbench.embed import collate

    tokens = model.tokenize(adata)
    batch = collate(tokens, np.arange(tokens.n_cells), pad_token_id=0)
    with torch.no_grad():
        states = network.bert(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask.long(),
            output_hidden_states=True,
        ).hidden_states[layer]
    return tokens, states


def copy_dictionaries(shared_dir: Path, version: str, target: Path) -> Path:
    """Copy the released dictionaries of ``version`` into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted((shared_dir / VOCAB_DIRS[version]).glob("*.pkl")):
        shutil.copy(path, target / path.name)
    return target


def real_config(shared_dir: Path, version: str, **overrides: object) -> dict:
    """The released config.json of a ``version`` model, with ``overrides`` applied."""
    config = json.loads((shared_dir / CONFIGS[version]).read_text())
    config.update(overrides)
    return config


def build_network(
    config: dict, *, head: str = "mlm", seed: int = 0
) -> BertForMaskedLM | BertForSequenceClassification:
    """A seeded BertForMaskedLM (``head="mlm"``) or BertForSequenceClassification."""
    bert_config = BertConfig.from_dict(config, attn_implementation="sdpa")
    torch.manual_seed(seed)
    if head == "mlm":
        return BertForMaskedLM(bert_config).eval()
    bert_config.num_labels = 3
    return BertForSequenceClassification(bert_config).eval()


def write_checkpoint(
    directory: Path,
    shared_dir: Path,
    *,
    version: str = "V1",
    weights: str = "safetensors",
    head: str = "mlm",
    seed: int = 0,
    dictionaries: bool = True,
    **sizes: int,
) -> tuple[Path, BertForMaskedLM | BertForSequenceClassification]:
    """Write config.json + weights (+ dictionaries) like a Hugging Face download.

    Args:
        weights: ``"safetensors"`` (``save_pretrained``) or ``"bin"`` (``pytorch_model.bin``).
        sizes: config overrides; default a 2-layer, 32-wide network.

    Returns:
        The directory and the in-memory network that was saved.
    """
    network = build_network(
        real_config(shared_dir, version, **{**TINY, **sizes}), head=head, seed=seed
    )
    directory.mkdir(parents=True, exist_ok=True)
    if weights == "safetensors":
        network.save_pretrained(directory)
    else:
        network.config.to_json_file(directory / "config.json")
        torch.save(network.state_dict(), directory / "pytorch_model.bin")
    if dictionaries:
        copy_dictionaries(shared_dir, version, directory)
    return directory, network
