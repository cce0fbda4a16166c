"""Stage bookkeeping: a stage's output is reused when it was made from the same inputs."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from scfmbench._atomic import write_json

SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(name: str) -> str:
    """Return a file-name-safe method or stage name (``pca+logreg`` → ``pca__logreg``)."""
    return SAFE_NAME.sub("_", name.replace("+", "__"))


class StageStore:
    """JSON records under ``<run>/stages/``: ``{"key": inputs hash, "payload": …}``."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "stages"
        self.timings: dict[str, float] = {}
        self.details: dict[str, dict[str, float]] = {}
        self.worker_cpu_seconds = 0.0
        """CPU seconds spent by worker processes (added with :meth:`add`)."""

    def _path(self, name: str) -> Path:
        return self.root / f"{safe_name(name)}.json"

    def _record(self, name: str) -> dict[str, Any]:
        """Return the stored record of stage ``name`` (empty: none, or unreadable)."""
        path = self._path(name)
        if not path.exists():
            return {}
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            return {}
        return record if isinstance(record, dict) else {}

    def load(self, name: str, key: str) -> Any | None:
        """Return the stored payload of stage ``name`` if it was made from inputs ``key``."""
        record = self._record(name)
        return record.get("payload") if record.get("key") == key else None

    def saved(self, name: str) -> Any | None:
        """Return the stored payload of stage ``name`` whatever inputs made it (None: none)."""
        return self._record(name).get("payload")

    def save(self, name: str, key: str, payload: Any) -> None:
        """Store ``payload`` of stage ``name`` as made from inputs ``key`` (atomically)."""
        write_json(self._path(name), {"key": key, "payload": payload})

    def remove_unfinished(self) -> list[str]:
        """Remove the temporary files of writes that never finished, and return their names.

        A record is written to a hidden ``.<name>.json.*.tmp`` beside it and renamed into
        place; a worker process stopped in between (joblib ends its workers on Ctrl-C) leaves
        the temporary file behind. Call it before this store's workers start.
        """
        if not self.root.is_dir():
            return []
        leftovers = sorted(self.root.glob(".*.tmp"))
        for path in leftovers:
            path.unlink(missing_ok=True)
        return [path.name for path in leftovers]

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Add the block's wall seconds to stage ``name``.

        Its process CPU seconds, less sensitive to other work on a shared machine, are added
        as ``cpu_seconds``.
        """
        start, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
            entry = self.details.setdefault(name, {})
            entry["cpu_seconds"] = round(
                entry.get("cpu_seconds", 0.0) + time.process_time() - cpu, 3
            )
            entry["peak_rss_mb"] = peak_rss_mb()

    def add(self, name: str, seconds: float, cpu_seconds: float, *, worker: bool = True) -> None:
        """Add wall and CPU seconds spent on stage ``name``.

        By default they were spent in another process (a worker), whose CPU seconds are also
        added to :attr:`worker_cpu_seconds`; ``worker=False``: in this one.
        """
        self.timings[name] = self.timings.get(name, 0.0) + seconds
        entry = self.details.setdefault(name, {})
        entry["cpu_seconds"] = round(entry.get("cpu_seconds", 0.0) + cpu_seconds, 3)
        if worker:
            self.worker_cpu_seconds += cpu_seconds

    def absorb(self, other: StageStore, *, prefix: str) -> None:
        """Add the timings of ``other`` (a part of this run) as stages ``<prefix><name>``."""
        for name, seconds in other.timings.items():
            self.timings[prefix + name] = self.timings.get(prefix + name, 0.0) + seconds
            self.details[prefix + name] = dict(other.details.get(name, {}))
        self.worker_cpu_seconds += other.worker_cpu_seconds

    def note(self, name: str, **info: float) -> None:
        """Attach numbers (e.g. ``n_cells``) to a timed stage for the report."""
        self.details.setdefault(name, {}).update(info)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per stage: seconds, peak RSS so far (MB) and any noted numbers, e.g. cells/s."""
        out = {}
        for name, seconds in self.timings.items():
            entry = {"seconds": round(seconds, 3), **self.details.get(name, {})}
            if "n_cells" in entry and seconds > 0:
                entry["cells_per_s"] = round(entry["n_cells"] / seconds, 2)
            out[name] = entry
        return out


@contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block ends, then raise KeyboardInterrupt.

    For compiled code that an interrupt must not cut short: a KeyboardInterrupt raised while
    numba's LLVM compiles UMAP's kernels was swallowed (the run went on) or crashed the
    process (SIGSEGV). The block finishes, then the run stops as after any Ctrl-C, keeping its
    finished stages. Outside the main thread (no signal handlers there), or where SIGINT is
    ignored (a background job of a shell without job control), it does nothing.
    """
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux ru_maxrss is in KiB)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)
