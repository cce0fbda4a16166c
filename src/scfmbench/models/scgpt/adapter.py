"""scGPT adapter: load a checkpoint folder, tokenize with binning, embed the ``<cls>`` token."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from anndata import AnnData

from scfmbench._atomic import write_json, write_with
from scfmbench.defaults import DEFAULT_SEED
from scfmbench.errors import CheckpointError, ConfigError
from scfmbench.hashing import hash_file, hash_json
from scfmbench.models.base import (
    FoundationModel,
    PaddedBatch,
    TokenizedCells,
    masked_mean,
    seeded_init,
)
from scfmbench.models.loading import LoadContext, ModelLayout, ModelOptions, register_model
from scfmbench.models.scgpt.network import (
    ScGPTConfig,
    TransformerModel,
    config_from_checkpoint,
    load_checkpoint_state,
    to_flash_layout,
)
from scfmbench.models.scgpt.tokenizer import load_scgpt_vocab, tokenize_scgpt

logger = logging.getLogger(__name__)

ARGS_FILE = "args.json"
VOCAB_FILE = "vocab.json"
WEIGHTS_FILE = "best_model.pt"
EMBEDDING_KEY = "encoder.embedding.weight"
WRAPPER_KEYS = ("model_state_dict", "state_dict", "model")


class ScGPTOptions(ModelOptions):
    """Options of the scGPT loader (``model_options: {scgpt: {...}}``).

    Attributes
    ----------
    max_seq_len : int or None
        Longest input incl. ``<cls>``; default (``None``): ``args.json`` (1200).
    n_bins : int or None
        Value bins; default (``None``): ``args.json`` (51).
    normalize : bool
        normalize_total + log1p before binning (default ``True``; does not change the bins).
    l2_normalize : bool
        L2-normalize cell embeddings, as the reference does (default ``True``).
    n_classes : int or None
        Add a fresh ``cls_decoder`` with this many classes when the checkpoint has none or one
        with another number of outputs (for fine-tuning; default ``None``: keep it).
    """

    max_seq_len: int | None = None
    n_bins: int | None = None
    normalize: bool = True
    l2_normalize: bool = True
    n_classes: int | None = None


class ScGPTModel(FoundationModel):
    """scGPT: ``<cls>`` + binned non-zero genes → cell embedding (``<cls>`` output, L2-normed).

    Build it with :func:`load_scgpt`. ``network`` is the native
    :class:`~scfmbench.models.scgpt.network.TransformerModel`.
    """

    name = "scgpt"
    network: TransformerModel
    default_pooling = "cls"
    poolings = ("cls", "mean")

    def __init__(
        self,
        network: TransformerModel,
        *,
        vocab: dict[str, int],
        args: dict[str, Any],
        model_dir: Path,
        checkpoint_sha256: str,
        random_init: bool = False,
        options: ScGPTOptions | None = None,
        gene_column: str | None = None,
    ) -> None:
        options = options or ScGPTOptions()
        self.network = network
        self.vocab = vocab
        self.args = args
        self.model_dir = model_dir
        self.checkpoint_sha256 = checkpoint_sha256
        self.random_init = random_init
        self.gene_column = gene_column
        # an option of 0 is a value (the tokenizer refuses it), not "unset"
        max_seq_len, n_bins = options.max_seq_len, options.n_bins
        self.max_seq_len = int(
            args.get("max_seq_len", 1200) if max_seq_len is None else max_seq_len
        )
        self.n_bins = int(args.get("n_bins", 51) if n_bins is None else n_bins)
        self.normalize = options.normalize
        self.l2_normalize = options.l2_normalize
        pad_token = args.get("pad_token", "<pad>")
        if pad_token not in vocab:
            raise CheckpointError(
                f"args.json pad_token {pad_token!r} is not in {model_dir / VOCAB_FILE}; "
                "use the vocab.json and args.json of the same checkpoint."
            )
        self.pad_token_id = vocab[pad_token]
        self.pad_value = float(args.get("pad_value", -2))

    @property
    def n_layers(self) -> int:
        """Number of transformer encoder layers."""
        return self.network.n_layers

    @property
    def default_layer(self) -> int:
        """The last layer, as the reference ``embed_data``."""
        return self.network.n_layers

    def tokenize(self, adata: AnnData, *, seed: int = DEFAULT_SEED) -> TokenizedCells:
        """``<cls>`` + the non-zero vocabulary genes of each cell with binned values."""
        return tokenize_scgpt(
            adata,
            vocab=self.vocab,
            gene_column=self.gene_column,
            n_bins=self.n_bins,
            max_seq_len=self.max_seq_len,
            pad_value=self.pad_value,
            normalize=self.normalize,
            seed=seed,
        )

    def hidden_states(self, batch: PaddedBatch, *, layer: int) -> torch.Tensor:
        """Token states (B, L, embsize) after ``layer`` encoder layers (negative counts back)."""
        if batch.values is None:
            raise ConfigError("scgpt needs token values; tokenize with ScGPTModel.tokenize.")
        if layer < 0:
            layer += self.n_layers + 1
        return self.network(batch.input_ids, batch.values, batch.attention_mask, output_layer=layer)

    def layer_states(self, batch: PaddedBatch, *, up_to: int) -> Iterator[torch.Tensor]:
        """Token states (B, L, embsize) after 0, 1, …, ``up_to`` encoder layers, in turn."""
        if batch.values is None:
            raise ConfigError("scgpt needs token values; tokenize with ScGPTModel.tokenize.")
        return self.network.layer_states(
            batch.input_ids, batch.values, batch.attention_mask, up_to=up_to
        )

    def pool(self, hidden: torch.Tensor, batch: PaddedBatch, *, pooling: str) -> torch.Tensor:
        """``cls`` token or ``mean`` of the gene tokens (L2-normalised if so configured)."""
        if pooling == "cls":
            pooled = hidden[:, 0]
        elif pooling == "mean":
            genes = batch.attention_mask.clone()
            genes[:, 0] = False  # exclude <cls>
            pooled = masked_mean(hidden, genes)
        else:
            raise ConfigError(
                f"pooling {pooling!r} is not available for scgpt; choose from {self.poolings}."
            )
        return F.normalize(pooled, dim=-1) if self.l2_normalize else pooled

    def encode(self, batch: PaddedBatch, *, layer: int, pooling: str) -> torch.Tensor:
        """Cell embeddings (B, embsize): ``cls`` token or ``mean`` of the gene tokens."""
        return self.pool(self.hidden_states(batch, layer=layer), batch, pooling=pooling)

    # ---- fine-tuning hooks --------------------------------------------------------------

    @property
    def hidden_size(self) -> int:
        """Width of the ``<cls>`` embedding (``embsize``)."""
        return self.network.config.embsize

    def layer_modules(self) -> list[torch.nn.Module]:
        """Return the encoder layers, bottom first."""
        return list(self.network.transformer_encoder.layers)

    def embedding_modules(self) -> list[torch.nn.Module]:
        """Gene encoder (embedding + LayerNorm) and continuous value encoder."""
        return [self.network.encoder, self.network.value_encoder]

    def lora_target_modules(self) -> list[str]:
        """Attention output and feed-forward linears of every layer (names in ``network``).

        The fused QKV projection is a plain parameter (``in_proj_weight``, the checkpoint
        layout), so LoRA does not wrap it.
        """
        return [
            f"transformer_encoder.layers.{i}.{name}"
            for i in range(self.n_layers)
            for name in ("self_attn.out_proj", "linear1", "linear2")
        ]

    def make_classifier_head(self, n_classes: int) -> torch.nn.Module:
        """Attach scGPT's ``ClsDecoder`` (``n_layers_cls`` from args.json) and return it.

        It becomes ``network.cls_decoder``, so :meth:`save_pretrained` stores it with the
        official names.
        """
        return self.network.add_cls_decoder(n_classes)

    def save_pretrained(self, directory: Path) -> None:
        """Write ``best_model.pt``, ``args.json`` and ``vocab.json``.

        The weights use the flash-attention key layout, as released; :func:`load_scgpt` and
        the reference loader read the folder back.
        """
        directory = Path(directory)
        state = to_flash_layout({k: v.detach().cpu() for k, v in self.network.state_dict().items()})
        write_with(directory / WEIGHTS_FILE, lambda tmp: torch.save(state, tmp))
        write_json(
            directory / ARGS_FILE,
            {**self.args, "max_seq_len": self.max_seq_len, "n_bins": self.n_bins},
        )
        write_json(directory / VOCAB_FILE, self.vocab)
        logger.debug("scgpt: saved %d tensors to %s", len(state), directory)

    def settings(self) -> dict[str, Any]:
        """Return the cache-key settings plus input length, bins and L2 normalization."""
        return {
            **super().settings(),
            "max_length": self.max_seq_len,
            "n_bins": self.n_bins,
            "l2_normalize": self.l2_normalize,
        }


def _read_json(path: Path, *, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{path} ({what}) is not valid JSON ({type(exc).__name__}); "
            "download the checkpoint folder again."
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} ({what}) is not a JSON object; use the checkpoint's file.")
    return data


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read ``best_model.pt`` safely (``weights_only=True``) and unwrap common containers."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt, truncated or foreign files
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found:
            raise CheckpointError(
                f"{path} holds Python objects besides tensors (e.g. {found.group(1)}), which "
                "safe loading (weights_only=True) refuses; re-save it with "
                "torch.save(model.state_dict(), 'best_model.pt')."
            ) from None
        raise CheckpointError(
            f"{path} cannot be read as a PyTorch state_dict ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:120] if str(exc) else 'no detail'}); the file is "
            "corrupt or truncated — download best_model.pt again."
        ) from None
    for key in WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        raise CheckpointError(
            f"{path} does not hold a state_dict of tensors (found {type(obj).__name__}); "
            "save the weights with torch.save(model.state_dict(), 'best_model.pt')."
        )
    if all(k.startswith("module.") for k in obj):  # saved from DistributedDataParallel
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def _require(model_dir: Path, filename: str) -> Path:
    path = model_dir / filename
    if not path.is_file():
        found = sorted(p.name for p in model_dir.iterdir())[:8] if model_dir.is_dir() else []
        raise CheckpointError(
            f"scGPT model folder {model_dir} has no {filename} (found {found}); a scGPT folder "
            f"holds {WEIGHTS_FILE}, {ARGS_FILE} and {VOCAB_FILE}."
        )
    return path


def _random_network(config: ScGPTConfig, *, seed: int) -> TransformerModel:
    """Build a network with the reference initialisation, seeded without touching global RNG."""
    return seeded_init(lambda: TransformerModel(config), seed=seed)


def _describe(path: Path, *, context: LoadContext, options: ScGPTOptions) -> ModelLayout:
    """Poolings and layers (``nlayers`` of args.json), without the weights."""
    del context, options
    args = _read_json(_require(Path(path).expanduser(), ARGS_FILE), what="model arguments")
    layers = args.get("nlayers")
    n_layers = layers if isinstance(layers, int) and not isinstance(layers, bool) else None
    return ModelLayout(ScGPTModel.poolings, n_layers)


@register_model("scgpt", ScGPTOptions, describe=_describe)
def load_scgpt(
    path: Path, *, context: LoadContext, options: ScGPTOptions, random_init: bool
) -> ScGPTModel:
    """Load a scGPT checkpoint folder (``best_model.pt``, ``args.json``, ``vocab.json``).

    Called through its :class:`~scfmbench.models.loading.ModelLoader`, e.g.
    ``load_scgpt(folder, random_init=True, seed=3, max_seq_len=600)``.

    Parameters
    ----------
    path
        The model folder, e.g. ``scGPT_human/``.
    context
        ``gene_column``: ``adata.var`` column with gene symbols (default ``var_names``);
        ``seed``: seed of the random-init control.
    options
        Tokenizer, pooling and head options (:class:`ScGPTOptions`).
    random_init
        Same architecture and tokenizer, randomly initialised weights (seeded by
        ``context.seed``); ``best_model.pt`` is not needed. Model id ``scgpt-random``.

    Returns
    -------
    ScGPTModel
        The model in eval mode on the CPU.

    Raises
    ------
    CheckpointError
        A file is missing, corrupt or does not match the others.
    """
    seed = context.seed
    model_dir = Path(path).expanduser()
    args = _read_json(_require(model_dir, ARGS_FILE), what="model arguments")
    vocab = load_scgpt_vocab(_require(model_dir, VOCAB_FILE))
    pad_id = vocab.get(args.get("pad_token", "<pad>"))
    if random_init:
        config = ScGPTConfig.from_args(args, ntoken=len(vocab), pad_token_id=pad_id)
        network = _random_network(config, seed=seed)
        sha = hash_json(
            {
                "random_init": seed,
                "config": repr(config),
                "vocab": hash_file(model_dir / VOCAB_FILE),
            }
        )
        logger.info("scgpt: random-init control (seed %d), %d layers", seed, config.nlayers)
    else:
        weights = _require(model_dir, WEIGHTS_FILE)
        state = read_state_dict(weights)
        rows = state.get(EMBEDDING_KEY)
        if rows is not None and rows.shape[0] != len(vocab):
            raise CheckpointError(
                f"{model_dir / VOCAB_FILE} has {len(vocab)} tokens (with <pad>, <cls>, <eoc>) but "
                f"{weights.name} has {rows.shape[0]} gene embeddings; use the vocab.json that "
                "ships with this checkpoint."
            )
        config = config_from_checkpoint(args, state, ntoken=len(vocab), pad_token_id=pad_id)
        network = TransformerModel(config)
        load_checkpoint_state(network, state, source=str(weights))
        sha = hash_file(weights)
    n_classes = options.n_classes
    if n_classes is not None and n_classes > 1 and network.config.n_cls != n_classes:
        network.add_cls_decoder(n_classes)  # e.g. the pretrained one-output head
    return ScGPTModel(
        network.eval(),
        vocab=vocab,
        args=args,
        model_dir=model_dir,
        checkpoint_sha256=sha,
        random_init=random_init,
        options=options,
        gene_column=context.gene_column,
    )
