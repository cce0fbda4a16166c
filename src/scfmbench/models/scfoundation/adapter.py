"""scFoundation adapter: gene alignment, T/S count tokens, 4-part pooled cell embedding.

Follows the reference ``get_embedding.py`` for ``--input_type singlecell --output_type
cell``:

* genes (gene symbols: ``gene_column``, else a ``var`` column holding symbols by content —
  ``gene_name``, which the script reads, among the well-known names — else ``var_names``;
  see ``scfmbench.data.genes.resolve_gene_identifiers``) are aligned to the 19,264-gene index,
  missing genes are zero;
* ``pre_normalized='F'`` (raw counts): ``log1p(x / total * 1e4)``; ``'T'``: values are already
  normalize_total + log1p and are used as is; ``'A'``: like ``'T'`` with the total count taken
  from ``obs[total_counts_key]`` (the script's appended column). ``total`` is the sum over the
  aligned genes (``'F'``, ``'T'``);
* two count tokens are appended at positions 19264 (T, target resolution) and 19265
  (S = log10(total)); ``tgthighres`` sets T: ``t<x>`` → T = x, ``f<x>`` → T = log10(total·x),
  ``a<x>`` → T = log10(total) + x;
* only tokens with a value > 0 (the non-zero genes) go through the encoder, in gene order,
  then T and S;
* pooling ``all`` = concat(S, T, max over genes, mean over genes) → 4 × hidden, the order of
  the script (``geneemb[:, -1]`` = S first, then ``geneemb[:, -2]`` = T); ``max`` = max over
  all tokens (script ``--pool_type max``).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from torch import nn

from scfmbench.data.genes import GeneIdentifiers, match_genes, resolve_gene_identifiers
from scfmbench.data.matrix import (
    check_finite,
    classify_matrix,
    corrected_counts_warning,
    to_csr,
)
from scfmbench.defaults import DEFAULT_SEED
from scfmbench.errors import CheckpointError, ConfigError, CountsRequiredError, DataError
from scfmbench.hashing import hash_file, hash_json
from scfmbench.models.base import MODELS, FoundationModel, PaddedBatch, TokenizedCells
from scfmbench.models.scfoundation.network import (
    RELEASED_CONFIG,
    VERSION_KEYS,
    CheckpointEntry,
    ScFoundationConfig,
    ScFoundationEncoder,
    load_encoder_state,
    random_encoder,
    read_checkpoint,
    save_checkpoint,
)

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "models.ckpt"
GENE_INDEX_FILE = "OS_scRNA_gene_index.19264.tsv"
TARGET_SUM = 1e4
POOLED_PARTS = ("S", "T", "max", "mean")
"""Blocks of the ``all`` pooled embedding, in order (each ``hidden`` wide)."""
TGTHIGHRES_RE = re.compile(r"^([tfa])(\d+(?:\.\d+)?)$")

PreNormalized = Literal["F", "T", "A"]


@dataclass(frozen=True)
class ScFoundationOptions:
    """Preprocessing options (the reference script's flags); see :func:`load_scfoundation`."""

    pre_normalized: PreNormalized | None = None
    tgthighres: str = "t4"
    gene_column: str | None = None
    total_counts_key: str = "total_counts"
    allow_normalized: bool = False

    def __post_init__(self) -> None:
        if self.pre_normalized not in (None, "F", "T", "A"):
            raise ConfigError(
                f"pre_normalized {self.pre_normalized!r} is not valid; choose 'F' (raw counts), "
                "'T' (normalize_total + log1p already applied) or 'A' (as 'T', total count in "
                "obs[total_counts_key])."
            )
        parse_tgthighres(self.tgthighres)


def parse_tgthighres(tgthighres: str) -> tuple[str, float]:
    """``"t4"`` → ("t", 4.0); raise ConfigError for anything else."""
    found = TGTHIGHRES_RE.match(str(tgthighres))
    if not found or (found.group(1) == "f" and float(found.group(2)) <= 0):
        raise ConfigError(
            f"tgthighres {tgthighres!r} is not valid; write t<x> (T = x), f<x> with x > 0 "
            "(T = log10(total·x)) or a<x> (T = log10(total) + x), e.g. 't4' or 'a5'."
        )
    return found.group(1), float(found.group(2))


def count_token_values(totals: np.ndarray, *, tgthighres: str) -> tuple[np.ndarray, np.ndarray]:
    """T and S values per cell from the total counts, as the reference script computes them."""
    mode, x = parse_tgthighres(tgthighres)
    with np.errstate(divide="ignore"):
        source = np.log10(totals.astype(np.float64))
        if mode == "t":
            target = np.full_like(source, x)
        elif mode == "f":
            target = np.log10(totals.astype(np.float64) * x)
        else:
            target = source + x
    return target.astype(np.float32), source.astype(np.float32)


def read_gene_index(path: Path) -> dict[str, int]:
    """The gene order of the model input (``gene_name`` → ``index``)."""
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise CheckpointError(
            f"cannot read the scFoundation gene index {path} ({type(exc).__name__}); pass the "
            f"release's {GENE_INDEX_FILE}."
        ) from None
    if list(table.columns[:2]) != ["gene_name", "index"]:
        raise CheckpointError(
            f"{path} has columns {list(table.columns)[:4]}, expected 'gene_name' and 'index'; "
            f"pass the release's {GENE_INDEX_FILE}."
        )
    index = pd.to_numeric(table["index"], errors="coerce")
    if index.isna().any() or sorted(index.astype(int)) != list(range(len(table))):
        raise CheckpointError(
            f"{path}: the 'index' column is not 0..{len(table) - 1}; the file is damaged."
        )
    return dict(zip(table["gene_name"], index.astype(int), strict=True))


def _resolve_mode(kind: str, options: ScFoundationOptions, *, where: str) -> PreNormalized:
    """The pre_normalized mode for a matrix of ``kind``; refuse scaled or mismatched data."""
    if kind == "scaled":
        raise CountsRequiredError(
            f"scfoundation needs raw counts or normalize_total + log1p values but {where} holds "
            "scaled values (negative numbers); pass the raw counts (X, layers['counts'] or .raw)."
        )
    mode = options.pre_normalized
    if kind == "corrected" and mode in (None, "F"):
        warnings.warn(corrected_counts_warning("scfoundation", where), stacklevel=3)
        return "F"
    if mode is None:
        if kind == "counts":
            return "F"
        if not options.allow_normalized:
            raise CountsRequiredError(
                f"scfoundation with pre_normalized='F' needs raw integer counts but {where} holds "
                f"{kind} values; pass the raw counts, or set pre_normalized='T' if the values are "
                "normalize_total + log1p (or --allow-normalized to use them as such)."
            )
        warnings.warn(
            f"scfoundation: {where} holds {kind} values; using them as normalize_total + log1p "
            "input (pre_normalized='T').",
            stacklevel=3,
        )
        return "T"
    if mode == "F" and kind != "counts":
        raise CountsRequiredError(
            f"scfoundation with pre_normalized='F' needs raw integer counts but {where} holds "
            f"{kind} values; pass the raw counts or set pre_normalized='T'."
        )
    return mode


def _gene_keys(adata: AnnData, gene_column: str | None) -> GeneIdentifiers:
    """``gene_column``, else a var column of symbols (by content), else var_names."""
    return resolve_gene_identifiers(
        adata.var, vocabulary_kind="symbol", model="scfoundation", gene_column=gene_column
    )


def align_to_index(matrix: sp.csr_matrix, positions: np.ndarray, *, n_genes: int) -> sp.csr_matrix:
    """(cells × data genes) → (cells × ``n_genes``); unmatched genes dropped, missing are 0.

    Data genes that map to the same index gene are summed.
    """
    matched = np.flatnonzero(positions >= 0)
    projection = sp.csr_matrix(
        (np.ones(len(matched), dtype=np.float64), (matched, positions[matched])),
        shape=(len(positions), n_genes),
    )
    aligned = (matrix.astype(np.float64) @ projection).tocsr()
    aligned.sort_indices()
    aligned.eliminate_zeros()
    return aligned


def append_count_tokens(
    genes: sp.csr_matrix, target: np.ndarray, source: np.ndarray, *, n_genes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat ``(input_ids, values, offsets)``: each row's stored genes in order, then T and S."""
    lengths = np.diff(genes.indptr) + 2
    offsets = np.zeros(genes.shape[0] + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    t_slots, s_slots = offsets[1:] - 2, offsets[1:] - 1
    is_gene = np.ones(offsets[-1], dtype=bool)
    is_gene[t_slots] = is_gene[s_slots] = False
    ids = np.empty(offsets[-1], dtype=np.int64)
    values = np.empty(offsets[-1], dtype=np.float32)
    ids[is_gene], values[is_gene] = genes.indices, genes.data
    ids[t_slots], values[t_slots] = n_genes, target
    ids[s_slots], values[s_slots] = n_genes + 1, source
    return ids, values, offsets


def tokenize_scfoundation(
    adata: AnnData,
    *,
    gene_index: dict[str, int],
    options: ScFoundationOptions | None = None,
) -> TokenizedCells:
    """Tokens per cell: non-zero index genes (position, value), then T and S.

    ``input_ids`` are positions in the gene index (T = ``n_genes``, S = ``n_genes + 1``) and
    ``values`` the expression values (see the module docstring). Cells with no counts on the
    index genes are dropped (listed in ``dropped``).
    """
    options = options or ScFoundationOptions()
    n_genes = len(gene_index)
    matrix = to_csr(adata.X, np.float64)
    check_finite(matrix, where="adata.X")
    mode = _resolve_mode(classify_matrix(matrix), options, where="adata.X")
    identifiers = _gene_keys(adata, options.gene_column)
    match = match_genes(
        identifiers.keys,
        gene_index,
        model="scfoundation",
        gene_totals=np.asarray(matrix.sum(axis=0)).ravel(),
        expected_type="symbol",
        source=identifiers,
    )
    duplicated = pd.Series(match.positions[match.positions >= 0]).duplicated().sum()
    if duplicated:
        logger.warning("scfoundation: %d data genes share an index gene; summing them", duplicated)
    logger.info(
        "scfoundation: %d of %d index genes are not in the data and are filled with zeros",
        n_genes - len(np.unique(match.positions[match.positions >= 0])),
        n_genes,
    )
    aligned = align_to_index(matrix, match.positions, n_genes=n_genes)
    if mode == "A":
        if options.total_counts_key not in adata.obs.columns:
            raise DataError(
                "pre_normalized='A' reads total counts from "
                f"adata.obs[{options.total_counts_key!r}], which is missing (obs columns "
                f"{list(adata.obs.columns)[:8]}); set total_counts_key or use "
                "pre_normalized='T'."
            )
        totals = adata.obs[options.total_counts_key].to_numpy(dtype=np.float64)
    else:
        totals = np.asarray(aligned.sum(axis=1)).ravel()
    if mode == "F":
        scale = np.divide(TARGET_SUM, totals, out=np.zeros_like(totals), where=totals > 0)
        aligned = sp.diags(scale) @ aligned
        aligned.data = np.log1p(aligned.data)
        aligned = aligned.tocsr()
        aligned.sort_indices()
    aligned.data[aligned.data <= 0] = 0  # only values > 0 are tokens, as in the script
    aligned.eliminate_zeros()
    kept_index = np.flatnonzero((totals > 0) & (np.diff(aligned.indptr) > 0))
    target, source = count_token_values(totals[kept_index], tgthighres=options.tgthighres)
    ids, values, offsets = append_count_tokens(aligned[kept_index], target, source, n_genes=n_genes)
    dropped = adata.obs_names.delete(kept_index)
    if len(dropped):
        warnings.warn(
            f"scfoundation: dropped {len(dropped)} cells with no counts on the index genes "
            f"(e.g. {list(dropped[:3])})",
            stacklevel=2,
        )
    low = int(np.sum((source <= 0) | (target <= 0)))
    if low:
        logger.warning(
            "scfoundation: %d cells have a T or S value ≤ 0 (total ≤ 1); the reference script "
            "would drop that token, here it is kept",
            low,
        )
    settings = {
        "tokenizer": "scfoundation",
        **asdict(options),
        "gene_column": identifiers.column,
        "pre_normalized": mode,
        "gene_index": hash_json(sorted(gene_index.items(), key=lambda kv: kv[1])),
    }
    return TokenizedCells(
        input_ids=ids,
        offsets=offsets,
        obs_names=adata.obs_names[kept_index],
        settings=settings,
        values=values,
        dropped=dropped,
        gene_match=match,
    )


def pool_tokens(
    hidden: torch.Tensor, attention_mask: torch.Tensor, *, pooling: str
) -> torch.Tensor:
    """Pool token states (B, L, D) whose last two real tokens are T and S.

    ``all`` → (B, 4D) = [S, T, max over genes, mean over genes]; ``max`` → (B, D) over all
    real tokens.
    """
    mask = attention_mask.unsqueeze(-1)
    if pooling == "max":
        return hidden.masked_fill(~mask, float("-inf")).amax(dim=1)
    if pooling != "all":
        raise ConfigError(
            f"pooling {pooling!r} is not available for scfoundation; choose from "
            f"{ScFoundationModel.poolings}."
        )
    lengths = attention_mask.sum(dim=1)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    s_token = hidden[rows, lengths - 1]
    t_token = hidden[rows, lengths - 2]
    columns = torch.arange(hidden.shape[1], device=hidden.device)
    genes = (columns.unsqueeze(0) < (lengths - 2).unsqueeze(1)).unsqueeze(-1)
    gene_max = hidden.masked_fill(~genes, float("-inf")).amax(dim=1)
    weights = genes.to(hidden.dtype)
    gene_mean = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
    return torch.cat([s_token, t_token, gene_max, gene_mean], dim=1)


class ScFoundationModel(FoundationModel):
    """scFoundation: non-zero genes + T, S → encoder → [S, T, max, mean] (4 × hidden).

    Build it with :func:`load_scfoundation`. ``network`` is the native
    :class:`~scfmbench.models.scfoundation.network.ScFoundationEncoder`.
    """

    name = "scfoundation"
    default_pooling = "all"
    poolings = ("all", "max")

    def __init__(
        self,
        network: ScFoundationEncoder,
        *,
        gene_index: dict[str, int],
        model_dir: Path,
        checkpoint_sha256: str,
        random_init: bool = False,
        options: ScFoundationOptions | None = None,
        entry: CheckpointEntry | None = None,
    ) -> None:
        config = network.config
        if config.seq_len != len(gene_index) + 2:
            raise CheckpointError(
                f"the scFoundation model has {config.seq_len} positions but the gene index has "
                f"{len(gene_index)} genes (+ T, S = {len(gene_index) + 2}); use the "
                f"{GENE_INDEX_FILE} of the same release."
            )
        self.network = network
        self.gene_index = gene_index
        self.model_dir = model_dir
        self.checkpoint_sha256 = checkpoint_sha256
        self.random_init = random_init
        self.options = options or ScFoundationOptions()
        self.entry = entry
        self.pad_token_id = config.seq_len  # the spare pos_emb row
        self.pad_value = float(config.pad_token_id)  # value → emb_pad, as the reference pads

    @property
    def n_layers(self) -> int:
        return self.network.n_layers

    @property
    def default_layer(self) -> int:
        return self.network.n_layers

    def tokenize(self, adata: AnnData, *, seed: int = DEFAULT_SEED) -> TokenizedCells:
        """Non-zero index genes + T, S for each cell (deterministic; ``seed`` is unused)."""
        return tokenize_scfoundation(adata, gene_index=self.gene_index, options=self.options)

    def hidden_states(self, batch: PaddedBatch, *, layer: int) -> torch.Tensor:
        """Token states (B, L, hidden) after ``layer`` encoder layers (negative counts back)."""
        if batch.values is None:
            raise ConfigError(
                "scfoundation needs token values; tokenize with ScFoundationModel.tokenize."
            )
        if layer < 0:
            layer += self.n_layers + 1
        return self.network(batch.values, batch.input_ids, batch.attention_mask, layer=layer)

    def layer_states(self, batch: PaddedBatch, *, up_to: int) -> Iterator[torch.Tensor]:
        """Token states (B, L, hidden) after 0, 1, …, ``up_to`` encoder layers, in turn."""
        if batch.values is None:
            raise ConfigError(
                "scfoundation needs token values; tokenize with ScFoundationModel.tokenize."
            )
        return self.network.layer_states(
            batch.values, batch.input_ids, batch.attention_mask, up_to=up_to
        )

    def pool(self, hidden: torch.Tensor, batch: PaddedBatch, *, pooling: str) -> torch.Tensor:
        """(B, 4 × hidden) for ``all``, (B, hidden) for ``max`` (see :func:`pool_tokens`)."""
        return pool_tokens(hidden, batch.attention_mask, pooling=pooling)

    def encode(self, batch: PaddedBatch, *, layer: int, pooling: str) -> torch.Tensor:
        """Cell embeddings: (B, 4 × hidden) for ``all``, (B, hidden) for ``max``."""
        return self.pool(self.hidden_states(batch, layer=layer), batch, pooling=pooling)

    # ---- fine-tuning hooks --------------------------------------------------------------

    def layer_modules(self) -> list[nn.Module]:
        return list(self.network.encoder.transformer_encoder)

    def embedding_modules(self) -> list[nn.Module]:
        return [self.network.token_emb, self.network.pos_emb]

    def lora_target_modules(self) -> list[str]:
        """Attention (peft wraps ``nn.MultiheadAttention``: in- and out-projection) and FFN.

        ``out_proj`` alone would be ignored: ``nn.MultiheadAttention`` reads its weight
        without calling it.
        """
        return ["self_attn", "linear1", "linear2"]

    @property
    def hidden_size(self) -> int:
        """Width of the default (``all``) pooled embedding: 4 × hidden."""
        return len(POOLED_PARTS) * self.network.config.hidden_dim

    def make_classifier_head(self, n_classes: int) -> nn.Module:
        """The reference fine-tuning head (Linear → 256 → ReLU → Linear) on the pooled embedding.

        The reference puts a non-affine BatchNorm in front; a non-affine LayerNorm is used
        here instead so batches of one cell work.
        """
        return nn.Sequential(
            nn.LayerNorm(self.hidden_size, elementwise_affine=False, eps=1e-6),
            nn.Linear(self.hidden_size, 256),
            nn.ReLU(),
            nn.Linear(256, n_classes),
        )

    def save_pretrained(self, directory: Path) -> None:
        """Write ``models.ckpt`` (released layout, decoder tensors kept) and the gene index."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        entry = self.entry
        save_checkpoint(
            directory / CHECKPOINT_FILE,
            self.network,
            key=(entry.key if entry and entry.key else VERSION_KEYS["ce"]),
            raw_config=entry.raw_config if entry else _config_dict(self.network.config),
            decoder_state=entry.decoder_state if entry else {},
        )
        ordered = sorted(self.gene_index.items(), key=lambda kv: kv[1])
        pd.DataFrame(ordered, columns=["gene_name", "index"]).to_csv(
            directory / GENE_INDEX_FILE, sep="\t", index=False
        )

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "pooled_parts": list(POOLED_PARTS)}


def _config_dict(config: ScFoundationConfig) -> dict[str, Any]:
    """A flat reference-style config for ``config`` (random-init models without a file)."""
    if config.raw:
        return dict(config.raw)
    return {
        **{k: v for k, v in RELEASED_CONFIG.items() if k not in ("encoder",)},
        "seq_len": config.seq_len,
        "bin_num": config.bin_num,
        "bin_alpha": config.bin_alpha,
        "pad_token_id": config.pad_token_id,
        "mask_token_id": config.mask_token_id,
        "encoder": {
            "module_type": "transformer",
            "hidden_dim": config.hidden_dim,
            "depth": config.depth,
            "heads": config.heads,
        },
    }


def _find_file(path: Path, name: str) -> Path | None:
    """``path`` itself, or ``name`` in ``path`` (a folder) or beside it / one level up."""
    folder = path if path.is_dir() else path.parent
    for candidate in (folder / name, folder.parent / name):
        if candidate.is_file():
            return candidate
    return None


@MODELS.register("scfoundation")
def load_scfoundation(
    path: Path | str,
    *,
    random_init: bool = False,
    version: str = "ce",
    gene_index: Path | str | None = None,
    pre_normalized: PreNormalized | None = None,
    tgthighres: str = "t4",
    gene_column: str | None = None,
    total_counts_key: str = "total_counts",
    allow_normalized: bool = False,
    seed: int = DEFAULT_SEED,
) -> ScFoundationModel:
    """Load the released scFoundation checkpoint (``models.ckpt``) as a frozen encoder.

    Args:
        path: ``models.ckpt`` or the folder holding it.
        random_init: same architecture and preprocessing, PyTorch default initialisation
            (seeded by ``seed``); model id ``scfoundation-random``. Uses the checkpoint's
            config when the file exists, else the released architecture.
        version: ``"ce"`` (entry ``'cell'``, the reference default for cell embeddings),
            ``"rde"`` (read-depth enhancement) or ``"gene"``.
        gene_index: ``OS_scRNA_gene_index.19264.tsv``; default: beside the checkpoint or one
            folder up (where the release keeps it).
        pre_normalized: ``"F"`` raw counts, ``"T"`` normalize_total + log1p input, ``"A"``
            as ``"T"`` with totals in ``obs[total_counts_key]``; default ``"F"`` for counts.
        tgthighres: the T token (``t4`` default, ``f<x>``, ``a<x>``; the README uses ``a5``).
        gene_column: ``adata.var`` column with gene symbols.
        allow_normalized: treat non-count input as ``pre_normalized="T"`` (with a warning)
            when ``pre_normalized`` is not given.

    Raises:
        CheckpointError: missing/corrupt file, unknown layout, weights that do not fit.
        ConfigError: an invalid option.
    """
    path = Path(path).expanduser()
    options = ScFoundationOptions(
        pre_normalized, tgthighres, gene_column, total_counts_key, allow_normalized
    )
    if version not in VERSION_KEYS:
        raise ConfigError(
            f"scfoundation version {version!r} is unknown; choose from {sorted(VERSION_KEYS)}."
        )
    checkpoint = path if path.is_file() else path / CHECKPOINT_FILE
    index_path = Path(gene_index).expanduser() if gene_index else _find_file(path, GENE_INDEX_FILE)
    if index_path is None or not index_path.is_file():
        raise CheckpointError(
            f"no scFoundation gene index {GENE_INDEX_FILE} found at {index_path or path} or "
            "beside the checkpoint; pass gene_index= (the file ships with the scFoundation "
            "repository)."
        )
    genes = read_gene_index(index_path)
    entry = None
    if not random_init or checkpoint.is_file():
        entry = read_checkpoint(checkpoint, version=version)
        config = entry.config
    else:
        config = ScFoundationConfig.from_dict(RELEASED_CONFIG, source="released architecture")
        logger.info(
            "scfoundation: no %s at %s; random control uses the released architecture",
            CHECKPOINT_FILE,
            path,
        )
    if random_init:
        network = random_encoder(config, seed=seed)
        sha = hash_json({"random_init": seed, "config": repr(config)})
        entry = None
        logger.info("scfoundation: random-init control (seed %d), %s", seed, config.summary())
    else:
        network = ScFoundationEncoder(config)
        load_encoder_state(network, entry, source=str(checkpoint))
        sha = hash_file(checkpoint)
        logger.info("scfoundation: loaded %s (%s)", checkpoint, config.summary())
    return ScFoundationModel(
        network.eval(),
        gene_index=genes,
        model_dir=checkpoint.parent,
        checkpoint_sha256=sha,
        random_init=random_init,
        options=options,
        entry=entry,
    )
