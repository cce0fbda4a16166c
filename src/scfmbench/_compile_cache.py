"""Keep the code numba and XLA compile on first use, so a fresh process does not compile it again.

numba compiles UMAP's fuzzy graph and layout, XLA the scib-metrics scores.

Compiling is a large share of a small run: on PBMC3k the zero-shot scores and the UMAP of
one view took 11.6 CPU s in a fresh process, 3.8 CPU s with the compiled code kept. The
cached code is the code that would be compiled again (both caches key on the source and the
machine), so results are unchanged.

XLA's cache lives in ``$SCFMBENCH_COMPILE_CACHE/jax`` (default folder
``$XDG_CACHE_HOME/scfmbench`` or ``~/.cache/scfmbench``), numba's where numba keeps its own
(``__pycache__`` beside UMAP's sources, or ``$NUMBA_CACHE_DIR``); ``SCFMBENCH_COMPILE_CACHE=off``
turns both off. A folder that cannot be written leaves them off, silently.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

ENV = "SCFMBENCH_COMPILE_CACHE"
UMAP_KERNELS = {
    "umap.umap_": ("smooth_knn_dist", "compute_membership_strengths", "make_epochs_per_sample"),
    "umap.layouts": ("_nb_optimize_layout_euclidean_single_epoch",),
}
"""The numba kernels of UMAP that a run compiles (the connectivities of the kNN graph and the
layout); UMAP compiles them on every import, not marking them ``cache=True``."""

_done: set[str] = set()


def cache_root() -> Path | None:
    """Return the cache folder, or None when turned off or not writable."""
    setting = os.environ.get(ENV, "")
    if setting.lower() in ("off", "0", "false", "no"):
        return None
    if setting:
        root = Path(setting)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root = Path(base) / "scfmbench"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return root if os.access(root, os.W_OK) else None


def keep_xla_code() -> None:
    """Use a persistent XLA compilation cache (unless one is set already)."""
    if "jax" in _done:
        return
    _done.add("jax")
    root = cache_root()
    if root is None:
        return
    import jax

    cache_dir = jax.config.jax_compilation_cache_dir  # pyright: ignore[reportAttributeAccessIssue]
    if cache_dir:  # the user's own choice wins
        return
    jax.config.update("jax_compilation_cache_dir", str(root / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def keep_umap_code() -> None:
    """Let numba cache UMAP's kernels on disk (its own cache folder for them)."""
    if "umap" in _done:
        return
    _done.add("umap")
    if cache_root() is None:
        return
    import importlib

    for module_name, names in UMAP_KERNELS.items():
        module = importlib.import_module(module_name)
        for name in names:
            kernel = getattr(module, name, None)
            if kernel is not None and hasattr(kernel, "enable_caching"):
                try:
                    kernel.enable_caching()
                except Exception as exc:  # noqa: BLE001  (a cache is optional)
                    logger.debug("numba cache for %s.%s not enabled: %s", module_name, name, exc)
