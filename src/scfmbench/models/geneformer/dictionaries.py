"""Geneformer's dictionaries: token, gene median, gene name → ID and ID mapping pickles.

Found beside or above the model folder (a clone of the Hugging Face repository) or in the
folder given with ``--geneformer-dicts``, and chosen by the model's vocabulary size.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from scfmbench.errors import CheckpointError
from scfmbench.hashing import hash_file, hash_json

logger = logging.getLogger(__name__)

DICTIONARY_KINDS = (
    "token_dictionary",
    "gene_median_dictionary",
    "gene_name_id_dict",
    "ensembl_mapping_dict",
)
REQUIRED_KINDS = ("token_dictionary", "gene_median_dictionary")
CORPUS_SUFFIXES = ("_gc104M", "_gc95M", "_gc30M", "")
DICTS_FLAG = "--geneformer-dicts"


# Dictionary pickles hold only builtins and numpy scalars; anything else is refused.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "dtype"),
}


class _DictionaryUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a dictionary")


def _load_dictionary(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            obj = _DictionaryUnpickler(fh).load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise CheckpointError(
            f"cannot read Geneformer dictionary {path} ({type(exc).__name__}: {exc}); "
            f"replace it with the released file or pass another directory with {DICTS_FLAG}."
        ) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"Geneformer dictionary {path} holds a {type(obj).__name__}, not a dict; "
            f"pass the released dictionaries with {DICTS_FLAG}."
        )
    return obj


def _find_dictionary(directory: Path, kind: str) -> Path | None:
    found = [directory / f"{kind}{s}.pkl" for s in CORPUS_SUFFIXES]
    found = [p for p in found if p.is_file()]
    if len(found) > 1:
        raise CheckpointError(
            f"{directory} holds several {kind} files ({', '.join(p.name for p in found)}); "
            f"keep one corpus's dictionaries per directory and pass it with {DICTS_FLAG}."
        )
    return found[0] if found else None


# Where a clone of the Hugging Face repository keeps the dictionaries, relative to the repository
# root: V2 (gc95M/gc104M) in geneformer/, V1 (gc30M) in geneformer/gene_dictionaries_30m/.
DICTIONARY_SUBDIRS = (
    ".",
    "geneformer",
    "geneformer/gene_dictionaries_30m",
    "gene_dictionaries_30m",
)
SEARCH_LEVELS = 3  # the model folder, its parent (the repository root) and one more


def dictionary_sets(directory: Path) -> list[dict[str, Path]]:
    """List the dictionary sets in ``directory``, one per corpus suffix.

    Suffixes ``_gc104M``, ``_gc95M``, ``_gc30M`` or none; each set is ``{kind: path}`` with at
    least the required kinds.
    """
    sets = []
    for suffix in CORPUS_SUFFIXES:
        files = {kind: directory / f"{kind}{suffix}.pkl" for kind in DICTIONARY_KINDS}
        files = {kind: path for kind, path in files.items() if path.is_file()}
        if all(kind in files for kind in REQUIRED_KINDS):
            sets.append(files)
    return sets


def find_dictionaries(
    model_dir: Path, *, vocab_size: int, dicts_dir: Path | None = None
) -> GeneformerDictionaries:
    """Find the dictionaries whose token dictionary has ``vocab_size`` tokens.

    Searched in ``dicts_dir`` when given, else in the model folder and up to two folders
    above it (a clone of the Hugging Face repository: ``Geneformer-V1-10M/`` beside
    ``geneformer/gene_dictionaries_30m/*_gc30M.pkl``, ``Geneformer-V2-104M/`` beside
    ``geneformer/*_gc104M.pkl``), each folder with its ``DICTIONARY_SUBDIRS``. The first set
    with the model's vocabulary size wins (25,426 tokens: gc30M; 20,275: gc95M/gc104M).

    Raises
    ------
    CheckpointError
        No dictionaries found, or none of the model's vocabulary size.
    """
    bases = [Path(dicts_dir)] if dicts_dir is not None else []
    if dicts_dir is None:
        bases = [model_dir, *list(Path(model_dir).resolve().parents)[: SEARCH_LEVELS - 1]]
    if dicts_dir is not None and not Path(dicts_dir).is_dir():
        raise CheckpointError(
            f"Geneformer dictionary directory {dicts_dir} does not exist; pass the folder "
            f"with token_dictionary*.pkl and gene_median_dictionary*.pkl via {DICTS_FLAG}."
        )
    seen: list[str] = []
    for base in bases:
        for sub in DICTIONARY_SUBDIRS:
            directory = base / sub
            if not directory.is_dir():
                continue
            for files in dictionary_sets(directory):
                size = len(_load_dictionary(files["token_dictionary"]))
                seen.append(f"{files['token_dictionary']} ({size} tokens)")
                if size == vocab_size:
                    logger.info(
                        "geneformer: dictionaries %s (%d tokens)", files["token_dictionary"], size
                    )
                    return GeneformerDictionaries.from_files(**files)
    where = dicts_dir if dicts_dir is not None else f"{model_dir} or the folders above it"
    if not seen:
        raise CheckpointError(
            f"no token_dictionary*.pkl with gene_median_dictionary*.pkl in {where}; pass the "
            f"folder holding the Geneformer dictionaries with {DICTS_FLAG}."
        )
    raise CheckpointError(
        f"the model has vocab_size {vocab_size} but the dictionaries found have other sizes "
        f"({'; '.join(seen[:4])}); pass this model's corpus dictionaries with {DICTS_FLAG} "
        "(25,426 tokens: gc30M for V1; 20,275: gc95M/gc104M for V2)."
    )


@dataclass(frozen=True)
class GeneformerDictionaries:
    """The four Geneformer dictionaries (token, gene median, gene name → ID, ID mapping).

    Load with ``from_dir`` (accepts ``*_gc30M.pkl``, ``*_gc95M.pkl``, ``*_gc104M.pkl`` and the
    old unsuffixed names) or ``from_files``. Without an ensembl mapping dictionary the mapping
    is the identity over the token dictionary (as in the reference); without a gene-name
    dictionary only Ensembl identifiers can be tokenized.
    """

    token_dict: dict[str, int] = field(repr=False)
    gene_median: dict[str, float] = field(repr=False)
    ensembl_mapping: dict[str, str] = field(repr=False)
    gene_name_id: dict[str, str] | None = field(repr=False)
    files: dict[str, Path]
    sha256: str

    @classmethod
    def from_dir(cls, directory: str | Path) -> GeneformerDictionaries:
        """Load the dictionaries found in ``directory`` (no other location is searched)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(
                f"Geneformer dictionary directory {directory} does not exist; pass the folder "
                f"with token_dictionary*.pkl and gene_median_dictionary*.pkl via {DICTS_FLAG}."
            )
        files = {kind: _find_dictionary(directory, kind) for kind in DICTIONARY_KINDS}
        for kind in REQUIRED_KINDS:
            if files[kind] is None:
                raise CheckpointError(
                    f"no {kind}*.pkl (e.g. {kind}_gc95M.pkl or {kind}.pkl) in {directory}; "
                    f"pass the folder holding the Geneformer dictionaries with {DICTS_FLAG}."
                )
        return cls.from_files(**{kind: p for kind, p in files.items() if p is not None})

    @classmethod
    def from_files(
        cls,
        *,
        token_dictionary: str | Path,
        gene_median_dictionary: str | Path,
        ensembl_mapping_dict: str | Path | None = None,
        gene_name_id_dict: str | Path | None = None,
    ) -> GeneformerDictionaries:
        """Load explicitly named dictionary files."""
        named = {
            "token_dictionary": token_dictionary,
            "gene_median_dictionary": gene_median_dictionary,
            "gene_name_id_dict": gene_name_id_dict,
            "ensembl_mapping_dict": ensembl_mapping_dict,
        }
        files = {kind: Path(p) for kind, p in named.items() if p is not None}
        for kind, path in files.items():
            if not path.is_file():
                raise CheckpointError(
                    f"Geneformer {kind} file {path} does not exist; pass the folder holding "
                    f"the dictionaries with {DICTS_FLAG}."
                )
        loaded = {kind: _load_dictionary(path) for kind, path in files.items()}
        token_dict = {str(k): int(v) for k, v in loaded["token_dictionary"].items()}
        genes = [k for k in token_dict if not k.startswith("<")]
        medians = loaded["gene_median_dictionary"]
        lacking = [g for g in genes if g not in medians]
        if lacking:
            raise CheckpointError(
                f"{files['gene_median_dictionary']} has no median for {len(lacking)} token "
                f"genes (e.g. {lacking[:3]}); token and median dictionaries must come from the "
                f"same corpus ({DICTS_FLAG})."
            )
        if "ensembl_mapping_dict" in loaded:
            mapping = {str(k): str(v) for k, v in loaded["ensembl_mapping_dict"].items()}
        else:
            logger.info("no ensembl_mapping_dict: using the identity over the token dictionary")
            mapping = {g: g for g in genes}
        name_id = loaded.get("gene_name_id_dict")
        return cls(
            token_dict=token_dict,
            gene_median={g: float(medians[g]) for g in genes},
            ensembl_mapping=mapping,
            gene_name_id=None if name_id is None else {str(k): str(v) for k, v in name_id.items()},
            files=files,
            sha256=hash_json({kind: hash_file(p) for kind, p in sorted(files.items())}),
        )

    @cached_property
    def mapping_targets(self) -> dict[str, str]:
        """The ensembl mapping restricted to targets in the token dictionary (as the reference)."""
        return {k: v for k, v in self.ensembl_mapping.items() if v in self.token_dict}

    @property
    def version(self) -> str:
        """``"V2"`` when the vocabulary has ``<cls>`` and ``<eos>``, else ``"V1"``."""
        return "V2" if {"<cls>", "<eos>"} <= self.token_dict.keys() else "V1"
