"""Run manifest: what produced a run (versions, commit, hardware) and hashes of its inputs."""

from __future__ import annotations

import logging
import os
import platform
import re
import subprocess
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from scfmbench._atomic import write_json
from scfmbench.hashing import hash_file, hash_json

logger = logging.getLogger(__name__)

MANIFEST_VERSION = "1.0"
# import name → distribution names to try (xgboost ships as xgboost or xgboost-cpu)
PACKAGES: dict[str, tuple[str, ...]] = {
    "scfmbench": (),
    "numpy": ("numpy",),
    "scipy": ("scipy",),
    "pandas": ("pandas",),
    "anndata": ("anndata",),
    "scanpy": ("scanpy",),
    "scikit-learn": ("scikit-learn",),
    "xgboost": ("xgboost", "xgboost-cpu"),
    "torch": ("torch",),
    "transformers": ("transformers",),
}
SHA256 = re.compile(r"^[0-9a-f]{64}$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def package_versions() -> dict[str, str | None]:
    """Return the version of each package in ``PACKAGES`` (None when not installed).

    scfmbench's own is the imported package's ``__version__``.
    """
    from scfmbench._version import __version__

    versions: dict[str, str | None] = {"scfmbench": __version__}
    for name, dists in PACKAGES.items():
        if name in versions:
            continue
        versions[name] = None
        for dist in dists:
            try:
                versions[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return versions


def git_commit() -> dict[str, Any] | None:
    """Return ``{"commit", "dirty"}`` of the checkout scfmbench is imported from, or None."""
    package_dir = Path(__file__).resolve().parents[1]  # src/scfmbench (this file is in report/)

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(package_dir), *args],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    # only trust a checkout that actually contains this package (not an enclosing repo)
    if not top or package_dir != (Path(top) / "src" / "scfmbench").resolve():
        return None
    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _ram_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def hardware() -> dict[str, Any]:
    """Return the CPU model, logical cores, RAM and the CUDA GPU (when torch sees one).

    The GPU is asked of torch only when the run loaded it (a model or scVI): a run without
    one used the CPU alone, and importing torch would add seconds to it.
    """
    gpu = None
    try:
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception as exc:  # noqa: BLE001 - a broken torch must not stop the manifest
        logger.debug("no GPU information: %s", exc)
    ram = _ram_bytes()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gb": round(ram / 2**30, 1) if ram else None,
        "gpu": gpu,
        "platform": platform.platform(),
    }


def _checkpoint_entry(value: str) -> dict[str, Any]:
    """Hash a checkpoint given as a SHA-256, a weights file or a model folder (its weights)."""
    if SHA256.match(value.lower()):
        return {"source": None, "sha256": value.lower()}
    path = Path(value)
    if path.is_file():
        return {"source": str(path), "sha256": hash_file(path)}
    if path.is_dir():
        files = {
            p.relative_to(path).as_posix(): hash_file(p)
            for p in sorted(path.rglob("*"))
            if p.is_file() and p.suffix in WEIGHT_SUFFIXES
        }
        return {"source": str(path), "sha256": hash_json(files) if files else None, "files": files}
    logger.warning("checkpoint %s not found; its hash is left out of the manifest", value)
    return {"source": value, "sha256": None}


def _config_dict(config: Any) -> dict[str, Any] | None:
    if config is None:
        return None
    if hasattr(config, "model_dump"):
        return config.model_dump(mode="json")
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"config must be a RunConfig or a mapping, not {type(config).__name__}")


def _split_hashes(run_dir: Path) -> dict[str, str]:
    """Return the SHA-256 of each split file, keyed by name.

    ``splits/NAME`` is keyed NAME; a held-out run's random-split design
    (``random_split/splits/NAME``) ``random_split/NAME``.
    """
    hashes = {}
    for folder, prefix in (("splits", ""), ("random_split/splits", "random_split/")):
        if (run_dir / folder).is_dir():
            files = sorted(p for p in (run_dir / folder).iterdir() if p.is_file())
            hashes.update({prefix + p.name: hash_file(p) for p in files})
    return hashes


def _data_entry(path: str | Path | None) -> dict[str, str | None]:
    """Return a data file's absolute path and SHA-256 (None for a built-in name or in memory)."""
    if path is None or not Path(path).is_file():
        return {"path": None if path is None else str(path), "sha256": None}
    return {"path": str(Path(path).resolve()), "sha256": hash_file(Path(path))}


def write_manifest(
    run_dir: Path,
    *,
    config: Any,
    data_path_or_none: str | Path | None,
    seeds: list[int],
    checkpoints: Mapping[str, str],
    datasets: Mapping[str, str | Path | None] | None = None,
) -> Path:
    """Write ``run_dir/manifest.json``: what produced the run and hashes of its inputs.

    It records the scfmbench version and git commit, Python, package versions, hardware,
    seeds, and the SHA-256 of the data file, the split files, each checkpoint and the config.

    Parameters
    ----------
    run_dir : Path
        The run folder (its ``splits/``, ``random_split/splits/`` and ``config.yaml`` are
        hashed when present).
    config : RunConfig or mapping
        The resolved configuration; its JSON hash is recorded beside the SHA-256 of
        ``config.yaml``.
    data_path_or_none : str or Path or None
        The data file (hashed), a built-in dataset name, or None for an in-memory AnnData.
    seeds : list of int
        The split seeds.
    checkpoints : mapping of str to str
        Model id → weights file, model folder, or an already computed SHA-256.
    datasets : mapping of str to (str or Path or None), optional
        A transfer's datasets by name, each hashed as ``data_path_or_none`` is, under
        ``datasets``; absent for a run on one dataset.

    Returns
    -------
    Path
        ``run_dir / "manifest.json"``.

    Raises
    ------
    TypeError
        When ``config`` is neither a ``RunConfig`` nor a mapping.
    """
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    resolved = _config_dict(config)
    versions = package_versions()
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "scfmbench": {"version": versions["scfmbench"], "git": git_commit()},
        "python": platform.python_version(),
        "executable": sys.executable,
        "packages": versions,
        "hardware": hardware(),
        "seeds": [int(s) for s in seeds],
        "data": _data_entry(data_path_or_none),
        **(
            {"datasets": {name: _data_entry(path) for name, path in datasets.items()}}
            if datasets is not None
            else {}
        ),
        "splits": _split_hashes(run_dir),
        "checkpoints": {name: _checkpoint_entry(str(v)) for name, v in checkpoints.items()},
        "config": {
            "file": config_path.name if config_path.is_file() else None,
            "sha256": hash_file(config_path) if config_path.is_file() else None,
            "resolved_sha256": hash_json(resolved) if resolved is not None else None,
        },
    }
    target = run_dir / "manifest.json"
    write_json(target, manifest)
    logger.debug("wrote %s", target)
    return target
