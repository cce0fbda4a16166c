"""The scVI baseline: a latent space learned from the raw counts, probed like an embedding.

scvi-tools learns it; the probes see it as they see a foundation-model embedding.

By default scVI is fitted on the training cells of a split (early stopping on the
validation cells' ELBO) and the test cells are embedded afterwards by the trained encoder
(amortized inference), so no test cell is seen during training. ``transductive: true``
trains on the test cells too (unlabelled), as integration benchmarks do.
"""

from __future__ import annotations

import functools
import io
import logging
import random
import warnings
from contextlib import contextmanager, redirect_stdout
from typing import cast

import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, Field

from scfmbench.data.cells import CellRows, row_indices
from scfmbench.errors import ConfigError, CountsRequiredError
from scfmbench.evaluation.representations import (
    REPRESENTATIONS,
    GeneMoments,
    SplitFeatures,
    select_hvg,
)

logger = logging.getLogger(__name__)

DENSE_LIMIT = 2**28
"""Count matrices of up to this many entries (1 GiB as float32) are handed to scVI dense:
minibatches of a dense matrix load several times faster than CSR row slices."""

QUIET_LOGGERS = (
    "scvi",
    "scvi.model.base._base_model",
    "lightning.pytorch",
    "lightning.pytorch.utilities.rank_zero",
    "lightning.pytorch.callbacks.early_stopping",
    "lightning.fabric",
    "lightning.fabric.utilities.rank_zero",
    "lightning.fabric.utilities.seed",
)
"""Loggers of scvi-tools and Lightning that report every fit (seed, devices, stopping)."""


class ScviOptions(BaseModel):
    """Settings of the scVI baseline (``scvi`` in ``baselines``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    n_latent: int = Field(default=10, ge=1, description="Latent dimensions (the probed features).")
    n_hidden: int = Field(default=128, ge=1, description="Units per hidden layer.")
    n_layers: int = Field(default=1, ge=1, description="Hidden layers of encoder and decoder.")
    max_epochs: int = Field(
        default=15,
        ge=1,
        description="Most training epochs (early stopping on the val cells' ELBO).",
    )
    patience: int = Field(
        default=5, ge=1, description="Epochs without a better validation ELBO before stopping."
    )
    batch_size: int = Field(default=128, ge=2, description="Cells per training batch.")
    transductive: bool = Field(
        default=False,
        description="Also train on the test cells (unlabelled); the default never shows them "
        "to scVI and embeds them with the trained encoder.",
    )


def count_rows(cells: CellRows, rows: np.ndarray, genes: np.ndarray) -> sp.csr_matrix:
    """Read the raw values of ``rows`` × ``genes`` chunk by chunk.

    Only these columns are ever held.

    Returns
    -------
    scipy.sparse.csr_matrix
        float32 of shape (len(rows), len(genes)), rows in the order given.
    """
    parts, positions = [], []
    for where, chunk in cells.row_chunks(rows):
        parts.append(sp.csr_matrix(chunk[:, genes], dtype=np.float32))
        positions.append(where)
    if not parts:
        return sp.csr_matrix((0, len(genes)), dtype=np.float32)
    stacked = cast(sp.csr_matrix, sp.vstack(parts, format="csr"))
    order = np.empty(len(rows), dtype=np.int64)
    order[np.concatenate(positions)] = np.arange(len(rows))
    return cast(sp.csr_matrix, stacked[order])


@contextmanager
def _kept_global_state():
    """Keep the global state scvi-tools changes while it runs.

    scvi-tools seeds Python, NumPy and torch globally and logs every fit: the random states
    are restored, its loggers kept at WARNING and its libraries' warnings dropped.

    The fit runs on one torch thread: scVI's layers are small, and several threads on a
    shared CPU made one PBMC3k fit ~8× slower (5 epochs: 5 s on 1 thread, 45 s on 2).
    """
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # importing scvi seeds the global generators and sets its logger to INFO: import it here
    import scvi  # noqa: F401

    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for module in ("lightning", "pytorch_lightning", "scvi", "torch"):
                warnings.filterwarnings("ignore", module=module)
            yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        torch.set_num_threads(threads)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@REPRESENTATIONS.register("scvi")
def scvi_features(
    cells: CellRows,
    split,
    *,
    kind: str,
    n_hvg: int = 2000,
    seed: int = 0,
    scvi: ScviOptions | None = None,
    **_,
) -> SplitFeatures:
    """Return the scVI latent means of the train, val and test cells of ``split``.

    The ``n_hvg`` highly variable genes (Seurat flavour) are chosen on the training cells;
    scVI (``scvi.model.SCVI`` with its default zero-inflated negative binomial likelihood, no
    batch covariate) is trained on their raw counts of the training cells with early stopping
    on the validation cells, seeded with ``seed``; each cell's feature is the mean of q(z | x).

    Parameters
    ----------
    cells : CellRows
        The run's expression rows (in memory or streamed from an ``.h5ad``).
    split : Split
        Cell names of the train, val and test sets.
    kind : str
        The matrix kind found by validation; must be ``"counts"``.
    n_hvg : int, default 2000
    seed : int, default 0
        Seed of the weights, the minibatch order and the sampling during training.
    scvi : ScviOptions, optional
        ``n_latent``, ``n_hidden``, ``n_layers``, ``max_epochs``, ``patience``,
        ``batch_size``, ``transductive`` (defaults of :class:`ScviOptions`).

    Returns
    -------
    SplitFeatures
        float32 arrays of shape (n_cells_in_set, n_latent); ``info`` holds ``n_genes``,
        ``n_latent``, ``epochs`` (trained) and ``transductive``.

    Raises
    ------
    CountsRequiredError
        When the data are not raw counts.
    """
    options = scvi if scvi is not None else ScviOptions()
    if kind != "counts":
        raise CountsRequiredError(
            f"the scvi baseline needs raw integer counts but the data are {kind}; give the "
            "counts (X, layers['counts'] or .raw), or remove scvi from `baselines` "
            "(--no-scvi)."
        )
    sets = [row_indices(cells, names) for names in (split.train, split.val, split.test)]
    genes = select_hvg(GeneMoments.of(cells, sets[0], kind=kind), n_top=n_hvg)
    fitted = [sets[0], sets[1], sets[2]] if options.transductive else [sets[0], sets[1]]
    fit_rows = np.concatenate(fitted)
    with _kept_global_state():
        model, epochs = _train(
            count_rows(cells, fit_rows, genes), [len(r) for r in fitted], options, seed
        )
        latent = cast(np.ndarray, model.get_latent_representation(give_mean=True))
        latent = latent.astype(np.float32)
        bounds = np.cumsum([0, *map(len, sets)])
        train, val = latent[: bounds[1]], latent[bounds[1] : bounds[2]]
        if options.transductive:
            test = latent[bounds[2] : bounds[3]]
        else:
            test = _embed_unseen(model, count_rows(cells, sets[2], genes))
    info = {
        "n_genes": int(len(genes)),
        "n_latent": int(options.n_latent),
        "epochs": int(epochs),
        "transductive": bool(options.transductive),
    }
    return SplitFeatures(train, val, test, info=info)


def _adata(counts: sp.csr_matrix):
    from anndata import AnnData

    n_cells, n_genes = counts.shape  # pyright: ignore[reportGeneralTypeIssues]
    matrix = counts.toarray() if n_cells * n_genes <= DENSE_LIMIT else counts
    names = pd.Index([f"c{i}" for i in range(n_cells)])
    genes = pd.Index([f"g{j}" for j in range(n_genes)])
    return AnnData(X=matrix, obs=pd.DataFrame(index=names), var=pd.DataFrame(index=genes))


def _train(counts: sp.csr_matrix, sizes: list[int], options: ScviOptions, seed: int):
    """Fit scVI on ``counts`` (rows: the sets of ``sizes``; the second is validation)."""
    import scvi as scvi_tools

    if sizes[1] == 0:
        raise ConfigError("the scvi baseline needs validation cells; use a val fraction > 0.")
    adata = _adata(counts)
    scvi_tools.settings.seed = seed
    scvi_tools.model.SCVI.setup_anndata(adata)
    model = scvi_tools.model.SCVI(
        adata, n_latent=options.n_latent, n_hidden=options.n_hidden, n_layers=options.n_layers
    )
    bounds = np.cumsum([0, *sizes])
    train_rows = np.concatenate([np.arange(bounds[0], bounds[1]), np.arange(bounds[2], bounds[-1])])
    val_rows = np.arange(bounds[1], bounds[2])
    # a last training batch of 1 cell breaks batch norm: drop it (at most 2 cells an epoch)
    drop_last = 0 < len(train_rows) % options.batch_size < 3
    # scvi-tools prints why early stopping ended the fit: keep it to the debug log
    printed = io.StringIO()
    with redirect_stdout(printed):
        _fit(model, options, train_rows, val_rows, drop_last)
    if printed.getvalue().strip():
        logger.debug("scvi: %s", printed.getvalue().strip())
    # epochs completed (the history stays empty without a logger)
    epochs = int(model.trainer.current_epoch)  # pyright: ignore[reportAttributeAccessIssue]  # set by model.train
    return model, epochs


@functools.cache
def _quiet_plan_class():
    """scvi-tools' ``TrainingPlan`` without the logs of every training step.

    The stock plan logs the training loss, the KL weight and four ELBO terms at every step,
    and Lightning moves the whole collection of logged values at every step: 8% of a fit's
    CPU time on 40,000 cells. Nothing reads them (the fit has no logger); the validation
    ELBO that early stopping monitors is still logged. The loss, the KL warm-up and so the
    trained weights are those of the stock plan (``tests/test_scvi.py`` compares the latent
    spaces bit for bit).
    """
    from scvi.train import TrainingPlan

    class QuietTrainingPlan(TrainingPlan):
        def training_step(self, batch, batch_idx):
            if "kl_weight" in self.loss_kwargs:
                self.loss_kwargs.update({"kl_weight": self.kl_weight})
            _, _, scvi_loss = self.forward(batch, loss_kwargs=self.loss_kwargs)
            return scvi_loss.loss

    return QuietTrainingPlan


def _fit(model, options: ScviOptions, train_rows, val_rows, drop_last: bool) -> None:
    """``model.train`` on ``train_rows``, early-stopped on the ELBO of ``val_rows``."""
    model._training_plan_cls = _quiet_plan_class()
    model.train(
        max_epochs=options.max_epochs,
        accelerator="cpu",
        devices=1,
        batch_size=options.batch_size,
        early_stopping=True,
        early_stopping_monitor="elbo_validation",
        early_stopping_patience=options.patience,
        datasplitter_kwargs={
            "external_indexing": [train_rows, val_rows, np.array([], dtype=np.int64)],
            "drop_last": drop_last,
        },
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
    )


def _embed_unseen(model, counts: sp.csr_matrix) -> np.ndarray:
    """Latent means of cells scVI was not trained on, through its encoder."""
    if counts.shape[0] == 0:  # pyright: ignore[reportOptionalSubscript]
        return np.zeros((0, model.module.n_latent), dtype=np.float32)
    query = _adata(counts)
    return model.get_latent_representation(adata=query, give_mean=True).astype(np.float32)
