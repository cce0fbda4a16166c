"""Native PyTorch scGPT ``TransformerModel`` that loads the official checkpoints.

Module and parameter names follow ``scgpt.model.TransformerModel`` (scgpt 0.2.x), so a real
``best_model.pt`` loads with ``load_state_dict(strict=True)`` after one renaming: checkpoints
trained with flash attention store ``self_attn.Wqkv.{weight,bias}``, which hold the same
tensors as the standard ``self_attn.in_proj_{weight,bias}`` used here. Attention runs through
``torch.nn.functional.scaled_dot_product_attention``; no flash-attn, torchtext or scgpt needed.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scfmbench.errors import CheckpointError

logger = logging.getLogger(__name__)

FLASH_QKV = "self_attn.Wqkv."
TORCH_QKV = "self_attn.in_proj_"
N_KEYS_SHOWN = 5

# Checkpoint parts that the embedding path does not use: dropped with a log line, never silently.
IGNORED_KEYS: dict[str, str] = {
    r"^dsbn\.": "domain-specific batch norm (needs batch labels)",
    r"^bn\.": "batch norm of old fine-tuning scripts",
    r"^batch_encoder\.": "batch-label encoder (needs batch labels)",
    r"^grad_reverse_discriminator\.": "adversarial batch discriminator (training only)",
    r"^transformer_encoder\.layers\.\d+\.self_attn\.cross_attn\.": (
        "generative-training cross-attention (training only)"
    ),
}


@dataclass(frozen=True)
class ScGPTConfig:
    """Shape of a scGPT ``TransformerModel``; names follow ``args.json`` where they exist."""

    ntoken: int
    embsize: int = 512
    nheads: int = 8
    d_hid: int = 512
    nlayers: int = 12
    n_layers_cls: int = 3
    n_cls: int = 1
    cls_decoder: bool = False  # build a ClsDecoder with n_cls outputs (always when n_cls > 1)
    dropout: float = 0.2
    pad_token_id: int | None = None
    pre_norm: bool = False
    max_value: float = 512.0
    do_mvc: bool = True
    explicit_zero_prob: bool = False
    decoder_batch_labels: bool = False  # decoders take [hidden, batch embedding]
    flag_encoder: bool = False

    @classmethod
    def from_args(cls, args: Mapping[str, Any], *, ntoken: int, **overrides: Any) -> ScGPTConfig:
        """Build from an ``args.json`` mapping; ``overrides`` win."""
        required = ("embsize", "nheads", "d_hid", "nlayers")
        missing = [k for k in required if k not in args]
        if missing:
            raise CheckpointError(
                f"args.json lacks {missing}; found keys {sorted(args)[:8]}… — use the args.json "
                "that ships with the checkpoint."
            )
        style = args.get("input_emb_style", "continuous")
        if style != "continuous":
            raise CheckpointError(
                f"args.json has input_emb_style={style!r}; only 'continuous' (scGPT_human and "
                "the other released checkpoints) is supported."
            )
        if int(args["embsize"]) % int(args["nheads"]):
            raise CheckpointError(
                f"args.json has embsize {args['embsize']} not divisible by nheads "
                f"{args['nheads']}; fix args.json."
            )
        config = cls(
            ntoken=ntoken,
            embsize=int(args["embsize"]),
            nheads=int(args["nheads"]),
            d_hid=int(args["d_hid"]),
            nlayers=int(args["nlayers"]),
            n_layers_cls=int(args.get("n_layers_cls", 3)),
            dropout=float(args.get("dropout", 0.2)),
            pre_norm=bool(args.get("pre_norm", False)),
            do_mvc=bool(args.get("MVC", True)),
            explicit_zero_prob=bool(args.get("explicit_zero_prob", False)),
            flag_encoder=bool(args.get("USE_GENERATIVE_TRAINING", False)),
        )
        return replace(config, **overrides)


class GeneEncoder(nn.Module):
    """Gene token embedding followed by LayerNorm (``encoder.embedding``, ``encoder.enc_norm``)."""

    def __init__(self, ntoken: int, d_model: int, *, padding_idx: int | None = None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(ntoken, d_model, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(d_model)

    def forward(self, ids: Tensor) -> Tensor:
        """Embed and normalize gene ids: (B, L) → (B, L, d_model)."""
        return self.enc_norm(self.embedding(ids))


class ContinuousValueEncoder(nn.Module):
    """Value → vector: Linear(1, d) → ReLU → Linear(d, d) → LayerNorm, input clamped at max."""

    def __init__(self, d_model: int, *, dropout: float, max_value: float = 512.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear1 = nn.Linear(1, d_model)
        self.activation = nn.ReLU()
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.max_value = max_value

    def forward(self, values: Tensor) -> Tensor:
        """Encode values (clamped at ``max_value``): (B, L) → (B, L, d_model)."""
        x = torch.clamp(values.unsqueeze(-1), max=self.max_value)
        x = self.linear2(self.activation(self.linear1(x)))
        return self.dropout(self.norm(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention`` parameter names, run by SDPA."""

    def __init__(self, d_model: int, nhead: int, *, dropout: float) -> None:
        super().__init__()
        self.nhead = nhead
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor, attend: Tensor | None = None) -> Tensor:
        """``x`` (B, L, D); ``attend`` (B, L) bool, True for real keys (None: all real)."""
        batch, length, dim = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(batch, length, 3, self.nhead, dim // self.nhead).permute(2, 0, 3, 1, 4)
        mask = None if attend is None else attend[:, None, None, :]
        out = F.scaled_dot_product_attention(
            qkv[0],
            qkv[1],
            qkv[2],
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))


class EncoderLayer(nn.Module):
    """Transformer encoder layer: attention + ReLU feed-forward, post-norm unless ``pre_norm``."""

    def __init__(self, config: ScGPTConfig) -> None:
        super().__init__()
        d, p = config.embsize, config.dropout
        self.self_attn = SelfAttention(d, config.nheads, dropout=p)
        self.linear1 = nn.Linear(d, config.d_hid)
        self.dropout = nn.Dropout(p)
        self.linear2 = nn.Linear(config.d_hid, d)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)
        self.dropout1 = nn.Dropout(p)
        self.dropout2 = nn.Dropout(p)
        self.pre_norm = config.pre_norm

    def _feed_forward(self, x: Tensor) -> Tensor:
        return self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x)))))

    def forward(self, x: Tensor, attend: Tensor | None = None) -> Tensor:
        """Run one layer on (B, L, d_model); ``attend`` (B, L) is True for real tokens."""
        if self.pre_norm:  # as scGPT's flash layer: the normed input replaces the residual
            x = self.norm1(x)
            x = x + self.dropout1(self.self_attn(x, attend))
            x = self.norm2(x)
            return x + self._feed_forward(x)
        x = self.norm1(x + self.dropout1(self.self_attn(x, attend)))
        return self.norm2(x + self._feed_forward(x))


class TransformerEncoder(nn.Module):
    """Stack of encoder layers (``transformer_encoder.layers.N``)."""

    def __init__(self, config: ScGPTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.nlayers))


class ExprDecoder(nn.Module):
    """Per-token expression head (``decoder.fc``; ``decoder.zero_logit`` when explicit zeros)."""

    def __init__(self, d_model: int, *, explicit_zero_prob: bool, d_in: int) -> None:
        super().__init__()
        self.fc = self._mlp(d_in, d_model)
        self.explicit_zero_prob = explicit_zero_prob
        if explicit_zero_prob:
            self.zero_logit = self._mlp(d_in, d_model)

    @staticmethod
    def _mlp(d_in: int, d_model: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Linear(d_in, d_model),
            nn.LeakyReLU(),
            nn.Linear(d_model, d_model),
            nn.LeakyReLU(),
            nn.Linear(d_model, 1),
        )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Predict expression per token: (B, L, d_model) → ``{"pred": (B, L)}``."""
        out = {"pred": self.fc(x).squeeze(-1)}
        if self.explicit_zero_prob:
            out["zero_probs"] = torch.sigmoid(self.zero_logit(x).squeeze(-1))
        return out


class ClsDecoder(nn.Module):
    """Classification head (``cls_decoder._decoder``, ``cls_decoder.out_layer``)."""

    def __init__(self, d_model: int, n_cls: int, *, nlayers: int = 3) -> None:
        super().__init__()
        self._decoder = nn.ModuleList()
        for _ in range(nlayers - 1):
            self._decoder.extend([nn.Linear(d_model, d_model), nn.ReLU(), nn.LayerNorm(d_model)])
        self.out_layer = nn.Linear(d_model, n_cls)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits of cell embeddings: (B, d_model) → (B, n_cls)."""
        for layer in self._decoder:
            x = layer(x)
        return self.out_layer(x)


class MVCDecoder(nn.Module):
    """Masked-value-from-cell-embedding head, "inner product" style (``mvc_decoder``)."""

    def __init__(self, d_model: int, *, explicit_zero_prob: bool, d_in: int) -> None:
        super().__init__()
        self.gene2query = nn.Linear(d_model, d_model)
        self.query_activation = nn.Sigmoid()
        self.W = nn.Linear(d_model, d_in, bias=False)
        self.explicit_zero_prob = explicit_zero_prob
        if explicit_zero_prob:
            self.W_zero_logit = nn.Linear(d_model, d_in)

    def forward(self, cell_emb: Tensor, gene_embs: Tensor) -> dict[str, Tensor]:
        """Predict gene expression from the cell embedding and gene embeddings."""
        query = self.query_activation(self.gene2query(gene_embs))
        out = {"pred": torch.bmm(self.W(query), cell_emb.unsqueeze(2)).squeeze(2)}
        if self.explicit_zero_prob:
            logits = torch.bmm(self.W_zero_logit(query), cell_emb.unsqueeze(2)).squeeze(2)
            out["zero_probs"] = torch.sigmoid(logits)
        return out


class TransformerModel(nn.Module):
    """scGPT ``TransformerModel`` (continuous value encoding) for inference and fine-tuning."""

    def __init__(self, config: ScGPTConfig) -> None:
        super().__init__()
        self.config = config
        d = config.embsize
        d_in = 2 * d if config.decoder_batch_labels else d
        self.encoder = GeneEncoder(config.ntoken, d, padding_idx=config.pad_token_id)
        if config.flag_encoder:
            self.flag_encoder = nn.Embedding(2, d)
        self.value_encoder = ContinuousValueEncoder(
            d, dropout=config.dropout, max_value=config.max_value
        )
        self.transformer_encoder = TransformerEncoder(config)
        self.decoder = ExprDecoder(d, explicit_zero_prob=config.explicit_zero_prob, d_in=d_in)
        if config.cls_decoder or config.n_cls > 1:  # the official model always has one
            self.cls_decoder = ClsDecoder(d, config.n_cls, nlayers=config.n_layers_cls)
        if config.do_mvc:
            self.mvc_decoder = MVCDecoder(
                d, explicit_zero_prob=config.explicit_zero_prob, d_in=d_in
            )
        nn.init.uniform_(self.encoder.embedding.weight, -0.1, 0.1)  # as the reference

    @property
    def n_layers(self) -> int:
        """Number of transformer encoder layers."""
        return self.config.nlayers

    def add_cls_decoder(self, n_cls: int) -> ClsDecoder:
        """Attach a fresh classification head (``cls_decoder``) with ``n_cls`` outputs."""
        self.config = replace(self.config, n_cls=n_cls)
        self.cls_decoder = ClsDecoder(self.config.embsize, n_cls, nlayers=self.config.n_layers_cls)
        return self.cls_decoder

    def forward(
        self,
        input_ids: Tensor,
        values: Tensor,
        attend: Tensor | None = None,
        *,
        output_layer: int | None = None,
    ) -> Tensor:
        """Hidden states (B, L, embsize) after ``output_layer`` encoder layers (default: all).

        Parameters
        ----------
        input_ids
            Token ids (B, L).
        values
            Binned values (B, L); ``<cls>`` and padding carry ``pad_value``.
        attend
            (B, L) bool, True for real tokens; None when nothing is padded.
        output_layer
            0 returns the input embeddings (gene + value encoding).
        """
        n = self.n_layers if output_layer is None else output_layer
        if not 0 <= n <= self.n_layers:
            raise ValueError(f"output_layer must be in 0..{self.n_layers}, got {n}")
        return deque(self.layer_states(input_ids, values, attend, up_to=n), maxlen=1)[0]

    def layer_states(
        self, input_ids: Tensor, values: Tensor, attend: Tensor | None = None, *, up_to: int
    ) -> Iterator[Tensor]:
        """Hidden states (B, L, embsize) after 0, 1, …, ``up_to`` encoder layers, one at a time.

        Only the current layer's states are alive: pool each before asking for the next.
        """
        if attend is not None and bool(attend.all()):
            attend = None  # no padding: let SDPA use its fastest kernel
        x = self.encoder(input_ids) + self.value_encoder(values)
        yield x
        for layer in self.transformer_encoder.layers[:up_to]:
            x = layer(x, attend)
            yield x


# --- checkpoint keys ---------------------------------------------------------------------------


def to_torch_layout(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename flash-attention ``self_attn.Wqkv.*`` keys to ``self_attn.in_proj_*``."""
    return {k.replace(FLASH_QKV, TORCH_QKV): v for k, v in state.items()}


def to_flash_layout(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename ``self_attn.in_proj_*`` keys to the flash-attention ``self_attn.Wqkv.*``."""
    return {k.replace(TORCH_QKV, FLASH_QKV): v for k, v in state.items()}


def attention_layout(state: Mapping[str, Any]) -> str:
    """``"flash"`` when attention weights are stored as ``Wqkv``, else ``"torch"``."""
    return "flash" if any(FLASH_QKV in k for k in state) else "torch"


MVC_QUERY_STYLES = "masked-value decoder in the 'concat query' or 'sum query' style (pre-training)"


def split_ignored(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, list[str]]]:
    """Separate the keys listed in ``IGNORED_KEYS``; return (kept, {reason: keys}).

    Also separated: an ``mvc_decoder`` of the reference's query styles, which has no ``W``
    (only the "inner product" style is built here).
    """
    kept: dict[str, Tensor] = {}
    ignored: dict[str, list[str]] = {}
    query_style_mvc = "mvc_decoder.W.weight" not in state
    for key, value in state.items():
        reason = next((r for p, r in IGNORED_KEYS.items() if re.search(p, key)), None)
        if reason is None and query_style_mvc and key.startswith("mvc_decoder."):
            reason = MVC_QUERY_STYLES
        if reason is None:
            kept[key] = value
        else:
            ignored.setdefault(reason, []).append(key)
    return kept, ignored


def config_from_checkpoint(
    args: Mapping[str, Any], state: Mapping[str, Tensor], *, ntoken: int, **overrides: Any
) -> ScGPTConfig:
    """``args.json`` settings, with the optional heads taken from what the checkpoint holds."""
    inferred: dict[str, Any] = {
        "flag_encoder": "flag_encoder.weight" in state,
        "do_mvc": "mvc_decoder.W.weight" in state,
        "explicit_zero_prob": "decoder.zero_logit.0.weight" in state,
    }
    embsize = int(args.get("embsize", 0))
    fc0 = state.get("decoder.fc.0.weight")
    if fc0 is not None and embsize and fc0.shape[1] == 2 * embsize:
        inferred["decoder_batch_labels"] = True
    if "cls_decoder.out_layer.weight" in state:
        linears = {k for k in state if re.match(r"^cls_decoder\._decoder\.\d+\.weight$", k)}
        inferred["n_cls"] = int(state["cls_decoder.out_layer.weight"].shape[0])
        inferred["cls_decoder"] = True
        inferred["n_layers_cls"] = len(linears) // 2 + 1  # Linear and LayerNorm per block
    inferred.update(overrides)
    return ScGPTConfig.from_args(args, ntoken=ntoken, **inferred)


def _first(keys: list[str]) -> str:
    shown = ", ".join(keys[:N_KEYS_SHOWN])
    return shown + (f" (+{len(keys) - N_KEYS_SHOWN} more)" if len(keys) > N_KEYS_SHOWN else "")


def load_checkpoint_state(
    model: TransformerModel, state: Mapping[str, Tensor], *, source: str
) -> dict[str, list[str]]:
    """Load ``state`` (either attention layout) into ``model`` with ``strict=True``.

    Keys in ``IGNORED_KEYS`` are dropped and logged. Returns the dropped keys by reason.

    Raises
    ------
    CheckpointError
        Listing the first missing / unexpected keys or mismatched shapes.
    """
    converted = to_torch_layout(state)
    if len(converted) != len(state):
        raise CheckpointError(
            f"{source} holds attention weights in both layouts (Wqkv and in_proj); "
            "keep one of them."
        )
    kept, ignored = split_ignored(converted)
    for reason, keys in ignored.items():
        logger.warning(
            "scgpt: ignoring %d checkpoint tensors of the %s: %s", len(keys), reason, _first(keys)
        )
    expected = model.state_dict()
    # name keys in the checkpoint's own layout in messages
    shown = (
        (lambda k: k.replace(TORCH_QKV, FLASH_QKV))
        if attention_layout(state) == "flash"
        else (lambda k: k)
    )
    missing = [shown(k) for k in expected if k not in kept]
    unexpected = [shown(k) for k in kept if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys: {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys: {_first(unexpected)}")
        raise CheckpointError(
            f"{source} does not fit the scGPT TransformerModel built from args.json ("
            + "; ".join(parts)
            + "); check that args.json belongs to this checkpoint."
        )
    wrong = [
        f"{k} {tuple(kept[k].shape)}≠{tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(kept[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise CheckpointError(
            f"{source} tensor shapes differ from args.json ({_first(wrong)}); "
            "use the args.json that ships with the checkpoint."
        )
    model.load_state_dict(kept, strict=True)
    logger.info(
        "scgpt: loaded %d tensors from %s (%s attention layout); heads not used for the "
        "embedding: %s",
        len(kept),
        source,
        attention_layout(state),
        ", ".join(unused_heads(model)) or "none",
    )
    return ignored


def unused_heads(model: TransformerModel) -> list[str]:
    """List the loaded modules the cell embedding does not use (decoders, flag encoder)."""
    heads = [
        f"{name} ({model.config.n_cls} outputs)" if name == "cls_decoder" else name
        for name in ("decoder", "cls_decoder", "mvc_decoder", "flag_encoder")
        if hasattr(model, name)
    ]
    return heads
