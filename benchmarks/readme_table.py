"""The README's benchmark table, built from ``benchmarks/results/*.json``.

Each row family has one builder (``geneformer_rows``, ``scgpt_rows``, …) that reads the parsed
JSON of the files it names and returns its rows; a row names the JSON its figures come from. A
family whose file is absent, or a row whose keys are absent, is left out, so the table shows
only what was measured. The table sits in README.md between ``<!-- benchmark-table:start -->``
and ``<!-- benchmark-table:end -->``; ``benchmarks/run_all.py`` rewrites it at its end.

    python benchmarks/readme_table.py           # rewrite the table in README.md
    python benchmarks/readme_table.py --check   # exit 1 when README.md's table is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
README = REPO / "README.md"
START = "<!-- benchmark-table:start -->"
END = "<!-- benchmark-table:end -->"
HEADER = ("| benchmark | figure | target | JSON |", "| --- | ---: | ---: | --- |")

# Targets of issue 20 and earlier ones that the scripts do not write into their JSON.
TARGET_FINETUNE_VS_TRAINER = "≥ 1.0"
TARGET_RSS_GROWTH = "≤ 1.5×"

Docs = Mapping[str, dict]


@dataclass(frozen=True)
class Row:
    """One table row: what was measured, the figure, the target and the JSON files it reads."""

    benchmark: str
    value: str
    target: str
    sources: tuple[str, ...]

    def markdown(self) -> str:
        """The row as a Markdown table line, its sources linked to ``benchmarks/results/``."""
        links = ", ".join(f"[{name}](benchmarks/results/{name})" for name in self.sources)
        return f"| {self.benchmark} | {self.value} | {self.target} | {links} |"


# --------------------------------------------------------------------------------------
# formatting
# --------------------------------------------------------------------------------------


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _cells(n: int) -> str:
    """200000 → '200k', 2638 → '2,638'."""
    return f"{n // 1000}k" if n % 1000 == 0 else f"{n:,}"


def _load(pair) -> str:
    """The 1-minute load average before/after as 'load 1–4' (rounded, low to high)."""
    if not isinstance(pair, list | tuple) or not pair or not all(map(_number, pair)):
        return ""
    low, high = round(min(pair)), round(max(pair))
    return f"load {low}" if low == high else f"load {low}–{high}"


def _met(value: float, target: float) -> str:
    return "met" if value <= target else "not met"


# --------------------------------------------------------------------------------------
# row families, one builder each
# --------------------------------------------------------------------------------------


def _key_row(name: str, doc: dict, key: str, benchmark: str, value: str, target: str) -> list[Row]:
    """One row for ``doc[key]`` (none when absent), figure and target formatted by ``value``
    and ``target`` (e.g. ``"{:.2f}×"``, ``"≥ {:g}×"``; target "—" when ``targets`` lacks it)."""
    figure, goal = doc.get(key), doc.get("targets", {}).get(key)
    if not _number(figure):
        return []
    goal_text = target.format(goal) if _number(goal) else "—"
    return [Row(benchmark, value.format(figure), goal_text, (name,))]


def geneformer_rows(docs: Docs) -> list[Row]:
    """Tokenizer and embedding ratios of ``geneformer_throughput.py``."""
    name = "geneformer_throughput.json"
    doc = docs.get(name)
    if doc is None:
        return []
    return [
        *_key_row(
            name,
            doc,
            "tokenize_speedup",
            "Geneformer tokenizer vs per-cell loop (PBMC3k, identical tokens)",
            "{:.1f}×",
            "≥ {:g}×",
        ),
        *_key_row(
            name,
            doc,
            "embed_speedup_vs_pad_to_max",
            "Geneformer embedding, length-sorted dynamic batches vs pad-to-max (6L shape)",
            "{:.2f}×",
            "≥ {:g}×",
        ),
        *_key_row(
            name,
            doc,
            "pipeline_overhead_fraction",
            "Geneformer `embed()` overhead over the bare forward",
            "{:.1%}",
            "≤ {:.0%}",
        ),
        *flop_rows("Geneformer", name, doc),
    ]


def flop_rows(model: str, name: str, doc: dict) -> list[Row]:
    """FLOP fraction and speed-up / padding-waste bound of ``flop_report`` (when recorded)."""
    key = "flop_utilization" if "flop_utilization" in doc else "flop_fraction"
    rows = _key_row(
        name, doc, key, f"{model} forward FLOP rate / plain fp32 matmul rate", "{:.2f}", "≥ {:g}"
    )
    speedup, bound = doc.get("speedup_vs_pad_to_max"), doc.get("padding_waste_bound")
    if _number(speedup) and _number(bound):
        rows += _key_row(
            name,
            doc,
            "speedup_fraction_of_bound",
            f"{model} matmul-equivalent speed-up over pad-to-max / padding-waste bound "
            f"({speedup:.2f}× / {bound:.2f}×)",
            "{:.2f}",
            "≥ {:g}",
        )
    return rows


def scgpt_rows(docs: Docs) -> list[Row]:
    """Wall and CPU speed-up over pad-to-max of ``scgpt_throughput.py``, and its FLOP rows."""
    name = "scgpt_throughput.json"
    doc = docs.get(name)
    if doc is None:
        return []
    rows = []
    wall, cpu = (
        doc.get("embed_speedup_vs_pad_to_max"),
        doc.get("embed_speedup_vs_pad_to_max_cpu_time"),
    )
    if _number(wall):
        value = f"{wall:.2f}× wall" + (f", {cpu:.2f}× CPU" if _number(cpu) else "")
        rows.append(Row("scGPT embedding vs pad-to-max (scGPT_human shape)", value, "—", (name,)))
    return rows + flop_rows("scGPT", name, doc)


def scfoundation_rows(docs: Docs) -> list[Row]:
    """Speed-up over pad-to-max of ``scfoundation_throughput.py``, and its FLOP rows."""
    name = "scfoundation_throughput.json"
    doc = docs.get(name)
    if doc is None:
        return []
    rows = []
    speedup = doc.get("embed_speedup_vs_pad_to_max")
    if _number(speedup):
        depth = doc.get("encoder", {}).get("depth")
        layers = f", {depth} layer{'s' if depth != 1 else ''}" if _number(depth) else ""
        rows.append(
            Row(
                f"scFoundation embedding vs pad-to-max (released layer shape{layers})",
                f"{speedup:.2f}×",
                "—",
                (name,),
            )
        )
    return rows + flop_rows("scFoundation", name, doc)


def _finetune_ratio(doc: dict) -> tuple[str, float] | None:
    """The engine's training cells/s (or, in older files, steps/s) over the ``Trainer``'s."""
    for key, unit in (
        ("cells_per_s_ratio_vs_trainer", "training cells/s"),
        ("steps_per_s_ratio_vs_trainer", "steps/s"),
    ):
        if _number(doc.get(key)):
            return unit, doc[key]
    return None


def finetune_rows(docs: Docs) -> list[Row]:
    """Fine-tuning speed against the Hugging Face ``Trainer`` (``finetune_throughput.py``)."""
    name = "finetune_throughput.json"
    found = _finetune_ratio(docs.get(name, {}))
    if not found:
        return []
    unit, ratio = found
    return [
        Row(
            f"fine-tuning {unit} vs Hugging Face `Trainer` (same model, data, batch)",
            f"{ratio:.2f}×",
            TARGET_FINETUNE_VS_TRAINER,
            (name,),
        )
    ]


def _rss_growth_rows(name: str, what: str, sizes: list[dict]) -> list[Row]:
    """Peak RSS at the largest size / at the smallest, against the ≤ 1.5× target."""
    if len(sizes) < 2:
        return []
    small, large = sizes[0], sizes[-1]
    cells = f"{_cells(large['n_cells'])} vs {_cells(small['n_cells'])} cells"
    return [
        Row(
            what.format(cells=cells),
            f"{large['peak_rss_mb'] / small['peak_rss_mb']:.2f}×",
            TARGET_RSS_GROWTH,
            (name,),
        )
    ]


def embed_scaling_rows(docs: Docs) -> list[Row]:
    """Peak RSS of the streaming ``embed``, largest vs smallest size (``run_all.py``)."""
    name = "scaling.json"
    sizes = docs.get(name, {}).get("sizes", [])
    return _rss_growth_rows(name, "streaming `embed` peak RSS, {cells}", sizes)


def run_scaling_rows(docs: Docs) -> list[Row]:
    """Peak RSS of ``run --backed`` across sizes, and in memory vs streamed (``run_all.py``)."""
    name = "run_scaling.json"
    runs = docs.get(name, {}).get("runs", [])
    backed = [r for r in runs if r.get("mode") == "backed"]
    rows = _rss_growth_rows(
        name,
        "streaming `run --backed` peak RSS, {cells} (PCA baseline + tiny scGPT, logreg)",
        backed,
    )
    streamed = {r["n_cells"]: r["peak_rss_mb"] for r in backed}
    both = [r for r in runs if r.get("mode") == "memory" and r["n_cells"] in streamed]
    if both:
        memory = max(both, key=lambda r: r["n_cells"])
        rss = streamed[memory["n_cells"]]
        rows.append(
            Row(
                f"in-memory `run` peak RSS / streamed `run` peak RSS, "
                f"{_cells(memory['n_cells'])} cells ({memory['peak_rss_mb']:,.0f} vs "
                f"{rss:,.0f} MB)",
                f"{memory['peak_rss_mb'] / rss:.2f}×",
                "—",
                (name,),
            )
        )
    return rows


def label_efficiency_rows(docs: Docs) -> list[Row]:
    """Wall time of the label-efficiency sweep (``label_efficiency.py``)."""
    name = "label_efficiency.json"
    doc = docs.get(name)
    if doc is None or not _number(doc.get("sweep_wall_s")):
        return []
    sweep = doc["sweep_wall_s"]
    settings = ", default baselines" + ("" if doc.get("scvi", True) else " `--no-scvi`")
    if doc.get("sizes"):
        settings += f", sizes {doc['sizes']}"
        if doc.get("draws"):
            settings += f" × {doc['draws']} draws"
    load = _load(doc.get("load_average_before_after"))
    value = f"{sweep:.1f} s wall"
    if _number(doc.get("wall_s")):
        value += f" (whole run {doc['wall_s']:.1f} s)"
    target = doc.get("target_s")
    return [
        Row(
            f"label-efficiency sweep, PBMC3k{settings} (`benchmarks/label_efficiency.py`)"
            + (f", {load}" if load else ""),
            value,
            f"≤ {target:g} s: {_met(sweep, target)}" if _number(target) else "—",
            (name,),
        )
    ]


def _run_cost_value(part: dict) -> str:
    """'830.4 s wall, 99.4 s CPU (scVI 425.0 s wall, 51.0 s CPU)' from one ``stages`` part.

    ``cpu_s`` includes the probes' worker processes (``workers_cpu_s``); with workers, the
    stage wall seconds are the workers' summed, so only scVI's CPU seconds are shown.
    """
    value = f"{part['wall_s']:.1f} s wall, {part['cpu_s']:.1f} s CPU"
    in_workers = part.get("workers_cpu_s")
    scvi = (part.get("timings") or {}).get("features:scvi", {})
    if _number(in_workers) and in_workers > 0:
        value += f", {in_workers:.1f} s of it in the probes' worker processes"
        if _number(scvi.get("cpu_seconds")):
            value += f" (scVI {scvi['cpu_seconds']:.1f} s CPU)"
    elif _number(scvi.get("seconds")):
        value += f" (scVI {scvi['seconds']:.1f} s wall"
        if _number(scvi.get("cpu_seconds")):
            value += f", {scvi['cpu_seconds']:.1f} s CPU"
        value += ")"
    return value


def _run_cost_label(what: str, doc: dict, part_name: str) -> str:
    part = doc["stages"][part_name]
    n_cells = part.get("n_cells")
    details = [f"{n_cells:,} cells"] if _number(n_cells) else []
    details.append("`--no-scvi`" if doc.get("no_scvi") else "scVI included")
    if _load(part.get("load_avg_1min")):
        details.append(_load(part.get("load_avg_1min")))
    return f"{what} ({', '.join(details)}; `run_cost.py --parts {part_name}`)"


def _run_cost_part(docs: Docs, name: str, part_name: str) -> dict | None:
    """``stages[part_name]`` of ``docs[name]`` when it records wall and CPU seconds."""
    part = docs.get(name, {}).get("stages", {}).get(part_name)
    if part is None or not (_number(part.get("wall_s")) and _number(part.get("cpu_s"))):
        return None
    return part


def baselines_cost_rows(docs: Docs) -> list[Row]:
    """The baseline-only default ``run`` on PBMC3k against its 60 s target, and its wall time
    in one process (``--n-jobs 1``) against the default (``run_cost.py --parts baselines``)."""
    name, alone_name = "run_cost_baselines.json", "run_cost_baselines_one_process.json"
    part = _run_cost_part(docs, name, "baselines")
    if part is None:
        return []
    doc = docs[name]
    target = doc.get("targets", {}).get("baselines_s", 60.0)
    rows = [
        Row(
            _run_cost_label("baseline-only default `run` on PBMC3k", doc, "baselines"),
            _run_cost_value(part),
            f"≤ {target:g} s: {_met(part['wall_s'], target)}",
            (name,),
        )
    ]
    alone = _run_cost_part(docs, alone_name, "baselines")
    if alone is not None:
        rows.append(
            Row(
                "same, wall s in one process (`--n-jobs 1`) / with a probe worker per core "
                f"({alone['wall_s']:.1f} / {part['wall_s']:.1f})",
                f"{alone['wall_s'] / part['wall_s']:.2f}×",
                "—",
                (name, alone_name),
            )
        )
    return rows


def resample_cost_rows(docs: Docs) -> list[Row]:
    """The baseline-only default ``run`` on a resample of PBMC3k against its 10 min target
    (``run_cost.py --parts resample``, with scVI and ``--no-scvi``)."""
    rows = []
    for name in ("run_cost_resample.json", "run_cost_resample_noscvi.json"):
        part = _run_cost_part(docs, name, "resample")
        if part is None:
            continue
        doc = docs[name]
        target = doc.get("targets", {}).get("resample_s", 600.0)
        rows.append(
            Row(
                _run_cost_label(
                    "baseline-only default `run` on a PBMC3k resample", doc, "resample"
                ),
                _run_cost_value(part),
                f"≤ {target:g} s: {_met(part['wall_s'], target)}",
                (name,),
            )
        )
    return rows


def model_cost_rows(docs: Docs) -> list[Row]:
    """A default ``run --model geneformer=…`` against the baseline-only run plus one bare
    embedding pass of each network it embeds (``run_cost.py``, all parts): the pass to the
    default layer (``bare``) and, when measured, the pass through every layer
    (``bare-all``)."""
    name = "run_cost.json"
    doc = docs.get(name, {})
    parts = {part: _run_cost_part(docs, name, part) for part in ("baselines", "model")}
    if None in parts.values():
        return []
    stages = doc["stages"]
    model = doc.get("model", {})
    shape = (
        f"{model['layers']} layers, hidden {model['hidden']}; "
        if {"layers", "hidden"} <= set(model)
        else ""
    )
    n_cells = stages["baselines"].get("n_cells")
    cells = f"{n_cells:,} PBMC3k cells" if _number(n_cells) else "PBMC3k"
    target = doc.get("target")
    rows = []
    for bare, key, passes in (
        ("bare", "", "bare embedding passes to the default layer"),
        ("bare-all", "_all_layers", "bare embedding passes through every layer"),
    ):
        if _run_cost_part(docs, name, bare) is None:
            continue
        for clock, label, suffix in (("wall_s", "wall", "_wall"), ("cpu_s", "process CPU", "")):
            value = doc.get(f"ratio_run_vs_baselines_plus_bare_embedding{key}{suffix}")
            if not _number(value):
                continue
            floor = stages["baselines"][clock] + stages[bare][clock]
            rows.append(
                Row(
                    f"default `run --model geneformer=…` vs baseline-only run + {passes}, "
                    f"{label} s {stages['model'][clock]:.1f} / {floor:.1f} ({shape}{cells})",
                    f"{value:.2f}×",
                    f"≤ {target:g}×: {_met(value, target)}" if _number(target) else "—",
                    (name,),
                )
            )
    return rows


def probe_cost_rows(docs: Docs) -> list[Row]:
    """The xgboost probe at 64 against 256 histogram bins and the kNN probe's unit-length
    Euclidean search against the cosine one (``probe_cost.py``)."""
    name = "probe_cost.json"
    doc = docs.get(name, {})
    rows = []
    for view, width in (("pca50", 50), ("pca256", 256)):
        row = doc.get("xgboost", {}).get(view, {}).get("64", {})
        if not all(_number(row.get(k)) for k in ("speedup_vs_256", "delta_mean_vs_256")):
            continue
        rows.append(
            Row(
                f"xgboost probe, 64 vs 256 histogram bins, PBMC3k {width} HVG PCs, 5 folds: CPU "
                f"speed-up (Δ mean test macro F1 {row['delta_mean_vs_256']:+.4f})",
                f"{row['speedup_vs_256']:.2f}×",
                "—",
                (name,),
            )
        )
    knn = doc.get("knn", {}).get("15", {})
    if _number(knn.get("speedup")) and _number(knn.get("equal_predictions")):
        rows.append(
            Row(
                "kNN probe (k = 15), unit-length Euclidean vs cosine brute-force search, 40k "
                f"training cells: CPU speed-up (equal predictions {knn['equal_predictions']:.4f})",
                f"{knn['speedup']:.1f}×",
                "—",
                (name,),
            )
        )
    return rows


RELEASED = {
    "geneformer": "Geneformer V2-104M",
    "scgpt": "scGPT_human",
    "scfoundation": "scFoundation",
}


GPU_MODEL_FIGURES = (
    (
        "flop_fraction_bf16",
        "flop_fraction_gpu",
        "bf16 forward FLOP rate / the card's bf16 `torch.mm` rate",
        "{:.2f}",
    ),
    (
        "bf16_cosine_min",
        "bf16_cosine_min",
        "bf16 vs fp32 embeddings, smallest per-cell cosine",
        "{:.5f}",
    ),
)
"""Per model: the figure's key, its target's key, what it is, its format (higher is better)."""


def gpu_rows(docs: Docs) -> list[Row]:
    """``gpu_check.sh`` on a CUDA card (``gpu_check_<card>.json``, the CPU form left out): per
    model the bf16 FLOP fraction of the card's bf16 ``torch.mm`` rate and the smallest bf16 vs
    fp32 per-cell cosine, then fine-tuning against the ``Trainer`` on the card."""
    rows = []
    for name, doc in sorted(docs.items()):
        if not name.startswith("gpu_check_") or doc.get("card", "cpu") == "cpu":
            continue
        card, targets = doc["card"], doc.get("targets", {})
        cells = f"{doc['n_cells']:,} PBMC3k cells" if _number(doc.get("n_cells")) else "PBMC3k"
        for model, entry in doc.get("models", {}).items():
            shape = f"{RELEASED.get(model, model)} shape, random weights, {cells}"
            for key, goal_key, what, fmt in GPU_MODEL_FIGURES:
                figure, goal = entry.get(key), targets.get(goal_key)
                if _number(figure) and _number(goal):
                    met = "met" if figure >= goal else "not met"
                    rows.append(
                        Row(
                            f"{card}: {what} ({shape})",
                            fmt.format(figure),
                            f"≥ {goal:g}: {met}",
                            (name,),
                        )
                    )
        finetune = doc.get("finetune", {})
        found = _finetune_ratio(finetune)
        if found:
            unit, ratio = found
            rows.append(
                Row(
                    f"{card}: fine-tuning {unit} vs Hugging Face `Trainer` (batch "
                    f"{finetune.get('batch_size')}, cells of up to {finetune.get('max_length')} "
                    "genes)",
                    f"{ratio:.2f}×",
                    TARGET_FINETUNE_VS_TRAINER,
                    (name,),
                )
            )
    return rows


ROW_FAMILIES: tuple[Callable[[Docs], list[Row]], ...] = (
    geneformer_rows,
    scgpt_rows,
    scfoundation_rows,
    finetune_rows,
    embed_scaling_rows,
    run_scaling_rows,
    label_efficiency_rows,
    baselines_cost_rows,
    resample_cost_rows,
    model_cost_rows,
    probe_cost_rows,
    gpu_rows,
)


# --------------------------------------------------------------------------------------
# the table and README.md
# --------------------------------------------------------------------------------------


class TableError(Exception):
    """A results file or README.md that the table cannot be built from or written into."""


def read_results(results: Path = RESULTS) -> dict[str, dict]:
    """Every ``*.json`` in ``results`` parsed, by file name (absent folder: none)."""
    docs = {}
    for path in sorted(results.glob("*.json")):
        try:
            docs[path.name] = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise TableError(
                f"{path.name} is not valid JSON ({exc.msg}, line {exc.lineno}); rerun the "
                "benchmark that writes it"
            ) from exc
    return docs


def table(docs: Docs) -> str:
    """The Markdown table (header and one line per row) built from the parsed results."""
    lines = list(HEADER)
    for family in ROW_FAMILIES:
        lines += [row.markdown() for row in family(docs)]
    return "\n".join(lines)


def replace_block(readme: str, block: str) -> str:
    """``readme`` with the text between the START and END markers replaced by ``block``."""
    start, end = readme.find(START), readme.find(END)
    if start < 0 or end < start:
        raise TableError(
            f"README.md has no {START} … {END} block; put the two markers around the "
            "benchmark table"
        )
    return readme[: start + len(START)] + "\n" + block + "\n" + readme[end:]


def generated_readme(readme: Path = README, results: Path = RESULTS) -> tuple[str, str]:
    """README.md's current text and its text with the table generated from ``results``."""
    try:
        text = readme.read_text()
    except OSError as exc:
        raise TableError(
            f"cannot read {readme.name} ({exc.strerror}); run from a checkout"
        ) from exc
    return text, replace_block(text, table(read_results(results)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 when README.md's table is not the generated one",
    )
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    try:
        current, generated = generated_readme(args.readme, args.results)
    except TableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if current != generated:
            print(
                "README.md's benchmark table differs from benchmarks/results/*.json; run "
                "`python benchmarks/readme_table.py` to regenerate it",
                file=sys.stderr,
            )
            return 1
        return 0
    if current != generated:
        args.readme.write_text(generated)
        print(f"wrote the benchmark table in {args.readme.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
