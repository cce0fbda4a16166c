"""scFoundation network (encoder side of ``MaeAutobin``) and the ``models.ckpt`` reader.

Checkpoint layout (``models.ckpt`` of the official release, read by the reference
``load_model_frommmf``): a torch pickle holding a dict with one entry per model version,
``'cell'`` (cell embeddings, ``version="ce"``), ``'rde'`` (read-depth enhancement) and
``'gene'``. Each entry is ``{'config': {'model': 'mae_autobin', 'model_config':
{'mae_autobin': {...}}, 'dataset_config': {'rnaseq': {...}}}, 'state_dict':
{'model.<name>': tensor}}``. The converted form (``{'config': flat dict,
'model_state_dict': {...}}``, what ``convertconfig`` returns and ``load_model`` reads) is
accepted too, at the top level or under the version key.

Safe loading: the file is read with ``torch.load(weights_only=True)``. The configs are plain
Python dicts, lists, strings and numbers, and the weights are tensors in (ordered) dicts,
all of which the restricted unpickler allows, so no extra globals are registered. A file
that pickles other objects (e.g. a training-framework config class) is refused with a
``CheckpointError`` that names the global; re-save it with plain dicts.

Parameter names follow the reference so ``load_state_dict(strict=True)`` works on the
encoder side: ``token_emb`` (``AutoDiscretizationEmbedding2``: ``mlp``, ``mlp2``, ``emb``,
``emb_mask``, ``emb_pad``), ``pos_emb`` (``seq_len + 1`` rows) and ``encoder``
(``transformer_encoder.<i>`` = ``nn.TransformerEncoderLayer`` with ``batch_first``,
post-norm, ReLU, FFN ``4 × hidden``; then ``norm``). The decoder side (``decoder.*``,
``decoder_embed.*``, ``norm.*``, ``to_final.*``) is not needed for cell embeddings: those
keys are listed in a log line, kept unchanged and written back by ``save_checkpoint``.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scfmbench.errors import CheckpointError
from scfmbench.models.base import seeded_init

logger = logging.getLogger(__name__)

VERSION_KEYS = {"ce": "cell", "rde": "rde", "gene": "gene"}
"""``version`` option of the reference script → entry of ``models.ckpt``."""
DECODER_PREFIXES = ("decoder.", "decoder_embed.", "norm.", "to_final.")
STATE_PREFIX = "model."

RELEASED_CONFIG: dict[str, Any] = {
    "model": "mae_autobin",
    "n_class": 104,
    "seq_len": 19266,
    "pad_token_id": 103,
    "mask_token_id": 102,
    "bin_num": 100,
    "bin_alpha": 1.0,
    "encoder": {"module_type": "transformer", "hidden_dim": 768, "depth": 12, "heads": 12},
    "decoder": {"module_type": "performer", "hidden_dim": 512, "depth": 6, "heads": 8},
}
"""Architecture of the released ~100M-parameter model (paper), used for random-init
controls when no checkpoint file is at hand."""


@dataclass(frozen=True)
class ScFoundationConfig:
    """The encoder-side architecture, read from a checkpoint config dict."""

    seq_len: int
    hidden_dim: int
    depth: int
    heads: int
    bin_num: int
    bin_alpha: float
    pad_token_id: int
    mask_token_id: int
    ff_mult: int = 4
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], *, source: str) -> ScFoundationConfig:
        """Validate a flat (``convertconfig``-style) config dict."""
        if config.get("model", "mae_autobin") != "mae_autobin":
            raise CheckpointError(
                f"{source}: model type {config.get('model')!r} is not supported; only the "
                "released 'mae_autobin' models are."
            )
        encoder = config.get("encoder")
        needed = ("seq_len", "bin_num", "bin_alpha", "pad_token_id", "mask_token_id")
        missing = [k for k in needed if k not in config]
        if not isinstance(encoder, Mapping):
            missing.append("encoder")
        else:
            wanted = ("hidden_dim", "depth", "heads")
            missing += [f"encoder.{k}" for k in wanted if k not in encoder]
        if missing or not isinstance(encoder, Mapping):  # the second implies the first
            raise CheckpointError(
                f"{source}: the model config lacks {missing} (found keys {sorted(config)[:12]}); "
                "use the models.ckpt of the scFoundation release."
            )
        module_type = encoder.get("module_type", "transformer")
        if module_type != "transformer":
            raise CheckpointError(
                f"{source}: encoder module_type {module_type!r} is not supported; the released "
                "cell-embedding models use the 'transformer' encoder."
            )
        return cls(
            seq_len=int(config["seq_len"]),
            hidden_dim=int(encoder["hidden_dim"]),
            depth=int(encoder["depth"]),
            heads=int(encoder["heads"]),
            bin_num=int(config["bin_num"]),
            bin_alpha=float(config["bin_alpha"]),
            pad_token_id=int(config["pad_token_id"]),
            mask_token_id=int(config["mask_token_id"]),
            raw=dict(config),
        )

    def summary(self) -> str:
        """Return a short description of the architecture for the log."""
        return (
            f"{self.depth} layers, hidden {self.hidden_dim}, {self.heads} heads, "
            f"{self.bin_num} value bins, {self.seq_len} positions"
        )


# --------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------


class AutoDiscretizationEmbedding(nn.Module):
    """Value embedding: a soft assignment of each scalar to ``bin_num`` learned bins.

    Same parameters and arithmetic as the reference ``AutoDiscretizationEmbedding2``:
    ``h = LeakyReLU_0.1(mlp(x)); h = bin_alpha * h + mlp2(h); out = softmax(h) @ emb``.
    Values equal to the mask / pad token id get the ``emb_mask`` / ``emb_pad`` vector.
    """

    def __init__(self, config: ScFoundationConfig) -> None:
        super().__init__()
        self.bin_alpha = config.bin_alpha
        self.mask_value = float(config.mask_token_id)
        self.pad_value = float(config.pad_token_id)
        self.mlp = nn.Linear(1, config.bin_num)
        self.mlp2 = nn.Linear(config.bin_num, config.bin_num)
        self.emb = nn.Embedding(config.bin_num, config.hidden_dim)
        self.emb_mask = nn.Embedding(1, config.hidden_dim)
        self.emb_pad = nn.Embedding(1, config.hidden_dim)

    def forward(self, values: Tensor) -> Tensor:
        """(B, L) float values → (B, L, hidden)."""
        h = F.leaky_relu(self.mlp(values.unsqueeze(-1)), negative_slope=0.1)
        h = self.bin_alpha * h + self.mlp2(h)
        out = torch.softmax(h, dim=-1) @ self.emb.weight
        out = torch.where((values == self.mask_value).unsqueeze(-1), self.emb_mask.weight[0], out)
        return torch.where((values == self.pad_value).unsqueeze(-1), self.emb_pad.weight[0], out)


class EncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` (post-norm) that always calls its sub-modules.

    PyTorch's fused inference kernel reads ``self_attn``, ``linear1`` and ``linear2``
    weights directly, so LoRA adapters wrapped around them would be skipped in evaluation;
    this forward is the layer's own non-fused computation, with the same parameters.
    """

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        """(B, L, hidden) → (B, L, hidden); ``src_key_padding_mask`` (B, L) is True for pads."""
        attended = self.self_attn(
            src,
            src,
            src,
            attn_mask=src_mask,
            key_padding_mask=src_key_padding_mask,
            need_weights=False,
            is_causal=is_causal,
        )[0]
        x = self.norm1(src + self.dropout1(attended))
        fed = self.linear2(self.dropout(self.activation(self.linear1(x))))
        return self.norm2(x + self.dropout2(fed))


class TransformerStack(nn.Module):
    """``pytorchTransformerModule``: post-norm PyTorch encoder layers, then a LayerNorm."""

    def __init__(self, config: ScFoundationConfig) -> None:
        super().__init__()
        self.transformer_encoder = nn.ModuleList(
            EncoderLayer(
                d_model=config.hidden_dim,
                nhead=config.heads,
                dim_feedforward=config.hidden_dim * config.ff_mult,
                batch_first=True,
            )
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.hidden_dim)

    def forward(self, x: Tensor, padding_mask: Tensor, *, n_layers: int | None = None) -> Tensor:
        """Run the first ``n_layers`` layers (all: also the final norm); pads are True."""
        states = chain([x], self.layer_states(x, padding_mask, up_to=n_layers))
        return deque(states, maxlen=1)[0]

    def layer_states(
        self, x: Tensor, padding_mask: Tensor, *, up_to: int | None = None
    ) -> Iterator[Tensor]:
        """States after 1, …, ``up_to`` layers, one at a time (the last layer's with the norm)."""
        depth = len(self.transformer_encoder)
        up_to = depth if up_to is None else up_to
        for i, layer in enumerate(self.transformer_encoder[:up_to], start=1):
            x = layer(x, src_key_padding_mask=padding_mask)
            yield self.norm(x) if i == depth else x


class ScFoundationEncoder(nn.Module):
    """Encoder side of ``MaeAutobin``: value embedding + gene position embedding + encoder."""

    def __init__(self, config: ScFoundationConfig) -> None:
        super().__init__()
        self.config = config
        self.token_emb = AutoDiscretizationEmbedding(config)
        self.pos_emb = nn.Embedding(config.seq_len + 1, config.hidden_dim)
        self.encoder = TransformerStack(config)

    @property
    def n_layers(self) -> int:
        """Number of transformer layers."""
        return self.config.depth

    def forward(
        self, values: Tensor, positions: Tensor, attention_mask: Tensor, *, layer: int | None = None
    ) -> Tensor:
        """Token states (B, L, hidden) after ``layer`` encoder layers (default: all + norm).

        Parameters
        ----------
        values
            (B, L) expression values (non-zero genes, then T and S).
        positions
            (B, L) gene positions (0..seq_len - 1; padding may use ``seq_len``).
        attention_mask
            (B, L) bool, True for real tokens.
        layer
            0 = embeddings, ``n_layers`` = final output.
        """
        states = self.layer_states(values, positions, attention_mask, up_to=layer)
        return deque(states, maxlen=1)[0]

    def layer_states(
        self, values: Tensor, positions: Tensor, attention_mask: Tensor, *, up_to: int | None = None
    ) -> Iterator[Tensor]:
        """Token states (B, L, hidden) after 0, 1, …, ``up_to`` layers (default all), in turn.

        Only the current layer's states are alive: pool each before asking for the next.
        """
        x = self.token_emb(values.float()) + self.pos_emb(positions)
        yield x
        if up_to != 0:
            yield from self.encoder.layer_states(x, ~attention_mask, up_to=up_to)


def random_encoder(config: ScFoundationConfig, *, seed: int) -> ScFoundationEncoder:
    """Build a network with PyTorch's default initialisation, seeded without touching global RNG."""
    return seeded_init(lambda: ScFoundationEncoder(config), seed=seed)


# --------------------------------------------------------------------------------------
# Checkpoint reading and writing
# --------------------------------------------------------------------------------------


@dataclass
class CheckpointEntry:
    """One model of ``models.ckpt``: config, encoder weights and the ignored decoder weights."""

    config: ScFoundationConfig
    encoder_state: dict[str, Tensor]
    decoder_state: dict[str, Tensor]
    key: str | None  # entry name in the file, None for a single-model file
    raw_config: dict[str, Any]  # the entry's 'config' as stored


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``, memory-mapped when the file format allows it.

    ``models.ckpt`` holds several models; mapping it means only the entry used is read.
    """
    with open(path, "rb") as fh:
        header = fh.read(4)
    if header != b"PK\x03\x04" and header[:1] != b"\x80":
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (no zip or pickle header, starts with "
            f"{header!r}); the file is corrupt or not models.ckpt — download it again."
        )
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except Exception as exc:  # torch raises many types for corrupt, truncated or foreign files
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found:
            raise CheckpointError(
                f"{path} pickles Python objects besides dicts and tensors (e.g. "
                f"{found.group(1)}), which safe loading (weights_only=True) refuses; re-save "
                "it with plain dict configs, as in the scFoundation release."
            ) from None
        detail = str(exc).splitlines()[0][:120] if str(exc) else "no detail"
        raise CheckpointError(
            f"{path} cannot be read as a PyTorch checkpoint ({type(exc).__name__}: {detail}); "
            "the file is corrupt or truncated — download models.ckpt again."
        ) from None


def _flat_config(stored: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    """``convertconfig``: merge ``model_config[model]`` and ``dataset_config['rnaseq']``."""
    if "model_config" not in stored:
        return dict(stored)
    model_type = stored.get("model")
    model_config = stored["model_config"]
    if not isinstance(model_config, Mapping) or model_type not in model_config:
        found = sorted(model_config) if isinstance(model_config, Mapping) else type(model_config)
        raise CheckpointError(
            f"{source}: config['model_config'] has no entry for model {model_type!r} "
            f"(found {found}); use the models.ckpt of the scFoundation release."
        )
    flat = dict(model_config[model_type])
    flat.update(stored.get("dataset_config", {}).get("rnaseq", {}))
    flat.setdefault("model", model_type)
    return flat


def _unwrap(obj: Any, *, path: Path, version: str) -> tuple[Mapping[str, Any], str | None]:
    """Find the model entry: ``obj[VERSION_KEYS[version]]`` or ``obj`` itself."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not the scFoundation checkpoint dict; "
            "pass the released models.ckpt."
        )
    key = VERSION_KEYS.get(version, version)
    if _is_entry(obj):
        return obj, None
    entry = obj.get(key)
    if isinstance(entry, Mapping) and _is_entry(entry):
        return entry, key
    models = [k for k, v in obj.items() if isinstance(v, Mapping) and _is_entry(v)]
    if models:
        raise CheckpointError(
            f"{path} has no {key!r} model (version {version!r}); it holds {sorted(models)}. "
            f"Pick a version from {sorted(VERSION_KEYS)} whose entry exists."
        )
    raise CheckpointError(
        f"{path} has an unknown layout: top-level keys {sorted(map(str, obj))[:12]}; expected "
        "model entries such as 'cell'/'rde'/'gene', each with 'config' and 'state_dict' "
        "(or 'model_state_dict')."
    )


def _is_entry(obj: Mapping[str, Any]) -> bool:
    return "config" in obj and ("state_dict" in obj or "model_state_dict" in obj)


def _split_state(
    state: Mapping[str, Any], *, source: str
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Strip the ``model.`` prefix; split into encoder-side and decoder-side tensors."""
    stripped: dict[str, Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(
                f"{source}: state entry {key!r} is a {type(value).__name__}, not a tensor; "
                "the checkpoint is damaged."
            )
        stripped[str(key).removeprefix(STATE_PREFIX)] = value
    decoder = {k: v for k, v in stripped.items() if k.startswith(DECODER_PREFIXES)}
    encoder = {k: v for k, v in stripped.items() if k not in decoder}
    return encoder, decoder


def read_checkpoint(path: Path, *, version: str = "ce") -> CheckpointEntry:
    """Read one model of ``models.ckpt`` (see the module docstring for the layouts)."""
    if not path.is_file():
        raise CheckpointError(
            f"scFoundation checkpoint {path} does not exist; pass the released models.ckpt "
            "or the folder that holds it."
        )
    entry, key = _unwrap(_torch_load(path), path=path, version=version)
    source = f"{path}" + (f"[{key!r}]" if key else "")
    stored = entry["config"]
    if not isinstance(stored, Mapping):
        raise CheckpointError(
            f"{source}: 'config' is a {type(stored).__name__}, not a dict; the checkpoint is "
            "damaged."
        )
    state = entry.get("state_dict", entry.get("model_state_dict"))
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{source}: the state dict is empty or not a dict.")
    config = ScFoundationConfig.from_dict(_flat_config(stored, source=source), source=source)
    encoder_state, decoder_state = _split_state(state, source=source)
    return CheckpointEntry(config, encoder_state, decoder_state, key, dict(stored))


def load_encoder_state(
    network: ScFoundationEncoder, entry: CheckpointEntry, *, source: str
) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming the mismatched keys."""
    expected = network.state_dict()
    missing = sorted(set(expected) - set(entry.encoder_state))
    unexpected = sorted(set(entry.encoder_state) - set(expected))
    shapes = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in entry.encoder_state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"shape mismatches ({'; '.join(shapes[:2])})")
        raise CheckpointError(
            f"{source} does not fit the scFoundation encoder ({entry.config.summary()}): "
            f"{', '.join(parts)}; the weights and config disagree or the file is not a "
            "released scFoundation model."
        )
    network.load_state_dict(entry.encoder_state, strict=True)
    if entry.decoder_state:
        groups = sorted({k.split(".", 1)[0] + ".*" for k in entry.decoder_state})
        logger.info(
            "%s: ignoring %d decoder-side tensors (%s); cell embeddings use the encoder only",
            source,
            len(entry.decoder_state),
            ", ".join(groups),
        )


def save_checkpoint(
    path: Path,
    network: ScFoundationEncoder,
    *,
    key: str,
    raw_config: Mapping[str, Any],
    decoder_state: Mapping[str, Tensor],
) -> None:
    """Write ``{key: {'config', 'state_dict'}}`` in the released layout (``model.`` prefix)."""
    stored = dict(raw_config)
    if "model_config" not in stored:  # flat config: nest it as the release does
        model_type = stored.get("model", "mae_autobin")
        stored = {"model": model_type, "model_config": {model_type: stored}, "dataset_config": {}}
    state = {STATE_PREFIX + k: v.detach().cpu() for k, v in network.state_dict().items()}
    state.update({STATE_PREFIX + k: v for k, v in decoder_state.items()})
    torch.save({key: {"config": stored, "state_dict": state}}, path)
